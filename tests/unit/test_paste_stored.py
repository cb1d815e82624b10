"""The paste's small pieces, against values worked out by hand or by brute force: the zone's box at the
array's edges, the blend weights' distances, stored values beyond the dtype's range, the header a pasted
scan keeps, and the scan-noise scaling at its two ends."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lesiondiffusion.errors import InputError
from lesiondiffusion.io import StoredImage, read_stored, voxel_spacing
from lesiondiffusion.paste import (
    box_affine,
    keep_scan_noise,
    noise_level,
    outside_margin,
    paste,
    save_like,
    scan_noise_hu,
    signed_distance_mm,
    zone_box,
)


def brute_distance_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm, voxel centres) from every voxel to the nearest voxel of ``mask``, by brute force."""
    spacing = np.asarray(spacing, dtype=np.float64)
    points = np.argwhere(mask) * spacing
    grid = np.argwhere(np.ones(mask.shape, bool)) * spacing
    return np.sqrt(((grid[:, None, :] - points[None, :, :]) ** 2).sum(-1)).min(1).reshape(mask.shape)


def test_zone_box_grows_by_whole_voxels_per_axis_and_stops_at_the_array() -> None:
    mask = np.zeros((10, 12, 30), bool)
    mask[0, 5, 9] = mask[2, 6, 29] = True  # touches the first slice of axis 0 and the last of axis 2
    # grow = ceil(3 mm / spacing) + 1 voxels: 4, 3 and 7
    assert zone_box(mask, (1.0, 2.0, 0.5), 3.0) == (slice(0, 7), slice(2, 10), slice(2, 30))
    assert zone_box(mask, (1.0, 1.0, 1.0), 0.0) == (slice(0, 4), slice(4, 8), slice(8, 30))
    assert zone_box(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0), 3.0) is None


def test_outside_margin_is_the_brute_force_distance_on_an_anisotropic_oblique_grid() -> None:
    mask = np.zeros((9, 8, 7), bool)
    mask[4, 3, 3] = mask[5, 4, 3] = True
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.5, 2.5])
    assert np.allclose(voxel_spacing(affine), [0.8, 1.5, 2.5])
    expected = brute_distance_mm(mask, (0.8, 1.5, 2.5)) >= 2.6
    assert np.array_equal(outside_margin(mask, affine, 2.6), expected) and 0 < (~expected).sum() < mask.size
    assert outside_margin(np.zeros((3, 3, 3), bool), affine, 2.6).all()


def test_signed_distance_is_half_a_voxel_beyond_the_outermost_voxels() -> None:
    mask = np.zeros((1, 1, 9), bool)
    mask[0, 0, 3:6] = True
    s = signed_distance_mm(mask, (2.0, 2.0, 2.0))[0, 0]
    # inside: distance to the nearest outside voxel minus a half voxel; outside: minus that, negated
    assert np.allclose(s, [-5.0, -3.0, -1.0, 1.0, 3.0, 1.0, -1.0, -3.0, -5.0])


def test_box_affine_moves_the_origin_to_the_boxs_first_voxel() -> None:
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1]])
    got = box_affine(affine, (slice(2, 5), slice(None, 4), slice(1, 3)))
    assert np.array_equal(got[:3, :3], affine[:3, :3])
    assert np.allclose(got[:3, 3], affine[:3, :3] @ [2, 0, 1] + affine[:3, 3])


def _stored(raw: np.ndarray, slope: float, inter: float) -> StoredImage:
    return StoredImage(raw, slope, inter, nib.Nifti1Image(raw.astype(np.uint8), np.eye(4)))


def test_from_hu_rounds_and_clips_to_the_stored_dtype() -> None:
    s = _stored(np.zeros((2, 2, 2), np.int16), 0.5, -1000.0)
    hu = np.array([-1000.0, 300.3, 1e6, -1e6])
    assert s.from_hu(hu).tolist() == [0, 2601, 32767, -32768] and s.from_hu(hu).dtype == np.int16
    u = _stored(np.zeros((2, 2, 2), np.uint8), 2.0, 10.0)
    assert u.from_hu(np.array([9.0, 12.9, 600.0])).tolist() == [0, 1, 255]
    f = _stored(np.zeros((2, 2, 2), np.float32), 2.0, 1.0)
    assert f.from_hu(np.array([4.0])).dtype == np.float32 and f.from_hu(np.array([4.0])).tolist() == [1.5]
    b = _stored(np.zeros((2, 2, 2), np.bool_), 1.0, 0.0)
    assert b.from_hu(np.array([0.2, 0.5, 0.6])).tolist() == [False, False, True]
    assert np.allclose(s.to_hu((slice(0, 1), slice(None), slice(None))), -1000.0)


