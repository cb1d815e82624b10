"""Regions of the standardised grid (RAS, 1 mm) computed without standardising the whole scan (design 4.1).

The preprocess chain (``Orientation`` + ``Spacing``) maps a scan onto one grid; :func:`standard_grid` finds
that grid's affine and shape from the header alone (MONAI's lazy transforms: no voxel is touched), and
:func:`resample_region` resamples only a box of it from the few input voxels the box needs, with the same
MONAI resampler and padding as the whole-scan chain. So the organ's neighbourhood comes out as the same
voxels the whole standardised scan would hold there, at a fraction of the time and memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing, SpatialResample


def standard_grid(
    affine: np.ndarray, shape: Sequence[int], axcodes: str = "RAS", pixdim: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The affine and shape that ``Orientation(axcodes)`` + ``Spacing(pixdim)`` give a volume of this grid."""
    proxy = MetaTensor(
        torch.zeros(1).expand(1, *(int(s) for s in shape)), affine=torch.as_tensor(affine, dtype=torch.float64)
    )
    out = Spacing(pixdim=pixdim, lazy=True)(Orientation(axcodes=axcodes, labels=None, lazy=True)(proxy))
    new_affine = np.asarray(out.peek_pending_affine(), dtype=np.float64)
    new_shape = tuple(int(s) for s in out.peek_pending_shape())
    return new_affine, new_shape  # type: ignore[return-value]


def _translate(start: Sequence[int]) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = np.asarray(start, dtype=np.float64)
    return t


def box_on_grid(
    lo: Sequence[int],
    hi: Sequence[int],
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    margin: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The index box ``[lo, hi)`` of the ``src`` grid as an index box of the ``dst`` grid, grown by ``margin``
    ``dst`` voxels on every side and clipped to ``dst_shape``."""
    to_dst = np.linalg.inv(dst_affine) @ src_affine
    corners = np.array([[*c, 1.0] for c in product(*[(a - 0.5, b - 0.5) for a, b in zip(lo, hi)])]).T
    pts = (to_dst @ corners)[:3]
    start = np.maximum(np.floor(pts.min(axis=1) - margin), 0).astype(int)
    stop = np.minimum(np.ceil(pts.max(axis=1) + margin) + 1, np.asarray(dst_shape)).astype(int)
    return start, np.maximum(stop, start + 1)


def resample_region(
    volume: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    start: Sequence[int],
    stop: Sequence[int],
    mode: str = "bilinear",
    scale: tuple[float, float] = (1.0, 0.0),
) -> np.ndarray:
    """Voxels ``[start, stop)`` of the ``dst`` grid (float32), resampled from ``volume`` (on the ``src`` grid).

    Only the input voxels that box needs (plus two for interpolation) are read; ``scale`` (slope,
    intercept) is applied to them first. Beyond the input the edge voxel repeats (``border`` padding), as
    in the whole-scan chain.
    """
    start, stop = np.asarray(start, dtype=int), np.asarray(stop, dtype=int)
    lo, hi = box_on_grid(start, stop, dst_affine, src_affine, volume.shape[:3], margin=2.0)
    crop = np.asarray(volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
    if scale != (1.0, 0.0):
        crop = crop * np.float32(scale[0]) + np.float32(scale[1])
    # the crop keeps the volume's memory order (a NIfTI's is Fortran): the resampler reads strides, no copy
    src = MetaTensor(torch.from_numpy(crop)[None], affine=torch.as_tensor(src_affine @ _translate(lo)))
    resampler = SpatialResample(mode=mode, padding_mode="border", dtype=torch.float32)
    out = resampler(
        src,
        dst_affine=torch.as_tensor(dst_affine @ _translate(start)),
        spatial_size=tuple(int(s) for s in stop - start),
    )
    return np.asarray(out[0].detach().cpu().numpy(), dtype=np.float32)
