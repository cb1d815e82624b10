"""Attribute conditioning (design 4.5): reports -> fixed-size tensors -> ``[B, n_attributes, D]`` sequences.

Two halves, so that the data pipeline stays tensor-only and the embedding is trained with the network:

1. :class:`ConditionSpec` / :class:`ReportConditiond` (a MONAI transform) turn one lesion report
   (``type.json`` path, :class:`~lesiondiffusion.report.Report`, :class:`~lesiondiffusion.report.LesionReport`
   or a plain attribute dict) into a float tensor ``[n_fields, width]``, one row per field:

   - categorical fields (``shape``, ``specific features``, ...): up to ``max_values`` canonical class
     indices (1-based, in the order of :func:`lesiondiffusion.vocabulary.classes`; 0 = none), parsed
     with :func:`lesiondiffusion.vocabulary.parse_classes`;
   - ``lesion location``: TotalSegmentator v1 organ ids (the value is an id such as ``"5"`` or an organ
     name; a group word such as ``"kidney"`` gives several ids);
   - numeric fields (``CT value`` -> mean HU, ``size`` -> voxels): ``[1, v1, v2, v3]`` (first slot = present).

   An all-zero row means "attribute unknown": that is what attribute dropout writes
   (:class:`RandConditionDropoutd`) and what the unconditional branch of classifier-free guidance uses
   (:func:`null_condition`).

2. A condition encoder (``nn.Module``, inside the network wrapper of :mod:`lesiondiffusion.diffusion`)
   embeds that tensor into ``[B, n_fields, D]`` for cross-attention:

   - :class:`VocabConditionEncoder` (``vocab``, default, offline): learned class embeddings (the classes
     of a multi-valued field are mean-pooled) plus a learned field embedding; numbers get a Fourier
     encoding and a small MLP; unknown attributes a learned per-field "null" vector.
   - :class:`BiomedCLIPConditionEncoder` (``biomedclip``): the class embeddings are BiomedCLIP text-tower
     embeddings of the class strings (frozen, computed once per string through :class:`TextEmbeddingCache`,
     stored in the state dict so inference needs no tower) followed by a learned projection to ``D``.
     The tower is loaded lazily from a LOCAL open_clip folder; ``open_clip`` is imported only then.

:func:`build_condition_encoder` picks one by name (for bundle configs). :class:`IntensityHint` also gives
LINet the CT value as an image inside the lesion mask.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from torch import nn

from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import user_path
from lesiondiffusion.labels import UnknownOrganError, label_table
from lesiondiffusion.report import LesionReport, Report, parse_ct_value, parse_size, read_report

logger = logging.getLogger(__name__)

CATEGORICAL = "categorical"
ORGAN = "organ"
NUMBER = "number"

# Numeric fields: how many numbers each carries, how to parse them from the report text, and how the
# encoder normalises them to roughly [-1, 1] before the Fourier encoding (HU / 1000; log2 of voxels / 8).
NUMERIC_FIELDS: dict[str, int] = {V.CT_VALUE: 1, V.SIZE: 3}


def _parse_numbers(name: str, text: str) -> list[float] | None:
    if name == V.CT_VALUE:
        hu = parse_ct_value(text)
        return None if hu is None else [hu]
    size = parse_size(text)
    return None if size is None else [float(s) for s in size]


def _normalise_numbers(name: str, values: torch.Tensor) -> torch.Tensor:
    if name == V.CT_VALUE:
        return values / 1000.0
    return torch.log2(values.clamp_min(1.0)) / 8.0


@dataclass(frozen=True)
class ConditionSpec:
    """Which report fields a network is conditioned on, and how each becomes one tensor row.

    Args:
        fields: report attribute names, e.g. :data:`lesiondiffusion.vocabulary.MASK_FIELDS`.
        max_values: most classes kept for a multi-valued field (extra ones are dropped with a warning).
        organ_table: TotalSegmentator numbering of ``lesion location`` ids ("v1", the reports' numbering).
    """

    fields: tuple[str, ...] = V.MASK_FIELDS
    max_values: int = 4
    organ_table: str = "v1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        for name in self.fields:
            if not (V.is_categorical(name) or name == V.LOCATION or name in NUMERIC_FIELDS):
                raise LesionDiffusionError(
                    f"unknown condition field {name!r}; known: {', '.join(V.REPORT_FIELDS + V.OPTIONAL_FIELDS)}"
                )

    def kind(self, name: str) -> str:
        """``categorical``, ``organ`` (lesion location) or ``number``."""
        if name == V.LOCATION:
            return ORGAN
        return NUMBER if name in NUMERIC_FIELDS else CATEGORICAL

    def class_names(self, name: str) -> tuple[str, ...]:
        """Names of a field's classes, index ``i`` of the tensor meaning ``class_names[i - 1]``."""
        if self.kind(name) == ORGAN:
            table = label_table(self.organ_table)
            return tuple(table.names.get(i, f"label {i}") for i in range(1, max(table.names) + 1))
        return V.classes(name) if self.kind(name) == CATEGORICAL else ()

    @property
    def width(self) -> int:
        """Row length of the condition tensor."""
        return max(self.max_values, 1 + max(NUMERIC_FIELDS.values()))

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_fields, width)``."""
        return (len(self.fields), self.width)

    def _organ_ids(self, text: str) -> list[int]:
        table = label_table(self.organ_table)
        ids: list[int] = []
        for piece in (p.strip() for p in str(text).split(",")):
            if not piece:
                continue
            try:
                ids += [i for i in table.ids(piece) if i not in ids]
            except UnknownOrganError as e:
                logger.warning("ignoring lesion location %r: %s", piece, e)
        return ids

    def encode(self, attributes: Mapping[str, str], source: str | os.PathLike[str] | None = None) -> torch.Tensor:
        """One lesion's attributes -> float tensor ``[n_fields, width]`` (missing/unparsable = zero row)."""
        out = torch.zeros(self.shape, dtype=torch.float32)
        for row, name in enumerate(self.fields):
            text = attributes.get(name)
            if text is None or not str(text).strip():
                continue
            kind = self.kind(name)
            if kind == NUMBER:
                numbers = _parse_numbers(name, str(text))
                if numbers is None:
                    logger.warning(
                        "%s: cannot read a number from %s=%r; treated as unknown", source or "report", name, text
                    )
                    continue
                out[row, 0] = 1.0
                out[row, 1 : 1 + len(numbers)] = torch.tensor(numbers)
                continue
            if kind == ORGAN:
                indices = self._organ_ids(str(text))
            else:
                found, unknown = V.parse_classes(name, str(text))
                if unknown:
                    logger.warning("%s: unrecognised %s value(s) %s ignored", source or "report", name, unknown)
                names = self.class_names(name)
                indices = [names.index(c) + 1 for c in found]
            if len(indices) > self.max_values:
                logger.warning(
                    "%s: %s has %d values; keeping the first %d",
                    source or "report",
                    name,
                    len(indices),
                    self.max_values,
                )
            for j, index in enumerate(indices[: self.max_values]):
                out[row, j] = float(index)
        return out

    def decode(self, condition: torch.Tensor) -> dict[str, Any]:
        """Readable view of one ``[n_fields, width]`` tensor: class names, numbers, or None (unknown)."""
        out: dict[str, Any] = {}
        for row, name in enumerate(self.fields):
            values = condition[row]
            if self.kind(name) == NUMBER:
                n = NUMERIC_FIELDS[name]
                out[name] = values[1 : 1 + n].tolist() if values[0] > 0.5 else None
            else:
                names = self.class_names(name)
                picked = [names[int(i) - 1] for i in values[: self.max_values].tolist() if int(i) > 0]
                out[name] = picked or None
        return out


