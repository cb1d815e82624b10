"""Preview images of a synthesis: slices through the lesion before, after, and with the lesion overlaid.

Used by LINet inference (``preview.png``: axial, coronal and sagittal rows) and by the evaluation's
contact sheet (one axial row per case). Volumes are shown in RAS orientation with square pixels, whatever
their grid's orientation and spacing; only the slices shown are converted to HU, so a whole scan costs
no extra memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from lesiondiffusion.io import PathLike, atomic_path

SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # HU shown from black to white
LUNG_WINDOW = (-1200.0, 300.0)
LESION_RGB = (255, 60, 60)
PLANES = ("axial", "coronal", "sagittal")


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` reoriented to RAS axes (flips and transposes: a view, no resampling) and its voxel
    sizes along those axes."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(volume, ornt)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return ras, zooms[ornt[:, 0].astype(int)]


def centre_of(mask: np.ndarray) -> np.ndarray:
    """The voxel nearest ``mask``'s centre of mass (the array's middle for an empty mask)."""
    centre = np.asarray(mask.shape) // 2
    for axis in range(mask.ndim):
        counts = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))  # projections: no index list
        if counts.any():
            centre[axis] = round(float(np.average(np.arange(counts.size), weights=counts)))
    return centre


def plane(volume: np.ndarray, zooms: Sequence[float], centre: Sequence[int], name: str) -> tuple[np.ndarray, tuple[float, float]]:
    """The ``name`` plane (axial, coronal or sagittal) of a RAS volume through ``centre``, turned so that
    anterior (axial) or superior is up, and its (row, column) pixel size."""
    x, y, z = (int(c) for c in centre)
    zx, zy, zz = (float(v) for v in zooms)
    if name == "axial":
        return np.flipud(volume[:, :, z].T), (zy, zx)
    if name == "coronal":
        return np.flipud(volume[:, y, :].T), (zz, zx)
    if name == "sagittal":
        return np.flipud(volume[x, :, :].T), (zz, zy)
    raise ValueError(f"unknown plane {name!r}; use one of {', '.join(PLANES)}")


def to_gray(stored: np.ndarray, window: Sequence[float], slope: float = 1.0, inter: float = 0.0) -> np.ndarray:
    """Stored values (HU = value * ``slope`` + ``inter``) as 8-bit grey levels over the HU ``window``."""
    lo, hi = window
    hu = stored.astype(np.float32) * slope + inter
    return (np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def panel(gray: np.ndarray, pixel: tuple[float, float], mask: np.ndarray | None, size: int) -> Image.Image:
    """One RGB tile, resampled to square pixels and fitted in ``size`` x ``size``; ``mask`` tinted red."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    if mask is not None:
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.asarray(LESION_RGB, np.float32)
    img = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    h_mm, w_mm = gray.shape[0] * pixel[0], gray.shape[1] * pixel[1]
    scale = size / max(h_mm, w_mm)
    img = img.resize((max(1, round(w_mm * scale)), max(1, round(h_mm * scale))), Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (size, size))
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


def before_after(
    before: np.ndarray,
    after: np.ndarray,
    lesion: np.ndarray,
    affine: np.ndarray,
    planes: Sequence[str] = PLANES,
    window: Sequence[float] = SOFT_TISSUE_WINDOW,
    size: int = 192,
    before_scaling: tuple[float, float] = (1.0, 0.0),
    after_scaling: tuple[float, float] = (1.0, 0.0),
) -> Image.Image:
    """A grid of ``size`` x ``size`` tiles: a row per plane through the lesion's centre of mass; columns
    before, after, after with the lesion overlaid.

    ``before``/``after``/``lesion`` share one grid (``affine``); ``*_scaling`` is each volume's NIfTI
    ``(slope, inter)`` from stored values to HU.
    """
    before_ras, zooms = to_ras(np.asarray(before), affine)
    after_ras, _ = to_ras(np.asarray(after), affine)
    lesion = np.asarray(lesion)
    mask_ras, _ = to_ras(lesion if lesion.dtype == bool else lesion > 0, affine)
    centre = centre_of(mask_ras)
    canvas = Image.new("RGB", (3 * size, len(planes) * size))
    for row, name in enumerate(planes):
        b, pixel = plane(before_ras, zooms, centre, name)
        a, _ = plane(after_ras, zooms, centre, name)
        m, _ = plane(mask_ras, zooms, centre, name)
        gb, ga = to_gray(b, window, *before_scaling), to_gray(a, window, *after_scaling)
        for col, (gray, overlay) in enumerate(((gb, None), (ga, None), (ga, m))):
            canvas.paste(panel(gray, pixel, overlay, size), (col * size, row * size))
    return canvas


def write_preview(
    path: PathLike,
    before: np.ndarray,
    after: np.ndarray,
    lesion: np.ndarray,
    affine: np.ndarray,
    tile: int = 192,
    slope: float = 1.0,
    inter: float = 0.0,
) -> Path:
    """Write a 3 x 3 PNG (rows: axial, coronal, sagittal; columns: before, after, lesion overlay) atomically.

    ``before``/``after`` are stored values (HU = value * ``slope`` + ``inter``) on one grid (``affine``).
    """
    image = before_after(before, after, lesion, affine, size=tile, before_scaling=(slope, inter), after_scaling=(slope, inter))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