def test_read_stored_keeps_the_raw_dtype_and_scaling(tmp_path: Path) -> None:
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw, np.diag([0.7, 0.8, 2.0, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    s = read_stored(tmp_path / "ct.nii.gz")
    assert s.raw.dtype == np.int16 and np.array_equal(s.raw, raw) and (s.slope, s.inter) == (2.0, -1024.0)
    nib.save(nib.Nifti1Image(raw[..., None], np.eye(4)), str(tmp_path / "4d.nii.gz"))  # a trailing singleton axis
    four = read_stored(tmp_path / "4d.nii.gz")
    assert four.raw.shape == (2, 3, 4) and (four.slope, four.inter) == (1.0, 0.0)


def test_save_like_keeps_the_header_and_refuses_another_shape_or_dtype(tmp_path: Path) -> None:
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.array([[0.0, -0.8, 0.0, 5.0], [0.7, 0.0, 0.0, -3.0], [0.0, 0.0, 2.0, 1.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(raw, affine)
    img.header.set_slope_inter(2.0, -1024.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    ref = read_stored(tmp_path / "ct.nii.gz")
    save_like(tmp_path / "out.nii.gz", raw + 1, ref)
    out = nib.load(tmp_path / "out.nii.gz")
    assert np.array_equal(out.affine, nib.load(tmp_path / "ct.nii.gz").affine)
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2)
    assert out.get_data_dtype() == np.int16 and out.dataobj.slope == 2.0 and out.dataobj.inter == -1024.0
    assert np.array_equal(np.asarray(out.dataobj.get_unscaled()), raw + 1)
    label = (raw % 3).astype(np.uint8)
    save_like(tmp_path / "label.nii.gz", label, ref, scaled=False)
    lab = nib.load(tmp_path / "label.nii.gz")
    assert lab.get_data_dtype() == np.uint8 and lab.dataobj.slope == 1.0 and lab.dataobj.inter == 0.0
    assert np.array_equal(np.asarray(lab.dataobj), label)
    with pytest.raises(ValueError, match=r"^shape \(2, 3, 3\) differs from the reference's \(2, 3, 4\)$"):
        save_like(tmp_path / "bad.nii.gz", raw[..., :3], ref)
    with pytest.raises(ValueError, match="^dtype float32 differs from the reference's int16$"):
        save_like(tmp_path / "bad.nii.gz", raw.astype(np.float32), ref)
    assert not (tmp_path / "bad.nii.gz").exists()


def test_scan_noise_is_added_in_full_under_a_flat_patch_and_not_under_an_equally_noisy_one() -> None:
    rng = np.random.default_rng(0)
    original = 40.0 + 10.0 * rng.standard_normal((16, 16, 16))
    flat = np.full(original.shape, 70.0)
    high = high_pass(original)
    assert np.allclose(keep_scan_noise(flat, original, 1.0), flat + high)  # all the noise the patch lacks
    assert np.allclose(keep_scan_noise(original, original, 1.0), original)  # as noisy already: nothing added
    # a flat original has no noise to give
    assert np.array_equal(keep_scan_noise(flat, np.full(original.shape, 5.0), 1.0), flat)
    # the scale is measured over ``where`` only
    where = np.zeros(original.shape, bool)
    where[4:12, 4:12, 4:12] = True
    half = flat + 0.5 * high
    s_o, s_p = high[where].std(), high_pass(half)[where].std()
    expected = half + np.sqrt(1 - (s_p / s_o) ** 2) * high
    assert np.allclose(keep_scan_noise(half, original, 1.0, where=where), expected)
    # a flat patch with a step at its border: its edge reads as noise unless the patch's noise is given
    stepped = np.where(where, 120.0, 70.0)
    assert np.abs(keep_scan_noise(stepped, original, 1.0, where=where) - stepped).max() < 0.5 * np.abs(high).max()
    assert np.allclose(keep_scan_noise(stepped, original, 1.0, where=where, patch_std=0.0), stepped + high)


def test_scan_noise_is_centred_and_softly_clipped_so_structures_do_not_show_through() -> None:
    rng = np.random.default_rng(1)
    original = 40.0 + 10.0 * rng.standard_normal((20, 20, 20))
    original[:, 10, 10] += 400.0  # a vessel through the lesion
    original[:, :, :6] -= 200.0  # darker tissue beside it: the high-pass near it is off zero
    where = np.zeros(original.shape, bool)
    where[6:14, 6:14, 6:14] = True
    flat = np.full(original.shape, 90.0)
    added = keep_scan_noise(flat, original, 1.0, where=where, clip_hu=30.0) - flat
    assert np.abs(added).max() < 30.0  # the vessel's 400 HU does not come through
    assert abs(np.median(added[where])) < 0.5  # centred on the lesion
    off_vessel = where.copy()
    off_vessel[:, 10, 10] = False
    assert len(np.unique(np.round(added[off_vessel], 6))) == off_vessel.sum()  # soft: no plateau of equal values
    # away from the clip the noise is the scan's own
    quiet = np.abs(high_pass(original) - np.median(high_pass(original)[where])) < 3.0
    assert np.allclose(
        added[where & quiet], (high_pass(original) - np.median(high_pass(original)[where]))[where & quiet], atol=0.1
    )


def high_pass(a: np.ndarray) -> np.ndarray:
    return a - ndimage.gaussian_filter(a, 1.0, mode="nearest")


def test_scan_noise_level_is_measured_on_soft_tissue_only() -> None:
    rng = np.random.default_rng(2)
    soft = 40.0 + 12.0 * rng.standard_normal((24, 24, 24))
    expected = 1.4826 * np.median(
        np.abs(high_pass(soft)[1:-1, 1:-1, 1:-1] - np.median(high_pass(soft)[1:-1, 1:-1, 1:-1]))
    )
    scan = soft.copy()
    scan[:, :, 16:] = -800.0 + 150.0 * rng.standard_normal((24, 24, 8))  # lung: texture, not noise
    level = scan_noise_hu(scan)
    assert level == pytest.approx(expected, rel=0.1)
    assert scan_noise_hu(scan[:, :, 18:]) is None  # no soft tissue: no level
    stored = StoredImage(np.rint(scan * 2).astype(np.int16), 0.5, 0.0, nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4)))
    assert noise_level(stored, 1.0) == pytest.approx(level, rel=0.05)


def test_a_lesion_with_a_well_defined_margin_does_not_show_the_vessel_under_it(tmp_path: Path) -> None:
    """A flat 30 HU nodule over lung with a vessel through it: the vessel (+700 HU) adds at most the noise
    clip to the nodule's voxels, and the nodule's core is at its value within that clip."""
    shape = (24, 24, 24)
    lung = np.full(shape, -800.0) + np.random.default_rng(3).normal(0.0, 5.0, shape)
    lung[:, :, 14:] = 40.0 + np.random.default_rng(4).normal(0.0, 5.0, (24, 24, 10))  # soft tissue: the noise level
    vessel = lung.copy()
    vessel[:, 12, 12] += 700.0
    lesion = np.zeros(shape, bool)
    lesion[10:15, 10:15, 3:8] = True
    core = np.zeros(shape, bool)
    core[11:14, 11:14, 4:7] = True
    patch = np.full(shape, 30.0)
    outs = []
    for i, hu in enumerate((lung, vessel)):
        nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), np.eye(4)), str(tmp_path / f"ct{i}.nii.gz"))
        original = read_stored(tmp_path / f"ct{i}.nii.gz")
        clip = 3.0 * noise_level(original, 1.0)
        outs.append(
            paste(original, lesion, patch, np.eye(4), 3.0, 1.0, noise_sigma_vox=1.0, edge_sigma_mm=0.3).astype(float)
        )
    assert 5.0 < clip < 30.0
    assert np.abs(outs[1] - outs[0])[lesion].max() < clip + 0.06 * 700.0  # at most the clip and the edge's 5%
    assert np.abs(outs[1][core] - 30.0).max() < clip
    assert abs(np.median(outs[1][lesion]) - 30.0) < 0.06 * 830.0


