"""Online lesion augmentation: :class:`RandLesionSynthesisd`, a MONAI transform for segmentation training.

With probability ``prob`` it writes one or more lesions into a training sample in memory, with the
project's own chain and nothing else: attributes drawn from a :class:`LesionDistribution`, a full report
made against the organ's HU measured in this very sample (:func:`lesiondiffusion.reports.extraction.measure_scan`,
:class:`~lesiondiffusion.reports.generation.OfflineReportProvider`, :func:`~lesiondiffusion.reports.generation.complete_report`),
an organ-aware box (:func:`lesiondiffusion.placement.place_box`), a mask from LMNet, intensities from
LINet on a crop around it, and the noise-keeping paste (:func:`lesiondiffusion.paste.paste`). The label
gets ``lesion_label`` under each lesion; meta-data and affine stay; what was drawn is recorded as JSON in
the image's and the label's meta-data (``meta[meta_key]``, ``"[]"`` when nothing was written, so samples
collate alike).

The sample lies on its own grid (put ``Orientationd("RAS")`` and ``Spacingd`` near 1-2 mm before it;
intensities in HU, so before any intensity scaling). LMNet sees the organ map at its trained spacing
whatever the sample's (its window is scaled by the voxel size); LINet sees the sample's voxels as they are.

Networks are built on first use, once per process (so once per ``DataLoader`` worker) and never pickled.
Every random choice comes from the transform's ``R`` (``set_random_state`` / ``monai.utils.set_determinism``):
the same state gives the same lesions. ``fast=True`` (the default) is for training loops: few sampling
steps, no guidance, a small crop, one calibration round, no disk I/O.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from lesiondiffusion import autoencoder as ae
from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import LESION_TYPE, ORGAN_TYPE
from lesiondiffusion.data_paths import BUNDLES
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.io import StoredImage, user_path, voxel_spacing
from lesiondiffusion.labels import is_hollow, label_table, to_v1_map
from lesiondiffusion.manifest import LesionEntry
from lesiondiffusion.networks.weights import load_weights, require_weights
from lesiondiffusion.paste import paste
from lesiondiffusion.pipelines.linet import LesionInpainter
from lesiondiffusion.pipelines.lmnet import LesionMaskSynthesiser
from lesiondiffusion.pipelines.mask_inputs import working_size
from lesiondiffusion.placement import PlacementError, bounding_box, place_box
from lesiondiffusion.reports.extraction import measure_scan
from lesiondiffusion.reports.generation import OfflineReportProvider, complete_report

logger = logging.getLogger(__name__)

DEFAULT_ORGANS = ("liver",)
DEFAULT_LESION_TYPES = ("tumor", "cyst", "hemangioma", "metastasis")
META_KEY = "lesion_synthesis"

# Sampling settings: the bundles' inference defaults, and the fast ones for training loops.
FULL = {
    "mask_steps": None,
    "image_steps": None,
    "image_guidance": None,
    "calibration_rounds": None,
    "crop_size": None,
    "context_mm": None,
}
FAST = {
    "mask_steps": 3,
    "image_steps": 4,
    "image_guidance": 1.0,
    "calibration_rounds": 1,
    "crop_size": (32, 32, 32),
    "context_mm": 6.0,
}


@dataclass
class LesionDistribution:
    """What lesions to draw.

    Args:
        organs: organ names (TotalSegmentator v1/v2 names or synonyms) and their weights; only organs
            present in the sample are drawn from.
        lesion_types: lesion type words ("tumor", "cyst", ...) and weights; the report provider's table
            of lesion kinds (:data:`lesiondiffusion.attributes.LESION_KINDS`) turns each into its priors.
        size_mm: (low, high) lesion diameter in mm, drawn uniformly.
        densities: density classes (``vocabulary.classes("density")`` or short forms: "hypodense") and
            weights; None lets the report provider pick one that suits the lesion type and the scan.
        num_lesions: (low, high) lesions per sample, inclusive.
        cavity: force a cavity class (e.g. "within the parenchymal organ"); None: the provider's choice.
    """

    organs: Mapping[str, float] | Sequence[str] = DEFAULT_ORGANS
    lesion_types: Mapping[str, float] | Sequence[str] = DEFAULT_LESION_TYPES
    size_mm: tuple[float, float] = (8.0, 30.0)
    densities: Mapping[str, float] | Sequence[str] | None = None
    num_lesions: tuple[int, int] = (1, 1)
    cavity: str | None = None

    def __post_init__(self) -> None:
        self.organs = _weights(self.organs, "organs")
        self.lesion_types = _weights(self.lesion_types, "lesion_types")
        table = label_table("v1")
        self.organ_ids = {name: table.id(name) for name in self.organs}  # unknown names fail here, once
        if self.densities is not None:
            self.densities = _weights(self.densities, "densities")
            for name in self.densities:
                found, unknown = V.parse_classes(V.DENSITY, name)
                if unknown or not found:
                    raise LesionDiffusionError(
                        f"unknown density class {name!r}; use one of: {', '.join(V.classes(V.DENSITY))}"
                    )
        lo, hi = (float(v) for v in self.size_mm)
        if not 0 < lo <= hi:
            raise LesionDiffusionError(f"size_mm must be (low, high) with 0 < low <= high, got {self.size_mm}")
        self.size_mm = (lo, hi)
        n_lo, n_hi = (int(v) for v in self.num_lesions)
        if not 1 <= n_lo <= n_hi:
            raise LesionDiffusionError(f"num_lesions must be (low, high) with 1 <= low <= high, got {self.num_lesions}")
        self.num_lesions = (n_lo, n_hi)
        if self.cavity is not None and self.cavity not in V.CAVITY_CLASSES:
            raise LesionDiffusionError(f"unknown cavity {self.cavity!r}; use one of: {', '.join(V.CAVITY_CLASSES)}")


def _weights(values: Mapping[str, float] | Sequence[str], what: str) -> dict[str, float]:
    out = (
        {str(k): float(v) for k, v in values.items()} if isinstance(values, Mapping) else {str(v): 1.0 for v in values}
    )
    if not out or any(w < 0 for w in out.values()) or sum(out.values()) <= 0:
        raise LesionDiffusionError(
            f"{what} needs at least one entry and non-negative weights with a positive sum, got {values!r}"
        )
    return out


def _pick(rng: np.random.RandomState, weights: Mapping[str, float]) -> str:
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


# ---- the pipeline pieces, loaded once per process ---------------------------------------------------
def _bundle_parser(bundle: str, overrides: Mapping[str, Any]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLES / bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


@dataclass
class SynthesisSettings:
    """Networks and sampling for :class:`RandLesionSynthesisd` (None: the bundle's inference default)."""

    preset: str = "cpu"
    weights_dir: str | None = None  # folder with lmnet/, linet/, vqgan/ model.pt; None: the shipped weights
    mask_steps: int | None = None
    image_steps: int | None = None
    image_guidance: float | None = None
    calibration_rounds: int | None = None
    crop_size: Sequence[int] | None = None
    context_mm: float | None = None
    margin_mm: float = 3.0
    feather_mm: float = 2.0
    device: str = "cpu"

    def weights(self, network: str) -> Path:
        root = user_path(self.weights_dir) if self.weights_dir else BUNDLES
        return root / network / "model.pt" if self.weights_dir else root / network / "models" / "model.pt"


@dataclass
class LesionEngine:
    """LMNet's mask synthesiser and LINet's inpainter, built from the bundles' inference configs."""

    settings: SynthesisSettings
    synthesiser: Any = field(init=False)
    inpainter: Any = field(init=False)
    lmnet_spacing: float = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        common = {"preset": s.preset, "device": s.device}
        lm = _bundle_parser("lmnet", {**common, **({"steps": s.mask_steps} if s.mask_steps else {})})
        sampler = lm.get_parsed_content("diffusion_sampler")
        sampler.progress = False
        self.lmnet_spacing = float(lm.get_parsed_content("spacing"))
        self.synthesiser = LesionMaskSynthesiser(
            network=lm.get_parsed_content("network_def"), weights=s.weights("lmnet"), sampler=sampler,
            crop=lm.get_parsed_content("crop_size"), spacing=self.lmnet_spacing,
            retries=int(lm.get_parsed_content("retries")),
            min_voxels=int(lm.get_parsed_content("min_voxels")), device=s.device,
        )  # fmt: skip
        li_over = {**common, "vqgan_preset": s.preset}
        if s.image_steps:
            li_over["steps"] = s.image_steps
        if s.image_guidance is not None:
            li_over["guidance_scale"] = float(s.image_guidance)
        li = _bundle_parser("linet", li_over)
        network = li.get_parsed_content("network_def")
        require_weights(str(s.weights("linet")), "weights", "LINet")
        load_weights(network, s.weights("linet"), setting="weights")
        autoencoder = ae.load_vqvae(s.weights("vqgan"), preset=s.preset, device=s.device, key="vqgan_weights")
        autoencoder.requires_grad_(False)
        image_sampler = li.get_parsed_content("diffusion_sampler")
        image_sampler.progress = False
        rounds = li.get_parsed_content("calibration_rounds") if s.calibration_rounds is None else s.calibration_rounds
        self.inpainter = LesionInpainter(
            network=network, autoencoder=autoencoder, sampler=image_sampler,
            crop_size=tuple(s.crop_size) if s.crop_size else tuple(li.get_parsed_content("crop_size")),
            context_mm=float(li.get_parsed_content("context_mm") if s.context_mm is None else s.context_mm),
            margin_mm=s.margin_mm, feather_mm=s.feather_mm,
            noise_sigma_vox=float(li.get_parsed_content("noise_sigma_vox")),
            calibration_rounds=int(rounds), mask_head=bool(li.get_parsed_content("mask_head")), device=s.device,
        )  # fmt: skip
        logger.info("lesion synthesis networks loaded (preset %s, %s)", s.preset, s.device)


# ---- the transform ----------------------------------------------------------------------------------
class RandLesionSynthesisd(Randomizable, MapTransform):
    """Write synthetic lesions into a training sample with probability ``prob`` (see the module docstring).

    Args:
        image_key, label_key, organ_seg_key: the sample's CT (HU, channel-first ``[1, X, Y, Z]``), its
            label map and its TotalSegmentator organ map, all on one grid.
        prob: probability of writing lesions into a sample.
        distribution: a :class:`LesionDistribution` or its keyword arguments.
        organ_seg_version: the organ map's numbering, ``"v1"`` or ``"v2"`` (TotalSegmentator 2.x).
        lesion_label: label value written under each lesion.
        organ_label: when set, the host organ's voxels in the label become this value first (for label
            maps that do not mark the organ yet); None leaves them.
        fast: training-loop settings (:data:`FAST`); False: the bundles' inference defaults.
        settings: a :class:`SynthesisSettings` or its keyword arguments, overriding the above.
        meta_key: meta-data key of the JSON record of what was drawn.
        intensity: ``"linet"`` paints the lesion with LINet; ``"flat"`` fills LMNet's mask at the report's
            CT value (the scan's noise kept by the same paste): the flat-fill baseline.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        organ_seg_key: str = "organ_seg",
        prob: float = 0.5,
        distribution: LesionDistribution | Mapping[str, Any] | None = None,
        organ_seg_version: str = "v2",
        lesion_label: int = 2,
        organ_label: int | None = None,
        fast: bool = True,
        settings: SynthesisSettings | Mapping[str, Any] | None = None,
        meta_key: str = META_KEY,
        intensity: str = "linet",
    ) -> None:
        keys: KeysCollection = [image_key, label_key, organ_seg_key]
        MapTransform.__init__(self, keys)
        self.image_key, self.label_key, self.organ_seg_key = image_key, label_key, organ_seg_key
        if not 0.0 <= float(prob) <= 1.0:
            raise LesionDiffusionError(f"prob must lie in [0, 1], got {prob}")
        self.prob = float(prob)
        if distribution is None:
            distribution = LesionDistribution()
        self.distribution = (
            distribution if isinstance(distribution, LesionDistribution) else LesionDistribution(**distribution)
        )
        if organ_seg_version not in ("v1", "v2"):
            raise LesionDiffusionError(f"organ_seg_version must be 'v1' or 'v2', got {organ_seg_version!r}")
        self.organ_seg_version = organ_seg_version
        self.lesion_label, self.organ_label = int(lesion_label), organ_label
        base = {k: v for k, v in (FAST if fast else FULL).items() if v is not None}
        given = asdict(settings) if isinstance(settings, SynthesisSettings) else dict(settings or {})
        self.settings = SynthesisSettings(**{**base, **given})
        self.meta_key = meta_key
        if intensity not in ("linet", "flat"):
            raise LesionDiffusionError(f"intensity must be 'linet' or 'flat', got {intensity!r}")
        self.intensity = intensity
        self._engine: LesionEngine | None = None
        # MONAI's default R is one generator per class, made at import; seeding ours from numpy's global
        # generator makes the transform follow monai.utils.set_determinism (workers reseed it anyway)
        self.set_random_state(seed=int(np.random.randint(0, 2**31 - 1)))
        self._do = False
        self._seed = 0

    # networks stay out of pickles: each DataLoader worker builds its own, once
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_engine"] = None
        return state

    @property
    def engine(self) -> LesionEngine:
        """The networks, built on first use in this process."""
        if self._engine is None:
            self._engine = LesionEngine(self.settings)
        return self._engine

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.rand() < self.prob
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        records: list[dict[str, Any]] = []
        if self._do:
            image, label, records = self.synthesise(
                d[self.image_key], d[self.label_key], d[self.organ_seg_key], self._seed
            )
            d[self.image_key], d[self.label_key] = image, label
        text = json.dumps(records)
        for key in (self.image_key, self.label_key):
            if isinstance(d[key], MetaTensor):
                d[key].meta[self.meta_key] = text
        return d

    # ---- the work ---------------------------------------------------------------------------------------
    def synthesise(self, image: Any, label: Any, organ_seg: Any, seed: int) -> tuple[Any, Any, list[dict[str, Any]]]:
        """Lesions into copies of ``image`` and ``label``; returns them and one record per lesion."""
        rng = np.random.RandomState(seed)
        image_t, label_t = _channel_first(image, self.image_key), _channel_first(label, self.label_key)
        seg_t = _channel_first(organ_seg, self.organ_seg_key)
        if not image_t.shape == label_t.shape == seg_t.shape:
            raise LesionDiffusionError(
                f"image {tuple(image_t.shape)}, label {tuple(label_t.shape)} and organ map {tuple(seg_t.shape)} "
                "must share one grid"
            )
        affine = _affine(image)
        spacing = voxel_spacing(affine)
        hu = image_t[0].detach().cpu().numpy().astype(np.float32)
        seg = to_v1_map(np.rint(seg_t[0].detach().cpu().numpy()).astype(np.int32), self.organ_seg_version)
        lab = np.rint(label_t[0].detach().cpu().numpy()).astype(np.int32)
        present = set(np.unique(seg).tolist())
        organs = {n: w for n, w in self.distribution.organs.items() if self.distribution.organ_ids[n] in present}
        if not organs:
            logger.info("no organ of %s in the sample; nothing written", list(self.distribution.organs))
            return image, label, []

        occupied = lab == self.lesion_label  # lesions already there are never overlapped nor repainted
        stored = StoredImage(hu, 1.0, 0.0, nib.Nifti1Image(hu, affine))
        out = hu.copy()
        lo, hi = self.distribution.num_lesions
        records, scans, boxes = [], {}, []
        for j in range(int(rng.randint(lo, hi + 1))):
            t0 = time.perf_counter()
            organ = _pick(rng, organs)
            organ_id = self.distribution.organ_ids[organ]
            attributes = {ORGAN_TYPE: organ, LESION_TYPE: _pick(rng, self.distribution.lesion_types),
                          V.SIZE: f"{rng.uniform(*self.distribution.size_mm):.0f} mm"}  # fmt: skip
            if self.distribution.densities is not None:
                attributes[V.DENSITY] = _pick(rng, self.distribution.densities)
            if self.distribution.cavity is not None:
                attributes[V.CAVITY] = self.distribution.cavity
            lesion_seed = int(rng.randint(0, 2**31 - 1))
            try:
                record = self._one_lesion(out, seg, organ_id, organ, attributes, spacing, affine, stored, occupied,
                                          boxes, scans, lesion_seed)  # fmt: skip
            except (PlacementError, LesionDiffusionError) as e:
                # a crowded or tiny organ: skip this lesion, the sample stays usable
                logger.info("lesion %d in the %s skipped: %s", j, organ, e)
                continue
            record["seconds"] = round(time.perf_counter() - t0, 3)
            records.append(record)
        if not records:
            return image, label, []
        new_lab = lab.copy()
        if self.organ_label is not None:
            for r in records:
                new_lab[(seg == r["organ_id"]) & (new_lab == 0)] = int(self.organ_label)
        new_lab[occupied & (lab != self.lesion_label)] = self.lesion_label
        return _like(image, out), _like(label, new_lab), records

    def _one_lesion(
        self, out: np.ndarray, seg: np.ndarray, organ_id: int, organ: str, attributes: dict[str, str],
        spacing: np.ndarray,
        affine: np.ndarray, stored: StoredImage, occupied: np.ndarray, boxes: list, scans: dict, seed: int,
    ) -> dict[str, Any]:  # fmt: skip
        engine = self.engine
        rng = np.random.default_rng(seed)
        organ_mask = seg == organ_id
        if organ_id not in scans:  # the organ's HU and the contrast phase of this sample, once per organ
            scans[organ_id] = measure_scan(stored.raw, seg, organ_id, "v1", tuple(spacing))
        scan = scans[organ_id]
        organ_box = bounding_box(organ_mask).size
        proposed = OfflineReportProvider().propose(
            attributes, label_table("v1").name(organ_id), rng, organ_box_size=organ_box, scan=scan
        )
        report = complete_report(attributes, organ_id, organ_box, proposed, rng, spacing=tuple(spacing), scan=scan)
        cavity = report.attributes[V.CAVITY]
        _, size = report.array_box()
        box = place_box(organ_mask, cavity, size, rng, is_hollow(organ_id), avoid=boxes)
        report = report.with_array_box(box.centre, box.size)
        # LMNet's window in this grid's voxels: its trained spacing over the sample's
        engine.synthesiser.spacing = engine.lmnet_spacing / float(np.prod(spacing) ** (1.0 / 3.0))
        engine.synthesiser.window = working_size(engine.synthesiser.crop, engine.synthesiser.spacing)
        entry = LesionEntry(organ_id, cavity, report, box)  # type: ignore[arg-type]  # a report object: no file
        mask = engine.synthesiser.draw(seg, entry, occupied, seed=seed % (2**31 - 1))
        if self.intensity == "flat":
            patch_hu, patch_affine = np.where(mask, float(report.mean_hu), out).astype(np.float64), affine
        else:
            condition = engine.inpainter.condition(report, organ_id)
            patch_hu, patch_affine, _ = engine.inpainter.inpaint_lesion(out, affine, mask, condition, seed)
        s = self.settings
        if self.intensity == "flat":
            paste(stored, mask, patch_hu, patch_affine, s.margin_mm, s.feather_mm, raw=out, protect=occupied & ~mask,
                  noise_sigma_vox=engine.inpainter.noise_sigma_vox)  # fmt: skip
        else:
            engine.inpainter.paste_lesion(stored, mask, patch_hu, patch_affine, report.attributes.get(V.SURFACE), mask,
                                          out, occupied & ~mask, s.margin_mm, s.feather_mm)  # fmt: skip
        occupied |= mask
        boxes.append(box)
        return {
            "organ": label_table("v1").name(organ_id), "organ_id": int(organ_id), "requested": attributes,
            "attributes": dict(report.attributes), "box": box.to_json(), "voxels": int(mask.sum()),
            "volume_ml": round(float(mask.sum() * np.prod(spacing)) / 1000.0, 4), "seed": int(seed),
        }  # fmt: skip


# ---- tensors -----------------------------------------------------------------------------------------
def _channel_first(x: Any, key: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 4 or t.shape[0] != 1:
        raise LesionDiffusionError(f"{key} must be channel-first [1, X, Y, Z], got shape {tuple(t.shape)}")
    return t


def _affine(x: Any) -> np.ndarray:
    if isinstance(x, MetaTensor):
        return np.asarray(x.affine.detach().cpu().numpy(), dtype=np.float64)
    return np.eye(4)


def _like(reference: Any, array: np.ndarray) -> Any:
    """``array`` in the place of ``reference``'s voxels: same type, dtype, device, meta-data and affine."""
    ref = torch.as_tensor(reference)
    values = torch.as_tensor(array).to(dtype=ref.dtype, device=ref.device)[None]
    if isinstance(reference, MetaTensor):
        out = reference.clone()
        out.copy_(values)
        return out
    return values if isinstance(reference, torch.Tensor) else values.numpy()
