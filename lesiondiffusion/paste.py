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
   real CT that smoothness gave the lesion away at a glance). It is centred and softly clipped at
   :data:`NOISE_CLIP` times the scan's noise level (:func:`scan_noise_hu`, on soft tissue), so vessels
   or the diaphragm under a lesion do not show through it. The patch itself is not filtered: a
   low-pass of it would spread a small lesion's contrast over its neighbours on a coarse grid;
5. with a margin class in the report, the lesion gets that class's edge (:func:`shape_edge`): a step
   for a well-defined margin, a ramp a few mm wide for an ill-defined one;
6. ``out = original + w * (patch - original)`` is written only where ``w > 0``, in the input's stored
   dtype (and NIfTI scaling), so every voxel farther than the margin keeps its exact stored bits.

Only the zone's bounding box is ever processed, so the memory needed does not grow with the scan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from scipy import ndimage
from scipy.special import ndtr

from lesiondiffusion.io import PathLike, StoredImage, atomic_path, voxel_spacing
from lesiondiffusion.labels import mask_bounds

logger = logging.getLogger(__name__)

Box = tuple[slice, slice, slice]

# The scan noise a paste keeps is clipped at NOISE_CLIP times the scan's noise level (scan_noise_hu):
# measured on soft tissue (SOFT_TISSUE_HU) in a central block of at most NOISE_BLOCK voxels a side.
NOISE_CLIP = 3.0
SOFT_TISSUE_HU = (-100.0, 200.0)
NOISE_BLOCK = 160
MIN_NOISE_VOXELS = 500
# Rounds that move a lesion's level so that its edge keeps the lesion's median (shape_edge).
EDGE_LEVEL_ROUNDS = 2


def zone_box(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> Box | None:
    """Bounding box of ``mask`` grown by ``margin_mm`` (per-axis voxel count), clipped to the array.

    None when the mask is empty.
    """
    bounds = mask_bounds(mask)
    if bounds is None:
        return None
    box = []
    for axis, (lo, hi, sp) in enumerate(zip(*bounds, spacing)):
        grow = int(math.ceil(margin_mm / float(sp))) + 1
        box.append(slice(max(int(lo) - grow, 0), min(int(hi) + grow + 1, mask.shape[axis])))
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


def noise_level(image: StoredImage, sigma_vox: float = 1.0) -> float | None:
    """The scan's noise level (:func:`scan_noise_hu` of its central block), measured once per image and ``sigma_vox``."""
    cache = image.__dict__.setdefault("_noise_hu", {})  # a frozen dataclass: the cache sits beside its fields
    if sigma_vox not in cache:
        box = tuple(
            slice(max((n - NOISE_BLOCK) // 2, 0), max((n - NOISE_BLOCK) // 2, 0) + min(n, NOISE_BLOCK))
            for n in image.raw.shape
        )
        cache[sigma_vox] = scan_noise_hu(image.to_hu(box), sigma_vox)  # type: ignore[arg-type]
    return cache[sigma_vox]


def high_pass(a: np.ndarray, sigma_vox: float) -> np.ndarray:
    """``a`` minus its Gaussian of ``sigma_vox`` voxels: noise and fine texture."""
    return a - ndimage.gaussian_filter(a, sigma=float(sigma_vox), mode="nearest")


def scan_noise_hu(hu: np.ndarray, sigma_vox: float = 1.0) -> float | None:
    """A scan's noise level (HU): the robust spread (``1.4826 * MAD``) of its high-pass on soft-tissue
    voxels (:data:`SOFT_TISSUE_HU`) whose whole 3x3x3 neighbourhood is soft tissue; None with fewer than
    :data:`MIN_NOISE_VOXELS` of them. Soft tissue because lung's high-pass is mostly anatomy, not noise."""
    hu = np.asarray(hu, dtype=np.float32)
    soft = (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])
    core = ndimage.binary_erosion(soft, structure=np.ones((3, 3, 3), bool))
    if np.count_nonzero(core) < MIN_NOISE_VOXELS:
        return None
    residual = high_pass(hu, sigma_vox)[core]
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))


def keep_scan_noise(
    patch: np.ndarray,
    original: np.ndarray,
    sigma_vox: float,
    where: np.ndarray | None = None,
    clip_hu: float | None = None,
    patch_std: float | None = None,
) -> np.ndarray:
    """The patch plus the original's high-pass part (:func:`high_pass`: noise, fine texture), scaled to
    make up the noise the patch lacks.

    Both are on the same grid (the input's); ``sigma_vox`` is about the correlation length of CT noise on
    its own grid. ``clip_hu`` centres the original's high-pass on ``where`` and clips it softly
    (``clip * tanh(x / clip)``), so that what is added is the scan's noise and not a structure under the
    lesion (a vessel, the edge of the diaphragm). Over ``where`` (the lesion; default everywhere) it is
    scaled by ``sqrt(1 - s_patch^2 / s_original^2)`` of their high-pass spreads over ``where``: all of it
    under a smooth decoded patch, none under a patch already as noisy; ``patch_std`` gives ``s_patch``
    instead (0 for a patch known to be flat, whose edge alone would read as noise). The patch's own values
    are never filtered (a low-pass of a small lesion on a coarse grid would spread its contrast over its
    neighbours).
    """
    noise = high_pass(original, sigma_vox)
    region = (
        np.asarray(where, dtype=bool) if where is not None and np.asarray(where).any() else np.ones(noise.shape, bool)
    )
    if clip_hu is not None:
        # noise has no mean: a high-pass off zero over the lesion is the structures around it (lung beside
        # the diaphragm is all below its blur), so it is centred before the clip
        noise = clip_hu * np.tanh((noise - float(np.median(noise[region]))) / clip_hu)
    s_orig = float(noise[region].std())
    s_patch = float(high_pass(patch, sigma_vox)[region].std()) if patch_std is None else float(patch_std)
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


