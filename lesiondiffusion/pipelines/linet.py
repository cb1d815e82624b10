"""LINet inference: paint each lesion of a manifest case into the user's ORIGINAL CT.

Per lesion (LMNet's label map says where it is, its report says what it looks like):

1. crop the standardised CT (RAS, 1 mm: the grid the networks were trained on) around the lesion,
   padded with air where the crop leaves the volume, so volumes smaller than the crop work;
2. encode the crop with the frozen VQ-GAN, and encode it once more with the lesion filled flat (the
   intensity prior, :func:`.train.intensity_prior`) at the fill that the VQ-GAN renders at the report's
   CT value (:meth:`LesionInpainter.prior_fill`); put the lesion mask on the latent grid;
3. sample the lesion's residual over the prior (DDIM or rectified flow, ``steps``, classifier-free
   guidance on the report's image attributes), the known region reset to the clean one before every
   network call; the lesion's latent is the prior plus the residual;
4. decode, and paste into the original scan on ITS grid (:mod:`lesiondiffusion.paste`): only inside
   the lesion (from ``label_original``) dilated by ``margin_mm`` with a ``feather_mm`` feather; the crop
   is resampled at those input voxels only, through the two affines.

Why the standardised grid for the network and the input grid for the paste: the networks only know
1 mm RAS crops, and the original voxels must never be resampled, so everything beyond the margin keeps
its exact stored bits whatever the input's orientation, spacing, dtype or NIfTI scaling.

Outputs per case (in ``output_dir/<case>/``, default the manifest's folder): ``synthetic.nii.gz`` (input
grid, dtype and NIfTI scaling) and ``preview.png``; ``label_original.nii.gz`` (0/1/2 on the input grid)
only when the manifest does not list LMNet's already. ``output_dir/manifest.json`` is the manifest with
``synthetic_image``, ``label_original``, ``preview`` and ``linet`` (settings and weights hashes) per case
(:meth:`LesionInpainter.extend_case`, the iteration of the bundle's
:class:`~lesiondiffusion.pipelines.cases.CaseEvaluator`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from lesiondiffusion import autoencoder as ae
from lesiondiffusion.attributes import margin_sigma_mm
from lesiondiffusion.conditioning import lesion_attributes
from lesiondiffusion.diffusion import DiffusionSampler
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.geometry import read_geometry, to_input_grid
from lesiondiffusion.io import (
    PathLike,
    StoredImage,
    file_sha256,
    load_nifti,
    read_nifti_array,
    read_stored,
    voxel_spacing,
)
from lesiondiffusion.labels import LESION_LABEL, label_ids, label_table, mask_bounds
from lesiondiffusion.manifest import CaseEntry
from lesiondiffusion.networks.linet import NoiseOnly, intensity_prior, latent_mask
from lesiondiffusion.networks.weights import load_weights, require_weights
from lesiondiffusion.paste import paste, save_like
from lesiondiffusion.pipelines.cases import lesion_seed
from lesiondiffusion.preview import request_caption, write_preview
from lesiondiffusion.transforms import CTIntensityMap
from lesiondiffusion.vocabulary import CT_VALUE, SURFACE

logger = logging.getLogger(__name__)

SYNTHETIC_NAME = "synthetic.nii.gz"
LABEL_ORIGINAL_NAME = "label_original.nii.gz"
PREVIEW_NAME = "preview.png"
AIR_UNIT = 0.0  # padding value: -1000 HU on the [0, 1] intensity map


# ---- crop geometry on the standardised grid --------------------------------------------------------
def crop_window(
    mask: np.ndarray, min_size: Sequence[int], context: int | Sequence[int], multiple: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(start, size)`` of a crop centred on the mask's bounding box.

    The size is at least ``min_size``, at least the box plus ``context`` voxels on each side, and a
    multiple of ``multiple`` (what the VQ-GAN and the UNet need). ``start`` may be negative or the crop
    may end beyond the array: :func:`crop_padded` pads.
    """
    bounds = mask_bounds(mask)
    if bounds is None:
        raise ValueError("empty lesion mask")
    lo, hi = bounds[0], bounds[1] + 1
    need = np.maximum(np.asarray(min_size, dtype=int), (hi - lo) + 2 * np.asarray(context, dtype=int))
    size = -(-need // multiple) * multiple
    start = (lo + hi) // 2 - size // 2
    return start.astype(int), size.astype(int)


def crop_padded(
    array: Any,
    start: Sequence[int],
    size: Sequence[int],
    fill: float = 0.0,
    dtype: Any = np.float32,
    edge: bool = False,
) -> np.ndarray:
    """``array[start:start+size]`` with ``fill`` where the window leaves the array (``edge``: the nearest
    voxel inside instead, so a scan cut through an organ is not framed by air the networks would paint in).

    ``array`` may be a nibabel array proxy: only the overlapping part is read.
    """
    out = np.full(tuple(int(s) for s in size), fill, dtype=dtype)
    src, dst = [], []
    for a, n, s in zip(start, size, array.shape):
        lo, hi = max(int(a), 0), min(int(a) + int(n), int(s))
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(a), hi - int(a)))
    inner = np.asarray(array[tuple(src)], dtype=dtype)
    if edge:
        pad = [(d.start, int(n) - d.stop) for d, n in zip(dst, size)]
        return np.pad(inner, pad, mode="edge")
    out[tuple(dst)] = inner
    return out


