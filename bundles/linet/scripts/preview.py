"""Preview PNG of one synthesis: three orthogonal slices through the lesion (before, after, mask overlay)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from lesiondiffusion.io import PathLike, atomic_path

# soft-tissue window (HU) for display
WINDOW = (-160.0, 240.0)
LESION_RGB = (255, 60, 60)


def _to_canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array reoriented to RAS axes (no resampling) and its voxel sizes along those axes."""
    ornt = nib.orientations.io_orientation(affine)
    out = nib.orientations.apply_orientation(arr, ornt)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return out, zooms[ornt[:, 0].astype(int)]


def _window(hu: np.ndarray, window: Sequence[float] = WINDOW) -> np.ndarray:
    lo, hi = window
    return (np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def _slices(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal planes of a RAS array, turned so that superior/anterior is up."""
    x, y, z = centre
    axial = np.flipud(vol[:, :, z].T)  # rows: anterior at top; columns: x
    coronal = np.flipud(vol[:, y, :].T)  # rows: superior at top
    sagittal = np.flipud(vol[x, :, :].T)
    return [axial, coronal, sagittal]


def _pixel_sizes(zooms: Sequence[float]) -> list[tuple[float, float]]:
    """(row, column) physical pixel size of each plane of :func:`_slices`."""
    zx, zy, zz = (float(z) for z in zooms)
    return [(zy, zx), (zz, zx), (zz, zy)]


def _panel(gray: np.ndarray, pixel: tuple[float, float], mask: np.ndarray | None, size: int) -> Image.Image:
    """One RGB tile, resampled to square pixels and fitted in ``size`` x ``size``."""
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    if mask is not None:
        tint = np.asarray(LESION_RGB, dtype=np.float32)
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * tint
    img = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    h_mm, w_mm = gray.shape[0] * pixel[0], gray.shape[1] * pixel[1]
    scale = size / max(h_mm, w_mm)
    img = img.resize((max(1, round(w_mm * scale)), max(1, round(h_mm * scale))), Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (size, size))
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return tile


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
    """Write a 3 x 3 PNG (rows: axial, coronal, sagittal; columns: before, after, lesion overlay).

    ``before``/``after`` are stored values (HU = value * ``slope`` + ``inter``) on one grid (``affine``);
    only the three slices through the lesion's centre of mass are converted, so a whole scan costs no
    extra memory. Shown in RAS orientation with square pixels, whatever the grid's orientation and spacing.
    """
    before, zooms = _to_canonical(np.asarray(before), affine)
    after, _ = _to_canonical(np.asarray(after), affine)
    mask, _ = _to_canonical(np.asarray(lesion) > 0, affine)
    idx = np.argwhere(mask)
    centre = idx.mean(axis=0).round().astype(int) if idx.size else np.asarray(mask.shape) // 2
    pixels = _pixel_sizes(zooms)
    canvas = Image.new("RGB", (3 * tile, 3 * tile))
    for row, (b, a, m, px) in enumerate(zip(_slices(before, centre), _slices(after, centre), _slices(mask, centre), pixels)):
        gb, ga = _window(b.astype(np.float32) * slope + inter), _window(a.astype(np.float32) * slope + inter)
        for col, (gray, overlay) in enumerate(((gb, None), (ga, None), (ga, m))):
            canvas.paste(_panel(gray, px, overlay, tile), (col * tile, row * tile))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