def shape_edge(
    values: np.ndarray, current: np.ndarray, mask: np.ndarray, spacing: Sequence[float], sigma_mm: float
) -> np.ndarray:
    """The painted ``values`` (HU) with the edge of a margin of ``sigma_mm`` against the scan's ``current`` voxels.

    With ``s`` the signed distance to the border (:func:`signed_distance_mm`) and ``v`` the painted median
    over the lesion's inner half, the lesion near its border is ``v`` plus the painted texture (``values``
    minus the mean of its shell of equal distance), blended into the scan by the profile ``Phi(s / sigma)``
    (normal CDF; 0.5 on the border): ``current + Phi * (lesion - current)``. Outside the lesion this is a
    ramp towards ``v``; inside, within ``2 sigma`` plus a voxel of the border, it is all of the lesion's
    value in the band's outer half and fades into ``values`` over its inner half; deeper, ``values`` stay.
    A well-defined margin (sigma well under a voxel) becomes a step, an ill-defined one a ramp a few mm
    wide: the edge a margin class describes, whatever edge the network painted; and what lies under a
    small lesion (a vessel, the diaphragm) does not show through it beyond what that edge lets through.
    The level ``v`` is then moved (:data:`EDGE_LEVEL_ROUNDS` rounds) until the lesion's median is that of
    the lesion with a step for an edge: a ramp inside a small ill-defined lesion would otherwise lower its
    density.
    """
    mask = np.asarray(mask, dtype=bool)
    values = np.asarray(values, dtype=np.float64)
    if not mask.any():
        return values
    s = signed_distance_mm(mask, spacing)
    inner = mask & (s >= np.median(s[mask]))
    level = float(np.median(values[inner]))
    profile = ndtr(s / max(float(sigma_mm), 1e-3))
    band = 2.0 * float(sigma_mm) + float(min(spacing))
    near = np.abs(s) < band
    step = 0.5 * float(min(spacing))
    shell = np.floor(s[near] / step).astype(np.int64)
    shell -= shell.min()
    mean = np.bincount(shell, weights=values[near]) / np.maximum(np.bincount(shell), 1)
    texture = np.zeros(values.shape)
    texture[near] = values[near] - mean[shell]  # the painted texture, carried at the lesion's level
    # all edge up to half the band inside the lesion, then the painting
    keep = np.where(mask, np.clip(2.0 * s / band - 1.0, 0.0, 1.0), 0.0)

    def edged(lesion_level: float) -> np.ndarray:
        return keep * values + (1.0 - keep) * (current + profile * (lesion_level + texture - current))

    # the edge must not change the lesion's density (a report's CT value is the whole lesion's): the
    # level moves until the median over the lesion is that of the same lesion with a step for an edge
    gain = float(np.median((keep + (1.0 - keep) * profile)[mask]))
    target = float(np.median((keep * values + (1.0 - keep) * (level + texture))[mask]))
    out = edged(level)
    for _ in range(EDGE_LEVEL_ROUNDS):
        if gain <= 0.05:
            break
        level += (target - float(np.median(out[mask]))) / gain
        out = edged(level)
    return out


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
    patch_noise_std: float | None = None,
) -> np.ndarray:
    """Blend ``patch_hu`` (HU on its own grid ``patch_affine``) into the original's stored voxels.

    Writes into ``raw`` (default: a copy of ``original.raw``, so several lesions can be pasted in turn)
    only inside the lesion dilated by ``margin_mm`` with a ``feather_mm`` cosine feather, and returns it.
    Zone voxels outside the patch's extent, and those of ``protect`` (e.g. other lesions), are left
    untouched (the former with a warning). ``noise_sigma_vox`` > 0 keeps the original's noise under the
    patch (:func:`keep_scan_noise`, clipped at :data:`NOISE_CLIP` times the scan's noise level); 0 pastes
    the patch as it is; ``patch_noise_std`` is the noise the patch carries when known (0: a flat patch).
    ``edge_sigma_mm`` gives the lesion the edge of that margin (:func:`shape_edge`, from the report's margin
    class); None keeps the patch's.
    """
    out = original.raw.copy(order="K") if raw is None else raw
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
        level = noise_level(original, noise_sigma_vox)
        values = keep_scan_noise(
            np.where(inside, values, current), current, noise_sigma_vox, where=mask[box] & inside,
            clip_hu=None if level is None else NOISE_CLIP * level, patch_std=patch_noise_std,
        )  # fmt: skip
    if edge_sigma_mm is not None:
        values = shape_edge(np.where(inside, values, current), current, mask[box], spacing, edge_sigma_mm)
    blended = current[write] + weights[write] * (values[write] - current[write])
    sub = out[box]
    sub[write] = original.from_hu(blended)
    out[box] = sub
    return out