def test_a_scan_whose_voxels_cannot_be_read_is_one_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "short.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), str(path))
    path.write_bytes(path.read_bytes()[:400])  # the header survives, the voxels are cut short
    with pytest.raises(InputError, match=r"short\.nii: unreadable NIfTI voxels \(OSError: Expected 1024 bytes") as e:
        read_stored(path)
    assert e.value.path == str(path) and "\n" not in str(e.value)


def test_an_ill_defined_edge_keeps_the_lesions_density(tmp_path: Path) -> None:
    """A 9 mm lesion painted flat at -40 HU from its organ with an ill-defined margin: the ramp reaches
    beyond the mask, but the lesion's median stays the painted -40 (a ramp alone leaves -25)."""
    shape = (32, 32, 32)
    nib.save(nib.Nifti1Image(np.full(shape, 60, np.int16), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    original = read_stored(tmp_path / "ct.nii.gz")
    grid = np.indices(shape) - 16.0
    lesion = (grid**2).sum(0) <= 4.5**2
    patch = np.where(lesion, 20.0, 60.0)
    out = paste(original, lesion, patch, np.eye(4), 6.0, 1.0, noise_sigma_vox=0.0, edge_sigma_mm=3.0).astype(float)
    change = out - 60.0
    assert np.median(change[lesion]) == pytest.approx(-40.0, abs=2.0)
    assert np.median(change[(~lesion) & ((grid**2).sum(0) <= 5.5**2)]) < -10.0  # the ramp outside
    assert change[16, 16, 16] < -40.0  # the core carries more than the mean, as an ill-defined lesion does