def null_condition(condition: torch.Tensor) -> torch.Tensor:
    """The "nothing known" condition of the same shape (all attributes dropped): for guidance."""
    return torch.zeros_like(condition)


def lesion_attributes(
    report: str | os.PathLike[str] | Report | LesionReport | Mapping[str, str], organ_id: int | None = None
) -> dict[str, str]:
    """The attribute dict of one lesion from any report form; several lesions need ``organ_id``."""
    source = None
    if isinstance(report, (str, os.PathLike)):
        source = report
        report = read_report(report)
    if isinstance(report, Report):
        if organ_id is not None:
            if organ_id not in report:
                raise InputError(source, f"no lesion entry for organ {organ_id}; has {list(report.organ_ids)}")
            report = report[organ_id]
        elif len(report.lesions) == 1:
            report = report.lesions[0]
        else:
            raise InputError(
                source, f"has {len(report.lesions)} lesion entries {list(report.organ_ids)}; say which organ id to use"
            )
    if isinstance(report, LesionReport):
        return dict(report.attributes)
    if isinstance(report, Mapping):
        return {str(k): str(v) for k, v in report.items()}
    raise LesionDiffusionError(f"cannot read lesion attributes from a {type(report).__name__}")


class ReportConditiond(MapTransform):
    """Report under ``keys`` (type.json path, report object or attribute dict) -> condition tensor.

    Writes ``output_key`` (default ``"condition"``): float ``[n_fields, width]`` as :meth:`ConditionSpec.encode`.
    ``organ_key`` names an optional data key holding the organ id whose entry to use when a
    ``type.json`` lists several lesions.
    """

    def __init__(
        self,
        keys: KeysCollection = "report",
        fields: Sequence[str] = V.MASK_FIELDS,
        output_key: str = "condition",
        organ_key: str | None = "organ_id",
        max_values: int = 4,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spec = ConditionSpec(tuple(fields), max_values)
        self.output_key = output_key
        self.organ_key = organ_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            organ = d.get(self.organ_key) if self.organ_key else None
            organ = None if organ is None else int(organ)
            source = d[key] if isinstance(d[key], (str, os.PathLike)) else None
            d[self.output_key] = self.spec.encode(lesion_attributes(d[key], organ), source)
        return d


class RandConditionDropoutd(RandomizableTransform, MapTransform):
    """Attribute dropout for classifier-free guidance: zero rows of the condition tensor.

    With probability ``prob_all`` the whole condition is dropped (the unconditional case guidance needs);
    otherwise each attribute row is dropped independently with probability ``prob_attribute`` (so the
    network learns to work from any subset of attributes, as a user may give only some).
    """

    def __init__(
        self,
        keys: KeysCollection = "condition",
        prob_attribute: float = 0.1,
        prob_all: float = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.prob_attribute = prob_attribute
        self.prob_all = prob_all

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            cond = torch.as_tensor(d[key]).clone()
            if self.R.rand() < self.prob_all:
                cond.zero_()
            else:
                keep = torch.as_tensor(self.R.rand(cond.shape[-2]) >= self.prob_attribute)
                cond = cond * keep[:, None].to(cond.dtype)
            d[key] = cond
        return d


class IntensityHint(nn.Module):
    """The requested CT value painted into the lesion mask: two extra input channels for LINet.

    Cross-attention carries the CT value as one token among ten, read only at the UNet's lowest level;
    a region's intensity is a local, per-voxel fact, so the same number is also given where it applies:
    ``forward(condition, extra) -> [B, 2, *S]`` = (mask where the CT value is known, mask * HU / 100).
    The scale matters: the networks learn with Adam, whose steps do not grow with an input's range,
    so a 40 HU difference must be a difference of order 0.1-1 in the input to be learned in thousands
    of iterations rather than tens of thousands (on the [0, 1] intensity map it is 0.06). The mask is
    channel ``mask_channel`` of ``extra``. A condition whose CT value row is zero (attribute dropout,
    the null condition of guidance) gives zero channels, so the hint is dropped exactly when the
    attribute is, and guidance strengthens it like any attribute.
    """

    channels = 2
    hu_unit = 100.0
    limit = 10.0  # +-1000 HU: air and dense bone, the ends of the intensity map

    def __init__(self, fields: Sequence[str] = V.IMAGE_FIELDS, mask_channel: int = 0, max_values: int = 4) -> None:
        super().__init__()
        spec = ConditionSpec(tuple(fields), max_values)
        if V.CT_VALUE not in spec.fields:
            raise LesionDiffusionError(f"the intensity hint needs {V.CT_VALUE!r} among the condition fields")
        self.row = spec.fields.index(V.CT_VALUE)
        self.mask_channel = mask_channel

    def forward(self, condition: torch.Tensor | None, extra: torch.Tensor) -> torch.Tensor:
        mask = extra[:, self.mask_channel : self.mask_channel + 1]
        if condition is None:
            return torch.zeros_like(mask).repeat_interleave(self.channels, dim=1)
        row = condition[:, self.row].to(mask.dtype)
        known = (row[:, 0] > 0.5).to(mask.dtype)
        value = (row[:, 1] / self.hu_unit).clamp(-self.limit, self.limit) * known
        shape = (-1,) + (1,) * (mask.ndim - 1)
        return torch.cat([mask * known.view(shape), mask * value.view(shape)], dim=1)


# ---- encoders -----------------------------------------------------------------------------------
class FourierFeatures(nn.Module):
    """``u -> [u, sin(2^k pi u), cos(2^k pi u)]_{k < n}``: a numeric encoding an MLP can read at every scale."""

    def __init__(self, num_frequencies: int = 6) -> None:
        super().__init__()
        self.register_buffer(
            "freqs", math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32), persistent=False
        )

    @property
    def multiplier(self) -> int:
        """Output features per input number."""
        return 1 + 2 * len(self.freqs)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        angles = u[..., None] * self.freqs
        return torch.cat([u[..., None], angles.sin(), angles.cos()], dim=-1).flatten(-2)


class ConditionEncoder(nn.Module):
    """Base of the attribute encoders: condition tensor ``[B, n_fields, width]`` -> ``[B, n_fields, dim]``.

    Subclasses provide :meth:`class_embeddings` (``[n_classes_total + 1, dim]``, row 0 unused) for the
    categorical and organ fields; numeric fields, field embeddings, null vectors and pooling live here.
    """

    def __init__(
        self, fields: Sequence[str] = V.MASK_FIELDS, dim: int = 64, max_values: int = 4, num_frequencies: int = 6
    ) -> None:
        super().__init__()
        self.spec = ConditionSpec(tuple(fields), max_values)
        self.dim = dim
        self.fourier = FourierFeatures(num_frequencies)
        self.field_embedding = nn.Parameter(torch.randn(len(self.spec.fields), dim) * 0.02)
        self.null_embedding = nn.Parameter(torch.randn(len(self.spec.fields), dim) * 0.02)
        self.numeric = nn.ModuleDict(
            {
                str(i): nn.Sequential(
                    nn.Linear(NUMERIC_FIELDS[f] * self.fourier.multiplier, dim), nn.SiLU(), nn.Linear(dim, dim)
                )
                for i, f in enumerate(self.spec.fields)
                if self.spec.kind(f) == NUMBER
            }
        )
        offsets, total = [], 0
        for name in self.spec.fields:
            offsets.append(total)
            total += len(self.spec.class_names(name))
        self.num_classes_total = total
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        is_class = [self.spec.kind(f) != NUMBER for f in self.spec.fields]
        self.register_buffer("class_rows", torch.tensor(is_class, dtype=torch.bool), persistent=False)
        self.norm = nn.LayerNorm(dim)

    def class_strings(self) -> list[str]:
        """The text of every class, in the order of :meth:`class_embeddings` rows 1.. (for text encoders)."""
        return [c for name in self.spec.fields for c in self.spec.class_names(name)]

    def class_embeddings(self) -> torch.Tensor:
        """``[num_classes_total + 1, dim]`` class vectors; row 0 is padding."""
        raise NotImplementedError

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        if condition.ndim != 3 or tuple(condition.shape[1:]) != self.spec.shape:
            raise LesionDiffusionError(
                f"condition must be [B, {self.spec.shape[0]}, {self.spec.shape[1]}], got {tuple(condition.shape)}"
            )
        k = self.spec.max_values
        idx = condition[..., :k].round().long().clamp_min(0)  # [B, n, k]
        valid = (idx > 0) & self.class_rows[None, :, None]
        table = self.class_embeddings()
        global_idx = torch.where(valid, idx + self.offsets[None, :, None], torch.zeros_like(idx))
        emb = table[global_idx]  # [B, n, k, D]
        count = valid.sum(-1, keepdim=True)
        pooled = (emb * valid[..., None]).sum(-2) / count.clamp_min(1)
        present = count > 0  # [B, n, 1]
        if len(self.numeric):
            rows, flags = list(pooled.unbind(1)), list(present.unbind(1))
            for i, mlp in self.numeric.items():
                name, row = self.spec.fields[int(i)], condition[:, int(i)]
                u = _normalise_numbers(name, row[:, 1 : 1 + NUMERIC_FIELDS[name]])
                rows[int(i)] = mlp(self.fourier(u))
                flags[int(i)] = row[:, :1] > 0.5
            pooled, present = torch.stack(rows, 1), torch.stack(flags, 1)
        out = torch.where(present, pooled, self.null_embedding[None].to(pooled.dtype)) + self.field_embedding[None]
        return self.norm(out)


class VocabConditionEncoder(ConditionEncoder):
    """``vocab`` encoder (default, offline): learned embeddings of the vocabulary's canonical classes."""

    def __init__(
        self, fields: Sequence[str] = V.MASK_FIELDS, dim: int = 64, max_values: int = 4, num_frequencies: int = 6
    ) -> None:
        super().__init__(fields, dim, max_values, num_frequencies)
        self.classes = nn.Embedding(self.num_classes_total + 1, dim, padding_idx=0)
        nn.init.normal_(self.classes.weight, std=0.02)
        with torch.no_grad():
            self.classes.weight[0].zero_()

    def class_embeddings(self) -> torch.Tensor:
        return self.classes.weight


class TextEmbeddingCache:
    """Embeddings of strings, computed once each by ``embed`` (a list of strings -> ``[n, d]`` tensor).

    ``path`` (optional) persists the cache as a ``.pt`` file of ``{string: vector}`` so a later process
    (or a machine without the text tower) reuses it; it is read with ``weights_only=True``.
    """

    def __init__(
        self, embed: Callable[[list[str]], torch.Tensor] | None, path: str | os.PathLike[str] | None = None
    ) -> None:
        self.embed = embed
        self.path = None if path is None else Path(path)
        self.cache: dict[str, torch.Tensor] = {}
        if self.path is not None and self.path.is_file():
            loaded = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise InputError(self.path, "not a text-embedding cache (expected a dict of string -> tensor)")
            self.cache.update(loaded)

    def __call__(self, strings: Sequence[str]) -> torch.Tensor:
        """``[len(strings), d]`` embeddings; only strings not seen before reach ``embed``."""
        missing = list(dict.fromkeys(s for s in strings if s not in self.cache))
        if missing:
            if self.embed is None:
                raise LesionDiffusionError(
                    f"no text encoder to embed {len(missing)} new string(s), e.g. {missing[0]!r}"
                )
            vectors = self.embed(missing).detach().float().cpu()
            if vectors.shape[0] != len(missing):
                raise LesionDiffusionError(
                    f"text encoder returned {vectors.shape[0]} vectors for {len(missing)} strings"
                )
            self.cache.update(zip(missing, vectors))
            if self.path is not None:
                from lesiondiffusion.io import atomic_path

                with atomic_path(self.path) as tmp:
                    torch.save(self.cache, tmp)
        return torch.stack([self.cache[s] for s in strings])


def load_biomedclip_text_encoder(
    weights_path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> Callable[[list[str]], torch.Tensor]:
    """A function embedding strings with BiomedCLIP's text tower, loaded from a LOCAL open_clip folder.

    ``weights_path`` is a folder with ``open_clip_config.json``, ``open_clip_pytorch_model.bin`` and the
    tokenizer files (a snapshot of ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``). Nothing
    is downloaded: the Hugging Face hub is switched to offline mode first.
    """
    path = user_path(weights_path)
    if not (path / "open_clip_config.json").is_file():
        raise InputError(
            path, "no BiomedCLIP weights here (expected a folder with open_clip_config.json); set biomedclip_path"
        )
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import open_clip  # noqa: PLC0415  (optional dependency, imported only when this encoder is chosen)
    except ImportError:
        raise LesionDiffusionError(
            "the biomedclip encoder needs open_clip: pip install open_clip_torch transformers"
        ) from None
    model, _ = open_clip.create_model_from_pretrained(f"local-dir:{path}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model.eval()

    @torch.no_grad()
    def embed(strings: list[str]) -> torch.Tensor:
        tokens = tokenizer(strings).to(device)
        return model.encode_text(tokens, normalize=True)

    return embed


class BiomedCLIPConditionEncoder(ConditionEncoder):
    """``biomedclip`` encoder: frozen BiomedCLIP text embeddings of the class strings + learned projection.

    The class table (``[n_classes + 1, text_dim]``) is a persistent buffer: it is computed on the first
    forward (through ``text_encoder``, or the tower loaded from ``weights_path``, cached per string in
    ``cache_path``) and then travels in the checkpoint, so a trained model needs neither the tower nor
    open_clip at inference.

    Args:
        weights_path: local BiomedCLIP folder (see :func:`load_biomedclip_text_encoder`).
        text_encoder: a ready string -> vector function instead of ``weights_path`` (e.g. an already
            loaded tower).
        text_dim: the tower's output size (512 for BiomedCLIP).
        cache_path: optional file persisting the per-string embeddings.
    """

    def __init__(
        self,
        fields: Sequence[str] = V.MASK_FIELDS,
        dim: int = 64,
        max_values: int = 4,
        num_frequencies: int = 6,
        weights_path: str | os.PathLike[str] | None = None,
        text_encoder: Callable[[list[str]], torch.Tensor] | None = None,
        text_dim: int = 512,
        cache_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(fields, dim, max_values, num_frequencies)
        self.weights_path = weights_path
        self._text_encoder = text_encoder
        self.cache_path = cache_path
        self.register_buffer("text_table", torch.zeros(self.num_classes_total + 1, text_dim))
        self.register_buffer("table_ready", torch.zeros((), dtype=torch.bool))
        self.project = nn.Linear(text_dim, dim)

    @cached_property
    def cache(self) -> TextEmbeddingCache:
        """The per-string embedding cache, with the tower loaded only if a string is missing."""
        encoder = self._text_encoder

        def embed(strings: list[str]) -> torch.Tensor:
            nonlocal encoder
            if encoder is None:
                if self.weights_path is None:
                    raise LesionDiffusionError(
                        "the biomedclip encoder has no class table yet; set biomedclip_path to a local BiomedCLIP folder"
                    )
                encoder = load_biomedclip_text_encoder(self.weights_path)
            return encoder(strings)

        return TextEmbeddingCache(embed, self.cache_path)

    def build_table(self) -> None:
        """Embed every class string once (a no-op when the table came with a checkpoint)."""
        if bool(self.table_ready):
            return
        vectors = self.cache(self.class_strings())
        with torch.no_grad():
            self.text_table[1:] = vectors.to(self.text_table)
            self.table_ready.fill_(True)

    def class_embeddings(self) -> torch.Tensor:
        self.build_table()
        return self.project(self.text_table)


ENCODERS: dict[str, type[ConditionEncoder]] = {"vocab": VocabConditionEncoder, "biomedclip": BiomedCLIPConditionEncoder}


def build_condition_encoder(
    kind: str = "vocab",
    fields: Sequence[str] = V.MASK_FIELDS,
    dim: int = 64,
    max_values: int = 4,
    biomedclip_path: str | os.PathLike[str] | None = None,
    cache_path: str | os.PathLike[str] | None = None,
) -> ConditionEncoder:
    """The encoder named ``kind`` (``vocab`` or ``biomedclip``) for ``fields``, producing ``[B, n, dim]``."""
    if kind == "vocab":
        return VocabConditionEncoder(fields, dim, max_values)
    if kind == "biomedclip":
        if biomedclip_path is not None and not user_path(biomedclip_path).exists():
            raise InputError(
                biomedclip_path, "BiomedCLIP weights folder not found; set biomedclip_path to a local copy"
            )
        return BiomedCLIPConditionEncoder(fields, dim, max_values, weights_path=biomedclip_path, cache_path=cache_path)
    raise LesionDiffusionError(f"unknown condition encoder {kind!r}; use one of {', '.join(ENCODERS)}")
