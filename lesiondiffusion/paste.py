"""Paste an inpainted patch back into the ORIGINAL CT, on the input's own grid.

The networks work on the standardised grid (RAS, 1 mm). Their output, a decoded crop around the
lesion, is brought back to the user's scan like this:

1. the *zone* is the lesion mask on the input grid dilated by ``margin_mm`` (a physical distance, so
   anisotropic spacing and any orientation give the same neighbourhood);
2. a blend weight is 1 up to ``margin_mm - feather_mm`` from the lesion, then falls along a cosine
   ramp to exactly 0 at ``margin_mm``;
3. the crop is resampled (MONAI ``SpatialResample``, trilinear) at the input voxels of the zone's
   bounding box only, through the two affines: the original voxels themselves are never resampled;
4. the scan's own noise is kept: the original's high-pass part (its noise and fine texture at those
   very voxels, finer than a Gaussian of ``noise_sigma_vox`` input voxels) is added to the patch, so
   the lesion is as noisy as the tissue it replaced rather than as smooth as a VQ-GAN decoding (on a
   real CT that smoothness gave the lesion away at a glance). The patch itself is not filtered: a
   low-pass of it would spread a small lesion's contrast over its neighbours on a coarse grid;
5. with a margin class in the report, the change gets that class's edge (:func:`shape_edge`): a step
   for a well-defined margin, a ramp a few mm wide for an ill-defined one;
6. ``out = original + w * (patch - original)`` is written only where ``w > 0``, in the input's stored
   dtype (and NIfTI scaling), so every voxel farther than the margin keeps its exact stored bits.

Only the zone's bounding box is ever processed, so the memory needed does not grow with the scan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from scipy import ndimage
from scipy.special import ndtr

from lesiondiffusion.errors import InputError
from lesiondiffusion.io import PathLike, atomic_path, load_nifti

logger = logging.getLogger(__name__)

Box = tuple[slice, slice, slice]


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Physical size of a voxel along each array axis (column norms of the affine)."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def zone_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> Box | None:
    """Bounding box of ``mask`` grown by ``margin_mm`` (per-axis voxel count), clipped to the array.

    None when the mask is empty.
    """
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    box = []
    for axis, (coords, sp) in enumerate(zip(idx, spacing)):
        grow = int(math.ceil(margin_mm / float(sp))) + 1
        box.append(slice(max(int(coords.min()) - grow, 0), min(int(coords.max()) + grow + 1, mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def feather_weights(mask: np.ndarray, spacing: Sequence[float], margin_mm: float, feather_mm: float) -> np.ndarray:
    """Blend weight in [0, 1] for every voxel of ``mask``'s array (pass a box around the lesion).

    1 on the lesion and up to ``margin_mm - feather_mm`` from it, a cosine ramp down to exactly 0 at
    ``margin_mm``, 0 beyond. Distances are Euclidean, in mm, from voxel centre to nearest lesion voxel.
    """
    if margin_mm < 0 or feather_mm < 0 or feather_mm > margin_mm:
        raise ValueError(f"need 0 <= feather_mm <= margin_mm, got margin {margin_mm}, feather {feather_mm}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32)
    dist = ndimage.distance_transform_edt(~mask, sampling=[float(s) for s in spacing])
    inner = margin_mm - feather_mm
    w = np.zeros(mask.shape, dtype=np.float64)
    w[dist <= inner] = 1.0
    if feather_mm > 0:
        ramp = (dist > inner) & (dist < margin_mm)
        w[ramp] = 0.5 * (1.0 + np.cos(np.pi * (dist[ramp] - inner) / feather_mm))
    # a vanishing tail weight would still flip the last bit of float voxels at the boundary
    w[(dist >= margin_mm) | (w < 1e-6)] = 0.0
    w[mask] = 1.0
    return w.astype(np.float32)


def outside_margin(mask: np.ndarray, affine: np.ndarray, margin_mm: float) -> np.ndarray:
    """Voxels farther than ``margin_mm`` from the lesion ``mask``: those a paste must leave bit-identical."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.ones(mask.shape, dtype=bool)
    dist = ndimage.distance_transform_edt(~mask, sampling=voxel_spacing(affine).tolist())
    return dist >= margin_mm


