"""Paste-back of an inpainted crop into the original CT (lesiondiffusion.paste) and the preview PNG."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from lesiondiffusion.io import read_stored, voxel_spacing
from lesiondiffusion.paste import feather_weights, keep_scan_noise, outside_margin, paste, resample_patch, save_like


def _world(shape, affine):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def _distance_mm(mask, affine):
    """Brute-force physical distance of every voxel centre to the nearest lesion voxel centre."""
    world = _world(mask.shape, affine)
    tree = cKDTree(world[mask.ravel()])
    return tree.query(world)[0].reshape(mask.shape)


def _oblique_affine(spacing, angle=0.35, flip=(-1, 1, 1), origin=(30.0, -20.0, 15.0)):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(np.asarray(flip, float) * np.asarray(spacing, float))
    a[:3, 3] = origin
    return a


def _ras_patch_around(centre_world, size=40, value_fn=None):
    """A 1 mm RAS patch centred on ``centre_world``; values = value_fn(world) (default constant 300 HU)."""
    affine = np.eye(4)
    affine[:3, 3] = np.asarray(centre_world) - (size - 1) / 2.0
    world = _world((size,) * 3, affine).reshape(size, size, size, 3)
    values = np.full((size,) * 3, 300.0) if value_fn is None else value_fn(world)
    return values, affine


def _scan(tmp_path: Path, shape, affine, dtype=np.int16, slope=None, inter=None, name="ct.nii.gz"):
    rng = np.random.default_rng(0)
    hu = rng.integers(-900, 900, size=shape)
    if slope is None:
        raw = hu.astype(dtype)
    else:
        raw = np.rint((hu - inter) / slope).astype(dtype)
    img = nib.Nifti1Image(raw, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path = tmp_path / name
    nib.save(img, str(path))
    return path


def _lesion(shape, centre, radius_vox):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return (((grid - np.asarray(centre)) / np.asarray(radius_vox)) ** 2).sum(-1) <= 1.0


def test_feather_weights_profile():
    mask = np.zeros((40, 40, 40), bool)
    mask[18:22, 18:22, 18:22] = True
    spacing = (1.0, 1.0, 2.0)
    w = feather_weights(mask, spacing, margin_mm=6.0, feather_mm=4.0)
    dist = _distance_mm(mask, np.diag([*spacing, 1.0]))
    assert np.all(w[mask] == 1.0)
    assert np.all(w[dist <= 2.0] == 1.0)  # inner part: margin - feather
    assert np.all(w[dist >= 6.0] == 0.0)
    ramp = (dist > 2.0 + 1e-6) & (dist < 6.0 - 1e-6)
    assert ramp.any() and np.all((w[ramp] > 0) & (w[ramp] < 1))
    # monotone: farther never weighs more
    order = np.argsort(dist.ravel(), kind="stable")
    d_sorted, w_sorted = dist.ravel()[order], w.ravel()[order]
    for d in np.unique(d_sorted)[:-1]:
        assert w_sorted[d_sorted <= d].min() >= w_sorted[d_sorted > d].max() - 1e-6
    with pytest.raises(ValueError):
        feather_weights(mask, spacing, margin_mm=2.0, feather_mm=3.0)


def test_resample_patch_is_exact_for_linear_fields_on_oblique_grids():
    def field(w):
        return 2.0 * w[..., 0] - 3.0 * w[..., 1] + 0.5 * w[..., 2] + 7.0

    patch, patch_affine = _ras_patch_around((5.0, -3.0, 2.0), size=30, value_fn=field)
    dst_affine = _oblique_affine((0.7, 0.9, 2.5), origin=(0.0, -8.0, -6.0))
    shape = (14, 12, 5)
    values, inside = resample_patch(patch, patch_affine, dst_affine, shape)
    expected = field(_world(shape, dst_affine)).reshape(shape)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(values[inside], expected[inside], atol=1e-3)
    # a grid entirely outside the patch is reported as not covered
    far = dst_affine.copy()
    far[:3, 3] += 500.0
    assert not resample_patch(patch, patch_affine, far, shape)[1].any()


@pytest.mark.parametrize(
    "spacing, flip, dtype",
    [
        ((1.0, 1.0, 1.0), (1, 1, 1), np.int16),
        ((0.8, 1.2, 2.5), (-1, -1, 1), np.int16),
        ((0.7, 0.7, 3.0), (1, -1, -1), np.float32),
    ],
)
def test_paste_changes_only_the_zone_and_keeps_geometry_and_dtype(tmp_path, spacing, flip, dtype):
    shape = (48, 40, 20)
    affine = _oblique_affine(spacing, flip=flip)
    src = _scan(tmp_path, shape, affine, dtype=dtype)
    before_bytes = src.read_bytes()
    original = read_stored(src)
    lesion = _lesion(shape, (24, 20, 10), (6, 5, 2))
    centre = _world(shape, affine)[lesion.ravel()].mean(0)
    patch, patch_affine = _ras_patch_around(centre, size=48)
    margin, feather = 4.0, 3.0
    out = paste(original, lesion, patch, patch_affine, margin_mm=margin, feather_mm=feather, noise_sigma_vox=0.0)

    dist = _distance_mm(lesion, affine)
    far = dist >= margin
    assert np.array_equal(out[far], original.raw[far])  # bit-identical beyond the margin
    assert np.all(np.abs(out[lesion].astype(float) - 300.0) <= 0.5)  # the patch value inside the lesion
    ring = (dist > 0) & (dist < margin - feather)
    assert np.all(np.abs(out[ring].astype(float) - 300.0) <= 0.5)
    # the same check through the shared helper the evaluation uses (ties at exactly the margin aside)
    tie = np.abs(dist - margin) < 1e-6
    assert np.array_equal(outside_margin(lesion, affine, margin)[~tie], far[~tie])

    dest = tmp_path / "out" / "synthetic.nii.gz"
    save_like(dest, out, original)
    back = nib.load(str(dest))
    assert back.get_data_dtype() == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back.affine, nib.load(str(src)).affine)
    np.testing.assert_array_equal(back.header.get_qform(), nib.load(str(src)).header.get_qform())
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), out)
    assert src.read_bytes() == before_bytes  # the input is never written
    np.testing.assert_allclose(voxel_spacing(back.affine), spacing, rtol=1e-5)


def test_paste_keeps_nifti_scaling_and_raw_bits(tmp_path):
    shape = (32, 32, 16)
    affine = np.diag([0.9, 0.9, 2.0, 1.0])
    src = _scan(tmp_path, shape, affine, dtype=np.uint16, slope=1.0, inter=-1024.0)
    original = read_stored(src)
    assert (original.slope, original.inter) == (1.0, -1024.0)
    lesion = _lesion(shape, (16, 16, 8), (4, 4, 2))
    centre = _world(shape, affine)[lesion.ravel()].mean(0)
    patch, patch_affine = _ras_patch_around(centre, size=36)
    out = paste(original, lesion, patch, patch_affine, margin_mm=3.0, feather_mm=2.0, noise_sigma_vox=0.0)
    dest = tmp_path / "synthetic.nii.gz"
    save_like(dest, out, original)
    back = nib.load(str(dest))
    hu_back = np.asanyarray(back.dataobj)
    hu_in = np.asanyarray(nib.load(str(src)).dataobj)
    far = _distance_mm(lesion, affine) >= 3.0
    assert back.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(back.dataobj.get_unscaled()[far], original.raw[far])
    np.testing.assert_array_equal(hu_back[far], hu_in[far])
    np.testing.assert_allclose(hu_back[lesion], 300.0)


def test_zone_outside_the_patch_is_left_unchanged(tmp_path, caplog):
    shape = (40, 40, 40)
    affine = np.eye(4)
    original = read_stored(_scan(tmp_path, shape, affine))
    lesion = _lesion(shape, (20, 20, 20), (8, 8, 8))
    patch, patch_affine = _ras_patch_around((20.0, 20.0, 20.0), size=10)  # smaller than the lesion
    with caplog.at_level(logging.WARNING, logger="lesiondiffusion.paste"):
        out = paste(original, lesion, patch, patch_affine, margin_mm=2.0, feather_mm=1.0, noise_sigma_vox=0.0)
    assert "outside the inpainted crop" in caplog.text
    covered = np.zeros(shape, bool)
    covered[16:25, 16:25, 16:25] = True  # voxel centres 15.5 .. 24.5 lie in the patch
    assert np.array_equal(out[~covered], original.raw[~covered])
    assert np.all(out[covered & lesion] == 300)


def test_paste_keeps_the_scan_noise_under_a_smooth_patch(tmp_path):
    shape = (40, 40, 24)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    rng = np.random.default_rng(3)
    organ_hu = 60.0 + rng.normal(0.0, 20.0, size=shape)  # tissue at 60 HU with 20 HU of noise
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(organ_hu).astype(np.int16), affine), str(src))
    original = read_stored(src)
    lesion = _lesion(shape, (20, 20, 12), (9, 9, 4))
    centre = _world(shape, affine)[lesion.ravel()].mean(0)
    patch, patch_affine = _ras_patch_around(centre, size=48)
    patch = np.full_like(patch, 10.0)  # a flat, noiseless lesion at 10 HU, as a VQ-GAN decodes it
    kept = paste(original, lesion, patch, patch_affine, margin_mm=3.0, feather_mm=2.0).astype(float)
    flat = paste(original, lesion, patch, patch_affine, margin_mm=3.0, feather_mm=2.0, noise_sigma_vox=0.0).astype(
        float
    )
    core = ndimage.binary_erosion(lesion, iterations=2)
    tissue_std = float(np.asarray(original.raw, float)[~lesion].std())
    assert flat[core].std() < 1.0  # without it the lesion is smoother than any real tissue
    assert 0.8 < kept[core].std() / tissue_std < 1.2  # with it, as noisy as the tissue it replaced
    assert abs(kept[core].mean() - 10.0) < 4.0  # and still at the patch's HU
    # a small lesion on a coarse grid keeps its contrast: the patch itself is never blurred
    small = _lesion(shape, (20, 20, 12), (3, 3, 1))
    radii = np.array([3 * 0.8, 3 * 0.8, 1 * 3.0]) + 0.5  # mm: the small lesion's extent, a little grown
    patch_small, _ = _ras_patch_around(
        centre, size=48, value_fn=lambda w: np.where((((w - centre) / radii) ** 2).sum(-1) <= 1, 10.0, 60.0)
    )
    kept_small = paste(original, small, patch_small, patch_affine, margin_mm=3.0, feather_mm=2.0).astype(float)
    assert abs(kept_small[small].mean() - 10.0) < 10.0  # 16 HU (resampling); blurring the patch gave 41 HU
    # a patch already as noisy as the tissue gets no extra noise (same grid: keep_scan_noise itself)
    rng2 = np.random.default_rng(5)
    tissue, noisy = 50.0 + rng2.normal(0.0, 20.0, (30, 30, 30)), 10.0 + rng2.normal(0.0, 20.0, (30, 30, 30))
    assert keep_scan_noise(noisy, tissue, 1.0).std() < 1.1 * noisy.std()  # adding it all would give ~1.35x
    assert (
        abs(
            keep_scan_noise(np.full_like(tissue, 10.0), tissue, 1.0).std()
            - (tissue - ndimage.gaussian_filter(tissue, 1.0)).std()
        )
        < 0.5
    )
    far = _distance_mm(lesion, affine) >= 3.0
    assert np.array_equal(kept[far], np.asarray(original.raw, float)[far])


def test_the_edge_follows_the_margin_class(tmp_path):
    from lesiondiffusion import lesion_metrics as L
    from lesiondiffusion.attributes import margin_sigma_mm

    shape = (48, 48, 48)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    rng = np.random.default_rng(7)
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(60.0 + rng.normal(0.0, 10.0, shape)).astype(np.int16), affine), str(src))
    original = read_stored(src)
    lesion = _lesion(shape, (24, 24, 24), (8, 8, 8))
    centre = _world(shape, affine)[lesion.ravel()].mean(0)
    # the network's patch: 20 HU inside with an edge blurred over the border, leaking 2 voxels beyond it
    blurred = ndimage.gaussian_filter(np.where(_lesion((40, 40, 40), (19.5, 19.5, 19.5), (8, 8, 8)), 20.0, 60.0), 1.5)
    patch, patch_affine = _ras_patch_around(centre, size=40)
    patch[:] = blurred
    kw = dict(margin_mm=6.0, feather_mm=1.0, noise_sigma_vox=0.0)
    dist = _distance_mm(lesion, affine)
    ring = (dist > 7.0) & (dist < 12.0)

    def edge(out):
        return L.edge_width_mm(L.LesionCrop(out.astype(np.float32), lesion, ring, (1.0, 1.0, 1.0), 60.0))

    well = paste(
        original, lesion, patch, patch_affine, edge_sigma_mm=margin_sigma_mm("well-defined margin"), **kw
    ).astype(float)
    ill = paste(
        original, lesion, patch, patch_affine, edge_sigma_mm=margin_sigma_mm("ill-defined margin"), **kw
    ).astype(float)
    net = paste(original, lesion, patch, patch_affine, **kw).astype(float)
    raw = np.asarray(original.raw, float)
    assert edge(well) < edge(net) < edge(ill)
    assert edge(ill) - edge(well) > 2.0  # mm
    # well-defined: at most a partial-volume trace just outside the lesion, and its border voxels carry
    # the core's contrast
    assert np.abs(well - raw)[~lesion].max() <= 3.0 and np.array_equal(well[dist >= 1.5], raw[dist >= 1.5])
    border = lesion & ~ndimage.binary_erosion(lesion)
    assert np.median((well - raw)[border]) == pytest.approx(-40.0, abs=6.0)
    # ill-defined: the change reaches beyond the lesion, fading out before the margin
    assert np.median((ill - raw)[(dist > 0.5) & (dist < 2.0)]) < -8.0
    assert np.array_equal(ill[dist >= 6.0], raw[dist >= 6.0])
    assert margin_sigma_mm("a smooth, round lesion") == 0.3 and margin_sigma_mm("unclear boundary") == 3.0
    assert margin_sigma_mm(None) is None


def test_empty_mask_pastes_nothing(tmp_path):
    original = read_stored(_scan(tmp_path, (16, 16, 16), np.eye(4)))
    patch, patch_affine = _ras_patch_around((8.0, 8.0, 8.0), size=16)
    out = paste(original, np.zeros((16, 16, 16), bool), patch, patch_affine)
    assert np.array_equal(out, original.raw)


def test_preview_png_shows_before_after_and_overlay(tmp_path):
    from PIL import Image

    from lesiondiffusion import preview

    shape = (40, 30, 12)
    affine = _oblique_affine((0.8, 1.0, 3.0), angle=0.0, flip=(-1, -1, 1))
    before = np.zeros(shape, np.float32)
    lesion = _lesion(shape, (20, 15, 6), (5, 5, 2))
    after = before.copy()
    after[lesion] = 200.0
    path = preview.write_preview(tmp_path / "preview.png", before, after, lesion, affine, tile=96)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (3 * 96, 4 * 96, 3)  # columns: overview, zoomed before, after, lesion outline
    for row in range(3):
        tiles = [img[row * 96 : (row + 1) * 96, c * 96 : (c + 1) * 96] for c in range(4)]
        assert (
            tiles[1][40:56, 40:56].mean() + 50 < tiles[2][40:56, 40:56].mean()
        )  # the lesion (zoomed: mid-panel) is brighter after
        red = (tiles[3][..., 0] - tiles[3][..., 1]) > 60
        assert red.any() and not ((tiles[2][..., 0] - tiles[2][..., 1]) > 60).any()  # outline only in the last column
