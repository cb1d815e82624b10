"""From a sampled lesion field to one clean lesion mask (design 4.2 post-processing)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from lesiondiffusion.labels import LESION_LABEL, ORGAN_LABEL, mask_bounds

DEFAULT_THRESHOLDS = tuple(float(t) for t in np.round(np.linspace(-0.9, 0.9, 19), 2))
ELLIPSOID_FILL = math.pi / 6  # volume of an ellipsoid inscribed in its box, as a fraction of the box


def largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest face-connected component of ``mask`` and its size (empty mask: all False, 0)."""
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=bool), 0
    sizes = np.bincount(labels.ravel())[1:]
    best = int(sizes.argmax())
    return labels == best + 1, int(sizes[best])


def whole_lesions(label: np.ndarray, n_lesions: int) -> np.ndarray:
    """``label`` (0/1/2) with each lesion in one 26-connected piece, in place.

    Nearest-neighbour resampling onto a coarser grid can cut a thin part off a lesion; every piece of
    label 2 but the ``n_lesions`` largest becomes organ (1). Only the lesions' bounding box is examined.
    """
    lesion = label == LESION_LABEL
    if not lesion.any():
        return label
    lo, hi = mask_bounds(lesion)
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi, strict=True))
    pieces, n = ndi.label(lesion[box], structure=np.ones((3, 3, 3), dtype=bool))
    if n <= n_lesions:
        return label
    sizes = np.bincount(pieces.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:n_lesions] + 1
    label[box][(pieces > 0) & ~np.isin(pieces, keep)] = ORGAN_LABEL
    return label


def select_mask(
    field: np.ndarray,
    allowed: np.ndarray,
    target_volume: float,
    min_voxels: int = 8,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> np.ndarray | None:
    """Threshold sweep: the largest component (inside ``allowed``) whose volume is closest to ``target_volume``.

    ``field`` is the sampled mask in [-1, 1]; each threshold keeps ``field > t`` within ``allowed`` and
    its largest component; components smaller than ``min_voxels`` never win. None when nothing qualifies.
    The winner's enclosed holes (voxels no path outside reaches) are filled within ``allowed``: a light
    clean-up, the field itself being smooth (see :func:`lesiondiffusion.pipelines.mask_inputs.signed_distance_target`).
    """
    allowed = np.asarray(allowed, dtype=bool)
    best, best_err = None, math.inf
    for t in thresholds:
        comp, size = largest_component((field > t) & allowed)
        if size < min_voxels:
            continue
        err = abs(size - target_volume)
        if err < best_err:
            best, best_err = comp, err
    if best is not None:
        best = ndi.binary_fill_holes(best) & allowed
    return best


def scale_mask(mask: np.ndarray, centre: Sequence[int], factor: float) -> np.ndarray:
    """``mask`` scaled by ``factor`` about the voxel ``centre`` (linear interpolation, kept where >= 0.5).

    Only the scaled mask's bounding box is computed; the result has ``mask``'s shape.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    c = np.asarray(centre, dtype=np.float64)
    lo_src, hi_src = mask_bounds(mask)
    lo = np.clip(np.floor(c + (lo_src - c) * factor) - 1, 0, None).astype(int)
    hi = np.minimum(np.ceil(c + (hi_src - c) * factor) + 2, mask.shape).astype(int)
    grid = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi)), indexing="ij")
    source = [c[i] + (g - c[i]) / factor for i, g in enumerate(grid)]
    values = ndi.map_coordinates(mask.astype(np.float32), source, order=1, mode="constant", cval=0.0)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = values >= 0.5
    return out