def box_affine(affine: np.ndarray, box: Box) -> np.ndarray:
    """Affine of the sub-array ``array[box]`` (its first voxel becomes the origin)."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start or 0 for s in box]
    return np.asarray(affine, dtype=np.float64) @ shift


def resample_patch(
    patch: np.ndarray, patch_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear samples of ``patch`` at the voxel centres of the grid (``dst_affine``, ``dst_shape``).

    Returns the values and a boolean array, True where the voxel centre lies inside the patch's
    voxel-centre extent (elsewhere the value is only a border extrapolation and must not be used).
    """
    src = MetaTensor(torch.as_tensor(np.asarray(patch, dtype=np.float32))[None], affine=torch.as_tensor(patch_affine))
    out = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64), spatial_size=tuple(int(s) for s in dst_shape)
    )
    values = np.asarray(out.detach().cpu().numpy()[0], dtype=np.float64)
    # where each destination voxel centre falls in the patch's voxel coordinates
    to_patch = np.linalg.inv(np.asarray(patch_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in dst_shape], indexing="ij"), axis=-1).reshape(-1, 3)
    coords = grid @ to_patch[:3, :3].T + to_patch[:3, 3]
    eps = 1e-4
    inside = np.all((coords >= -eps) & (coords <= np.asarray(patch.shape) - 1 + eps), axis=1)
    return values, inside.reshape(tuple(dst_shape))


@dataclass(frozen=True)
class StoredImage:
    """A NIfTI scan as stored: raw voxels (on-disk dtype) and the scaling that turns them into HU."""

    raw: np.ndarray
    slope: float
    inter: float
    image: nib.Nifti1Image

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.image.affine, dtype=np.float64)

    def to_hu(self, box: Box | None = None) -> np.ndarray:
        """Scaled values (HU) of the whole array or of ``box``, as float64."""
        raw = self.raw if box is None else self.raw[box]
        return raw.astype(np.float64) * self.slope + self.inter

    def from_hu(self, hu: np.ndarray) -> np.ndarray:
        """HU -> stored values of the raw dtype (rounded and clipped for integer dtypes)."""
        stored = (np.asarray(hu, dtype=np.float64) - self.inter) / self.slope
        dtype = self.raw.dtype
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return np.clip(np.rint(stored), info.min, info.max).astype(dtype)
        if dtype == np.bool_:
            return stored > 0.5
        return stored.astype(dtype)


def keep_scan_noise(
    patch: np.ndarray, original: np.ndarray, sigma_vox: float, where: np.ndarray | None = None
) -> np.ndarray:
    """The patch plus the original's high-pass part (noise, fine texture), scaled to make up the noise the
    patch lacks.

    Both are on the same grid (the input's); a high-pass is an array minus its Gaussian of ``sigma_vox``
    voxels, about the correlation length of CT noise on its own grid. Over ``where`` (the lesion; default
    everywhere) the original's high-pass is scaled by ``sqrt(1 - s_patch^2 / s_original^2)`` of their
    standard deviations, so the sum is about as noisy as the tissue: all of it under a smooth decoded patch,
    none under a patch already as noisy. The patch's own values are never filtered (a low-pass of a small
    lesion on a coarse grid would spread its contrast over its neighbours).
    """

    def high(a: np.ndarray) -> np.ndarray:
        return a - ndimage.gaussian_filter(a, sigma=float(sigma_vox), mode="nearest")

    noise = high(original)
    region = (
        np.asarray(where, dtype=bool) if where is not None and np.asarray(where).any() else np.ones(noise.shape, bool)
    )
    s_orig, s_patch = float(noise[region].std()), float(high(patch)[region].std())
    scale = math.sqrt(max(1.0 - (s_patch / s_orig) ** 2, 0.0)) if s_orig > 0 else 0.0
    return patch + scale * noise


def signed_distance_mm(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) to the border of ``mask``, positive inside, negative outside; the border lies half a
    voxel (the finest spacing) beyond the outermost mask voxels."""
    mask = np.asarray(mask, dtype=bool)
    half = 0.5 * float(min(spacing))
    inside = ndimage.distance_transform_edt(mask, sampling=spacing) - half
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing) - half
    return np.where(mask, inside, -outside)


def shape_edge(delta: np.ndarray, mask: np.ndarray, spacing: Sequence[float], sigma_mm: float) -> np.ndarray:
    """The change ``delta`` (HU) with the edge profile of a margin of ``sigma_mm``.

    With ``s`` the signed distance to the border (:func:`signed_distance_mm`) and ``c`` the change's median
    over the lesion's inner half, the mean change at each distance near the border becomes
    ``c * Phi(s / sigma)`` (``Phi``: normal CDF; 0.5 on the border): outside the lesion the change is that
    profile alone, on the scan's own voxels; inside, within ``2 sigma`` plus a voxel of the border, each
    shell of equal distance is shifted to the profile (fully in the band's outer half, fading out over its
    inner half), so the painted texture stays; deeper, ``delta`` is kept. A well-defined margin (sigma well under a voxel) becomes a step, an ill-defined one a ramp a few
    mm wide: the edge a margin class describes, whatever edge the network painted.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return delta
    s = signed_distance_mm(mask, spacing)
    depth = s[mask]
    inner = mask & (s >= np.median(depth))
    core = float(np.median(delta[inner]))
    target = core * ndtr(s / max(float(sigma_mm), 1e-3))
    band = 2.0 * float(sigma_mm) + float(min(spacing))
    out = np.where(mask, delta, target)
    near = mask & (s < band)
    if near.any():
        step = 0.5 * float(min(spacing))
        shell = np.floor(s[near] / step).astype(np.int64)
        shell -= shell.min()
        counts = np.bincount(shell)
        mean = np.bincount(shell, weights=delta[near]) / np.maximum(counts, 1)
        keep = np.clip(2.0 * s[near] / band - 1.0, 0.0, 1.0)  # all profile up to half the band, then the network's
        out[near] = delta[near] + (1.0 - keep) * (target[near] - mean[shell])
    return out


