"""Paste on stored scaling other than 1/0 and on sub-millimetre voxels (mutants that the other paste tests let live)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from lesiondiffusion.io import read_stored
from lesiondiffusion.paste import paste


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius


def test_paste_writes_hu_through_a_slope_and_intercept(tmp_path: Path) -> None:
    shape = (24, 24, 24)
    img = nib.Nifti1Image(np.full(shape, 2000, np.int16), np.eye(4))  # 2000 * 0.5 - 1000 = 0 HU
    img.header.set_slope_inter(0.5, -1000.0)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    original = read_stored(tmp_path / "ct.nii.gz")
    lesion = _ball(shape, (12, 12, 12), 3)
    out = paste(original, lesion, np.full(shape, 300.0), np.eye(4), margin_mm=3.0, feather_mm=2.0, noise_sigma_vox=0.0)
    assert (out[lesion] == 2600).all()  # (300 HU + 1000) / 0.5, stored
    assert (original.to_hu()[lesion] == 0).all() and np.allclose(out[lesion] * 0.5 - 1000.0, 300.0)


def test_the_whole_zone_is_written_on_half_millimetre_voxels(tmp_path: Path) -> None:
    shape = (40, 40, 40)
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), affine), str(tmp_path / "ct.nii.gz"))
    original = read_stored(tmp_path / "ct.nii.gz")
    lesion = _ball(shape, (20, 20, 20), 4)
    out = paste(original, lesion, np.full(shape, 500.0), affine, margin_mm=3.0, feather_mm=2.0, noise_sigma_vox=0.0)
    distance = ndimage.distance_transform_edt(~lesion, sampling=[0.5] * 3)
    assert (out[(distance > 0) & (distance <= 2.5)] > 0).all()  # 5 voxels out: still inside the zone, blended
    assert (out[distance >= 3.0] == 0).all()
