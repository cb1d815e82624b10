"""Preview drawing (lesiondiffusion.preview): the slice through the lesion, orientation, tile layout."""

from __future__ import annotations

import numpy as np
import pytest

from lesiondiffusion import preview


def test_centre_of_mass_voxel_and_empty_mask():
    mask = np.zeros((10, 8, 6), bool)
    mask[2:5, 6, 1] = True  # centre (3, 6, 1)
    mask[3, 6, 4] = True  # pulls z towards 4: (1 * 3 + 4) / 4 = 1.75 -> 2
    assert preview.centre_of(mask).tolist() == [3, 6, 2]
    assert preview.centre_of(np.zeros((10, 8, 6), bool)).tolist() == [5, 4, 3]


def test_planes_are_shown_anterior_and_superior_up_in_ras():
    # LPS storage (x and y flipped): RAS voxel (i, j, k) holds stored voxel (9 - i, 7 - j, k)
    affine = np.diag([-1.0, -2.0, 3.0, 1.0])
    volume = np.zeros((10, 8, 6), np.float32)
    volume[9, 0, 2] = 1  # RAS voxel (0, 7, 2): right-most, most anterior
    ras, zooms = preview.to_ras(volume, affine)
    assert zooms.tolist() == [1.0, 2.0, 3.0] and ras[0, 7, 2] == 1
    axial, pixel = preview.plane(ras, zooms, (0, 7, 2), "axial")
    assert axial.shape == (8, 10) and axial[0, 0] == 1 and pixel == (2.0, 1.0)  # anterior row first
    coronal, pixel = preview.plane(ras, zooms, (0, 7, 2), "coronal")
    assert coronal.shape == (6, 10) and coronal[6 - 1 - 2, 0] == 1 and pixel == (3.0, 1.0)  # superior up
    with pytest.raises(ValueError, match="unknown plane 'oblique'"):
        preview.plane(ras, zooms, (0, 7, 2), "oblique")


def test_before_after_grid_uses_each_volumes_scaling_and_window():
    shape = (12, 12, 12)
    before = np.full(shape, 100, np.int16)  # stored * 2 - 200 = 0 HU: grey in the lung window
    after = np.full(shape, 40, np.int16)  # stored 40 HU as it is
    lesion = np.zeros(shape, bool)
    lesion[5:7, 5:7, 5:7] = True
    img = preview.before_after(before, after, lesion, np.eye(4), planes=("axial",), window=(-100.0, 100.0), size=24,
                               before_scaling=(2.0, -200.0))  # fmt: skip
    px = np.asarray(img)
    assert px.shape == (24, 72, 3)
    assert px[12, 12].tolist() == [127] * 3 and px[12, 36].tolist() == [178] * 3  # 0 HU and 40 HU
    red = px[:, 48:, 0].astype(int) - px[:, 48:, 1]
    assert red.max() > 60 and red[0, 0] == 0  # the lesion is tinted, the rest is not