def read_stored(path: PathLike) -> StoredImage:
    """Read a 3D NIfTI scan keeping its stored dtype and scaling (never modified)."""
    img = load_nifti(path, ndim=3)
    try:
        proxy = img.dataobj
        raw = np.asarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    except Exception as e:
        raise InputError(path, f"unreadable NIfTI voxels ({type(e).__name__}: {e})") from None
    raw = raw.reshape(raw.shape[:3])
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return StoredImage(raw, slope, inter, img)  # type: ignore[arg-type]


def save_like(path: PathLike, data: np.ndarray, reference: StoredImage, scaled: bool = True) -> Path:
    """Write ``data`` atomically with the reference's header: same affine, qform/sform and shape.

    ``scaled``: ``data`` holds stored values of the reference's dtype and keeps its NIfTI scaling (the
    synthetic CT); otherwise ``data`` is written as is, in its own dtype, unscaled (a label map).
    """
    if data.shape != reference.raw.shape:
        raise ValueError(f"shape {data.shape} differs from the reference's {reference.raw.shape}")
    if scaled and data.dtype != reference.raw.dtype:
        raise ValueError(f"dtype {data.dtype} differs from the reference's {reference.raw.dtype}")
    img = nib.Nifti1Image(data, None, header=reference.image.header.copy())
    img.set_data_dtype(data.dtype)
    if scaled:
        img.header.set_slope_inter(reference.slope, reference.inter)
    else:
        img.header.set_slope_inter(1.0, 0.0)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def paste(
    original: StoredImage,
    lesion_mask: np.ndarray,
    patch_hu: np.ndarray,
    patch_affine: np.ndarray,
    margin_mm: float = 3.0,
    feather_mm: float = 2.0,
    raw: np.ndarray | None = None,
    protect: np.ndarray | None = None,
    noise_sigma_vox: float = 1.0,
    edge_sigma_mm: float | None = None,
) -> np.ndarray:
    """Blend ``patch_hu`` (HU on its own grid ``patch_affine``) into the original's stored voxels.

    Writes into ``raw`` (default: a copy of ``original.raw``, so several lesions can be pasted in turn)
    only inside the lesion dilated by ``margin_mm`` with a ``feather_mm`` cosine feather, and returns it.
    Zone voxels outside the patch's extent, and those of ``protect`` (e.g. other lesions), are left
    untouched (the former with a warning). ``noise_sigma_vox`` > 0 keeps the original's noise under the
    patch (:func:`keep_scan_noise`); 0 pastes the patch as it is. ``edge_sigma_mm`` gives the change
    the edge of that margin (:func:`shape_edge`, from the report's margin class); None keeps the patch's.
    """
    out = original.raw.copy() if raw is None else raw
    mask = np.asarray(lesion_mask, dtype=bool)
    if mask.shape != out.shape:
        raise ValueError(f"lesion mask shape {mask.shape} differs from the image's {out.shape}")
    spacing = voxel_spacing(original.affine)
    box = zone_box(mask, spacing, margin_mm)
    if box is None:
        logger.warning("empty lesion mask: nothing pasted")
        return out
    weights = feather_weights(mask[box], spacing, margin_mm, feather_mm).astype(np.float64)
    shape = weights.shape
    values, inside = resample_patch(patch_hu, patch_affine, box_affine(original.affine, box), shape)
    uncovered = (weights > 0) & ~inside
    if uncovered.any():
        logger.warning("%d zone voxels lie outside the inpainted crop and are left unchanged", int(uncovered.sum()))
        weights[uncovered] = 0.0
    if protect is not None:
        weights[np.asarray(protect, dtype=bool)[box] & ~mask[box]] = 0.0
    write = weights > 0
    current = out[box].astype(np.float64) * original.slope + original.inter
    if noise_sigma_vox > 0:
        values = keep_scan_noise(np.where(inside, values, current), current, noise_sigma_vox, where=mask[box] & inside)
    if edge_sigma_mm is not None:
        values = current + shape_edge(np.where(inside, values - current, 0.0), mask[box], spacing, edge_sigma_mm)
    blended = current[write] + weights[write] * (values[write] - current[write])
    sub = out[box]
    sub[write] = original.from_hu(blended)
    out[box] = sub
    return out