def shifted_affine(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """Affine of a window whose first voxel is ``start`` of the grid ``affine``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(start, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ shift


def split_lesions(label: np.ndarray, affine: np.ndarray, centres_world: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One mask per lesion: each connected lesion component goes to the nearest lesion centre (world mm).

    LMNet keeps lesions apart, so a component never belongs to two lesions.
    """
    lesion = np.asarray(label) == LESION_LABEL
    if len(centres_world) == 1:
        return [lesion]
    components, n = ndimage.label(lesion)
    masks = [np.zeros(lesion.shape, dtype=bool) for _ in centres_world]
    if n == 0:
        return masks
    centroids = np.asarray(ndimage.center_of_mass(lesion, components, range(1, n + 1)), dtype=np.float64).reshape(n, 3)
    world = centroids @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    centres = np.stack([np.asarray(c, dtype=np.float64) for c in centres_world])
    nearest = np.linalg.norm(world[:, None, :] - centres[None], axis=-1).argmin(axis=1)
    for comp, owner in enumerate(nearest, start=1):
        masks[owner] |= components == comp
    return masks


# ---- one lesion -------------------------------------------------------------------------------------
@dataclass
class LesionTiming:
    """Seconds spent per stage for one lesion (the benchmark reads these)."""

    encode: float = 0.0
    sample: float = 0.0
    decode: float = 0.0
    paste: float = 0.0

    @property
    def total(self) -> float:
        return self.encode + self.sample + self.decode + self.paste


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LesionInpainter:
    """Everything needed to paint lesions: networks, sampler and the crop/paste settings.

    Args:
        network: the trained LINet (``ConditionedDiffusionModel``: UNet + condition encoder).
        autoencoder: the trained VQ-GAN.
        sampler: a :class:`~lesiondiffusion.diffusion.DiffusionSampler` (method, steps, guidance).
        crop_size: smallest crop (voxels of the standardised grid); grown for large lesions.
        context_mm: known tissue kept around the lesion's box inside the crop.
        margin_mm, feather_mm: the paste zone beyond the lesion and its feather width (input grid, mm).
        noise_sigma_vox: the paste keeps the scan's own noise finer than this Gaussian (input voxels; 0: off),
            see :func:`lesiondiffusion.paste.keep_scan_noise`.
        edge_from_margin: the paste gives the lesion the edge of its report's margin class
            (:func:`lesiondiffusion.paste.shape_edge`); False keeps the network's edge.
        mask_head: the network also outputs a mask logit (dropped for sampling).
        calibration_rounds: encode-decode rounds that set the prior's fill (:meth:`prior_fill`; 0: the
            CT value as it is).
        calibration_limit_hu: the most the fill may differ from the CT value.
        min_latent_width: a lesion narrower than this many latent voxels along an axis is below what the
            autoencoder renders (6-7 mm lung nodules, about 1.5 latent voxels, came back with voxels 200-400 HU
            off their fill); it is painted from its intensity prior (:meth:`inpaint_lesion`). 0: always the networks.
        seed: base seed; each lesion draws its noise from its own seeded generator.
        device: where the networks run.
        provenance: recorded in every case's ``linet`` entry (:func:`provenance`: settings, weights hashes).
    """

    network: nn.Module
    autoencoder: nn.Module
    sampler: DiffusionSampler
    crop_size: Sequence[int] = (64, 64, 64)
    context_mm: float = 8.0
    margin_mm: float = 3.0
    feather_mm: float = 2.0
    noise_sigma_vox: float = 1.0
    edge_from_margin: bool = True
    mask_head: bool = False
    calibration_rounds: int = 2
    calibration_limit_hu: float = 150.0
    min_latent_width: int = 2
    seed: int = 0
    device: str | torch.device = "cpu"
    provenance: dict[str, Any] = field(default_factory=dict)
    timings: list[LesionTiming] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.network = self.network.to(self.device).eval()
        self.autoencoder = self.autoencoder.to(self.device).eval()
        self.factor = ae.downsample_factor(self.autoencoder)
        levels = len(getattr(getattr(self.network, "unet", self.network), "block_out_channels", (1, 1, 1)))
        self.multiple = self.factor * 2 ** (levels - 1)
        self.latent_channels = (
            int(self.autoencoder.embedding_dim) if hasattr(self.autoencoder, "embedding_dim") else None
        )
        self.model: nn.Module = self.network
        if self.mask_head:
            self.model = NoiseOnly(self.network, int(self.autoencoder.embedding_dim))
        self.to_unit = CTIntensityMap()
        self.to_hu = CTIntensityMap(inverse=True)

    @property
    def spec(self):
        """The condition layout the network's encoder was built with (fields, width)."""
        encoder = getattr(self.network, "encoder", None)
        if encoder is None or not hasattr(encoder, "spec"):
            raise LesionDiffusionError("the LINet network has no condition encoder; it cannot honour the report")
        return encoder.spec

    def condition(self, report: PathLike, organ_id: int | None) -> torch.Tensor:
        """The report's image attributes as the condition tensor ``[1, n_fields, width]``."""
        attributes = lesion_attributes(report, organ_id)
        return self.spec.encode(attributes, report)[None]

    def ct_value(self, condition: torch.Tensor) -> float | None:
        """The CT value (HU) a condition tensor asks for, None when the report has none."""
        if CT_VALUE not in self.spec.fields:
            return None
        row = condition[0, self.spec.fields.index(CT_VALUE)]
        return float(row[1]) if float(row[0]) > 0.5 else None

    def _rendered_hu(self, image_unit: torch.Tensor, lesion: torch.Tensor, fill_hu: float) -> float:
        """Median HU inside the lesion of the prior filled at ``fill_hu`` once encoded and decoded."""
        decoded = ae.reconstruct(self.autoencoder, intensity_prior(image_unit, lesion, fill_hu))
        return float(torch.as_tensor(self.to_hu(decoded))[lesion > 0.5].median())

    @torch.no_grad()
    def prior_fill(self, image_unit: torch.Tensor, lesion: torch.Tensor, target_hu: float | None) -> float | None:
        """The fill HU at which the autoencoder renders the prior's lesion at ``target_hu``.

        The VQ-GAN is lossy: a flat lesion comes back with part of its contrast to the surrounding
        tissue lost (a colon lesion filled at 65 HU, 25 HU above the wall, came back at 43 HU). Each of
        ``calibration_rounds`` rounds encodes and decodes the prior, measures the lesion's median HU and
        moves the fill by the miss (the first round one for one, later rounds along the response
        measured so far); the fill stays within ``calibration_limit_hu`` of the target.
        """
        if target_hu is None:
            return None
        fill, previous = target_hu, None
        for _ in range(self.calibration_rounds):
            got = self._rendered_hu(image_unit, lesion, fill)
            miss = target_hu - got
            if abs(miss) < 0.5:
                break
            slope = 1.0
            if previous is not None and abs(fill - previous[0]) > 1e-6:
                measured = (got - previous[1]) / (fill - previous[0])
                slope = measured if measured > 0.1 else 1.0  # a response the autoencoder follows
            previous = (fill, got)
            fill = float(
                np.clip(
                    fill + miss / slope, target_hu - self.calibration_limit_hu, target_hu + self.calibration_limit_hu
                )
            )
        return float(np.clip(fill, -1000.0, 1000.0))

    @torch.no_grad()
    def inpaint_crop(
        self, image_unit: torch.Tensor, lesion: torch.Tensor, condition: torch.Tensor, seed: int
    ) -> tuple[torch.Tensor, LesionTiming]:
        """Regenerate the lesion region of one crop: ``[1, 1, *S]`` in [0, 1] in, the same shape out.

        The intensity prior is filled at the condition's CT value (without one, at the crop's own mean
        under the mask: the tissue that is there).
        """
        timing = LesionTiming()
        t0 = time.perf_counter()
        image_unit, lesion = image_unit.to(self.device).float(), lesion.to(self.device).float()
        z = ae.encode(self.autoencoder, image_unit)
        prior = ae.encode(
            self.autoencoder,
            intensity_prior(image_unit, lesion, self.prior_fill(image_unit, lesion, self.ct_value(condition))),
        )
        m = latent_mask(lesion, self.factor)
        _sync(self.device)
        t1 = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn(tuple(z.shape), generator=generator, dtype=torch.float32)
        extra = torch.cat([m, prior], dim=1)
        residual = self.sampler(
            self.model,
            condition=condition.to(self.device),
            extra=extra,
            known=z - prior,
            known_mask=1.0 - m,
            noise=noise,
        )
        sampled = prior + residual  # equals z wherever the latent is known
        _sync(self.device)
        t2 = time.perf_counter()
        out = ae.decode(self.autoencoder, sampled, image_unit.shape[2:]).clamp(0.0, 1.0)
        _sync(self.device)
        t3 = time.perf_counter()
        timing.encode, timing.sample, timing.decode = t1 - t0, t2 - t1, t3 - t2
        return out.cpu(), timing

    def inpaint_lesion(
        self,
        image_proxy: Any,
        std_affine: np.ndarray,
        lesion_std: np.ndarray,
        condition: torch.Tensor,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray, LesionTiming]:
        """Inpaint one lesion on the standardised grid: returns the crop in HU, its affine, and timings.

        A lesion narrower than ``min_latent_width`` latent voxels comes back as its intensity prior (the
        crop with the lesion filled at the report's CT value), without the networks: the paste gives it the
        scan's noise and the edge of its margin class, as it does every lesion.
        """
        # known tissue around the lesion: at least the paste margin plus a little, in voxels of this grid
        context = np.ceil(max(self.context_mm, self.margin_mm + 2.0) / voxel_spacing(std_affine)).astype(int)
        start, size = crop_window(lesion_std, self.crop_size, context, self.multiple)
        hu = crop_padded(image_proxy, start, size, edge=True)
        mask = crop_padded(lesion_std, start, size, fill=0.0)
        unit = torch.as_tensor(self.to_unit(hu))[None, None].float()
        lesion = torch.as_tensor(mask)[None, None]
        if self.below_latent_resolution(lesion_std):
            decoded, timing = intensity_prior(unit, lesion, self.ct_value(condition)), LesionTiming()
        else:
            decoded, timing = self.inpaint_crop(unit, lesion, condition, seed)
        patch_hu = np.asarray(self.to_hu(decoded[0, 0].numpy()), dtype=np.float64)
        return patch_hu, shifted_affine(std_affine, start), timing

    def paste_lesion(
        self, original: StoredImage, mask: np.ndarray, patch_hu: np.ndarray, patch_affine: np.ndarray,
        surface: str | None, network_mask: np.ndarray, raw: np.ndarray, protect: np.ndarray | None = None,
        margin_mm: float | None = None, feather_mm: float | None = None,
    ) -> np.ndarray:  # fmt: skip
        """Paste one inpainted lesion (``mask`` on the scan's grid) into ``raw``: the margin zone and feather,
        the scan's noise (in full under a lesion painted from its prior, judged on ``network_mask``, the
        lesion on the networks' grid), and with ``edge_from_margin`` the edge of the ``surface`` margin class."""
        return paste(
            original, mask, patch_hu, patch_affine,
            self.margin_mm if margin_mm is None else margin_mm, self.feather_mm if feather_mm is None else feather_mm,
            raw=raw, protect=protect, noise_sigma_vox=self.noise_sigma_vox,
            edge_sigma_mm=margin_sigma_mm(surface) if self.edge_from_margin else None,
            patch_noise_std=0.0 if self.below_latent_resolution(network_mask) else None,
        )  # fmt: skip

    def below_latent_resolution(self, lesion: np.ndarray) -> bool:
        """Whether ``lesion`` (standardised grid) is narrower than ``min_latent_width`` latent voxels on an axis."""
        bounds = mask_bounds(np.asarray(lesion) > 0.5)
        if bounds is None:
            return False
        width = bounds[1] - bounds[0] + 1
        return bool(np.any(width < self.min_latent_width * self.factor))

    # ---- one case -----------------------------------------------------------------------------------
    def process_case(self, case: CaseEntry, out_dir: Path) -> dict[str, Any]:
        """Inpaint every lesion of ``case`` and write its outputs into ``out_dir``; returns the new paths."""
        if case.source_image is None or case.geometry is None or case.image is None:
            raise InputError(None, f"case {case.case}: the manifest lacks source_image, geometry or image")
        if case.label is None:
            raise InputError(None, f"case {case.case}: no lesion label map yet (run LMNet first)")
        if not case.lesions:
            raise InputError(None, f"case {case.case}: no lesions listed")
        geometry = read_geometry(case.geometry)
        original = read_stored(case.source_image)
        if tuple(original.raw.shape) != tuple(geometry.shape) or not np.allclose(
            original.affine, geometry.input_affine, atol=1e-4
        ):
            raise InputError(
                case.source_image,
                "the source image no longer matches its geometry record (changed since preprocessing?)",
            )
        std_img = load_nifti(case.image)
        std_affine = np.asarray(std_img.affine, dtype=np.float64)
        label_std, label_img = read_nifti_array(case.label)
        if label_std.shape != std_img.shape[:3] or not np.allclose(label_img.affine, std_affine, atol=1e-4):
            raise InputError(case.label, f"label map does not lie on the standardised image's grid ({case.image})")
        label_std = label_ids(label_std).astype(np.uint8, copy=False)
        if case.label_original is not None:
            label_in, _ = read_nifti_array(case.label_original)
            if label_in.shape != original.raw.shape:
                raise InputError(
                    case.label_original, f"shape {label_in.shape} differs from the source image's {original.raw.shape}"
                )
            label_in = label_ids(label_in).astype(np.uint8, copy=False)
        else:
            label_in = to_input_grid(label_std, geometry, mode="nearest").astype(np.uint8)

        centres = [
            std_affine[:3, :3] @ np.asarray(les.box.centre, dtype=np.float64) + std_affine[:3, 3]
            for les in case.lesions
        ]
        masks_std = split_lesions(label_std, std_affine, centres)
        masks_in = split_lesions(label_in, original.affine, centres)
        all_lesions_in = label_in == LESION_LABEL
        raw = original.raw.copy(order="K")  # in the file's memory order: a C-order copy of a NIfTI volume is slow
        for j, (lesion, m_std, m_in) in enumerate(zip(case.lesions, masks_std, masks_in)):
            if not m_std.any() or not m_in.any():
                raise InputError(case.label, f"lesion {j} (organ {lesion.organ_id}) has no voxels in the label map")
            condition = self.condition(lesion.report, lesion.organ_id)
            patch_hu, patch_affine, timing = self.inpaint_lesion(
                std_img.dataobj, std_affine, m_std, condition, lesion_seed(self.seed, case.case, j)
            )
            t0 = time.perf_counter()
            surface = lesion_attributes(lesion.report, lesion.organ_id).get(SURFACE)
            self.paste_lesion(original, m_in, patch_hu, patch_affine, surface, m_std, raw, all_lesions_in & ~m_in)
            timing.paste = time.perf_counter() - t0
            self.timings.append(timing)
            logger.info(
                "%s lesion %d: encode %.2fs, sample %.2fs, decode %.2fs, paste %.2fs",
                case.case,
                j,
                timing.encode,
                timing.sample,
                timing.decode,
                timing.paste,
            )

        folder = out_dir / case.case
        synthetic = save_like(folder / SYNTHETIC_NAME, raw, original)
        label_out = case.label_original
        if label_out is None:
            label_out = save_like(folder / LABEL_ORIGINAL_NAME, label_in, original, scaled=False)
        organ = label_table().name(case.lesions[0].organ_id)  # picks the preview's window (lung or soft tissue)
        preview = write_preview(folder / PREVIEW_NAME, original.raw, raw, all_lesions_in, original.affine, slope=original.slope, inter=original.inter,
                                organ=organ, caption=request_caption(case.extra.get("request") or {}))  # fmt: skip
        return {"synthetic_image": synthetic, "label_original": label_out, "preview": preview}

    def extend_case(self, case: CaseEntry, out_dir: Path) -> CaseEntry:
        """Inpaint ``case`` into ``out_dir/<case>/``; the entry gains the synthetic image, the label map on the
        input grid, the preview and the run's :attr:`provenance` with the network calls spent."""
        calls = self.sampler.network_calls
        outputs = self.process_case(case, out_dir)
        linet = {**self.provenance, "network_calls": self.sampler.network_calls - calls}
        extra = {**case.extra, "preview": _relative(outputs["preview"], out_dir), "linet": linet}
        return replace(
            case, synthetic_image=outputs["synthetic_image"], label_original=outputs["label_original"], extra=extra
        )


# ---- provenance -------------------------------------------------------------------------------------
def provenance(settings: dict[str, Any], weights: dict[str, PathLike]) -> dict[str, Any]:
    """What each case records of the run: its ``settings`` and the ``{setting: path}`` weights used, with
    their SHA-256."""
    hashes = {k: {"path": str(Path(w).resolve()), "sha256": file_sha256(w)} for k, w in weights.items()}
    return {"settings": dict(settings), "weights": hashes}


def _relative(path: PathLike, base: Path) -> str:
    import os

    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def load_network(network: nn.Module, weights: PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Trained LINet weights (a training run's ``model.pt``; a checkpoint's EMA weights also do) on ``device``, in eval mode."""
    require_weights(weights, "weights", "LINet")
    load_weights(network, weights, "weights", "LINet")
    return network.to(device).eval()


def check_settings(
    manifest: str,
    weights: str,
    vqgan_weights: str,
    sampler: str,
    steps: int,
    margin_mm: float,
    feather_mm: float,
) -> None:
    """Check the run's settings before anything is built; each problem is one line naming the setting."""
    from lesiondiffusion.diffusion import SAMPLERS

    if not manifest:
        raise InputError(None, "no manifest given; pass --manifest FILE (the manifest.json written by the LMNet stage)")
    if not Path(manifest).is_file():
        raise InputError(
            manifest, "manifest not found; pass --manifest FILE (the manifest.json written by the LMNet stage)"
        )
    require_weights(weights, "weights", "LINet")
    require_weights(vqgan_weights, "vqgan_weights", "VQ-GAN")
    if sampler not in SAMPLERS:
        raise LesionDiffusionError(f"sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LesionDiffusionError(f"steps must be a positive integer, not {steps!r}")
    if not 0 <= float(feather_mm) <= float(margin_mm):
        raise LesionDiffusionError(
            f"need 0 <= feather_mm <= margin_mm, got feather_mm={feather_mm}, margin_mm={margin_mm}"
        )
