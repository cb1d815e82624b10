import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from lesiondiffusion import geometry as geometry_module
from lesiondiffusion.errors import InputError
from lesiondiffusion.geometry import (
    InputGeometry,
    cast_to,
    read_geometry,
    record_geometry,
    save_on_input_grid,
    standardise,
    to_input_grid,
    write_geometry,
)

LPS = np.array([[-1.0, 0, 0, 30], [0, -1.0, 0, 20], [0, 0, 1.0, -10], [0, 0, 0, 1]])
# axes permuted (P, I, L), 0.8 x 0.8 x 2.5 mm: a scan in neither RAS order nor 1 mm spacing
PIL_ANISO = np.array([[0, 0, -0.8, 50], [-0.8, 0, 0, 40], [0, -2.5, 0, 30], [0, 0, 0, 1.0]])


def _load(path):
    return LoadImage(image_only=True, ensure_channel_first=True)(str(path))


def _world(affine, shape):
    ijk = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).T.reshape(*shape, 3)


def _sphere(affine, shape, centre, radius):
    return np.linalg.norm(_world(affine, shape) - np.asarray(centre), axis=-1) < radius


def _standardised(path, mode):
    img = _load(path)
    std = standardise(img, mode=mode)
    return std, record_geometry(path, std.affine, std.shape[1:])


def test_lps_1mm_round_trip_is_exact(write_nifti):
    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1500, (20, 24, 16)).astype(np.int16)
    labels = rng.integers(0, 6, (20, 24, 16)).astype(np.uint8)
    ct_path = write_nifti("ct.nii.gz", ct, LPS)
    lab_path = write_nifti("lab.nii.gz", labels, LPS)

    std, geometry = _standardised(ct_path, "linear")
    assert nib.aff2axcodes(std.affine.numpy()) == ("R", "A", "S")
    assert np.allclose(np.abs(np.diag(std.affine.numpy())[:3]), 1.0)
    assert np.array_equal(std[0].numpy(), ct[::-1, ::-1, :])  # a pure flip: no interpolation
    back = to_input_grid(std[0], geometry, mode="linear")
    assert back.dtype == np.int16 and np.array_equal(back, ct)

    std_lab, lab_geometry = _standardised(lab_path, "nearest")
    back_lab = to_input_grid(std_lab[0].numpy().astype(np.uint8), lab_geometry, mode="nearest")
    assert back_lab.dtype == np.uint8 and np.array_equal(back_lab, labels)


def test_anisotropic_permuted_input_keeps_world_positions(write_nifti):
    shape = (30, 12, 25)
    centre, radius = (38.0, 30.0, 15.0), 6.0
    blob = _sphere(PIL_ANISO, shape, centre, radius).astype(np.uint8) * 5
    path = write_nifti("blob.nii.gz", blob, PIL_ANISO)

    std, geometry = _standardised(path, "nearest")
    affine = std.affine.numpy()
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert np.allclose(nib.affines.voxel_sizes(affine), 1.0)
    inside = np.argwhere(std[0].numpy() == 5)
    world_centroid = (affine[:3, :3] @ inside.T + affine[:3, 3:]).T.mean(0)
    assert np.allclose(world_centroid, centre, atol=0.6)
    assert abs(len(inside) - 4 / 3 * np.pi * radius**3) / (4 / 3 * np.pi * radius**3) < 0.1  # 1 mm^3 voxels

    back = to_input_grid(std[0].numpy().astype(np.uint8), geometry, mode="nearest")
    assert back.shape == shape and back.dtype == np.uint8
    dice = 2 * ((back > 0) & (blob > 0)).sum() / ((back > 0).sum() + (blob > 0).sum())
    assert dice > 0.9
    assert set(np.unique(back)) <= {0, 5}  # nearest: no new label values


@pytest.mark.parametrize("affine", [LPS, PIL_ANISO], ids=["lps_1mm", "permuted_anisotropic"])
def test_label_maps_resample_only_their_support_with_the_whole_grid_result(write_nifti, affine):
    shape = (40, 36, 30)
    path = write_nifti("ct.nii.gz", np.zeros(shape, np.int16), affine)
    _, geometry = _standardised(path, "linear")
    rng = np.random.default_rng(1)
    label = np.zeros(geometry.standard_shape, np.uint8)
    centre = np.asarray(geometry.standard_shape) // 3
    label[tuple(slice(c - 4, c + 5) for c in centre)] = 1
    label[tuple(slice(c - 1, c + 3) for c in centre)] = 2
    label[0, :3, -2:] = 1  # support at the grid's border: border padding must match too
    label[rng.random(label.shape) < 0.002] = 2
    whole = geometry_module._resample(
        torch.as_tensor(label), geometry.standard_affine_array, geometry.input_affine, geometry.shape, "nearest"
    )
    back = to_input_grid(label, geometry, mode="nearest")
    assert back.dtype == np.uint8 and np.array_equal(back, cast_to(whole, np.uint8))
    assert np.count_nonzero(back == 2) > 0
    assert not to_input_grid(np.zeros_like(label), geometry, mode="nearest").any()


def test_linear_mode_casts_to_input_dtype_with_clipping(write_nifti):
    ct = np.full((8, 8, 8), 100, dtype=np.int16)
    path = write_nifti("ct.nii.gz", ct, LPS)
    std, geometry = _standardised(path, "linear")
    data = std[0].numpy().copy()
    data[0, 0, 0] = 1e6  # beyond int16: clipped, not wrapped
    back = to_input_grid(data, geometry, mode="linear")
    assert back.dtype == np.int16 and back.max() == np.iinfo(np.int16).max and back.min() == 100
    as_float = to_input_grid(data, geometry, mode="linear", dtype=np.float32)
    assert as_float.dtype == np.float32 and as_float.max() == 1e6


def test_wrong_shape_is_rejected(write_nifti):
    path = write_nifti("ct.nii.gz", np.zeros((6, 6, 6), np.int16), LPS)
    _, geometry = _standardised(path, "linear")
    with pytest.raises(ValueError, match="standardised grid"):
        to_input_grid(np.zeros((5, 6, 6)), geometry)


def test_record_json_round_trip(write_nifti, tmp_path):
    path = write_nifti("ct.nii.gz", np.zeros((10, 6, 4), np.int16), PIL_ANISO)
    _, geometry = _standardised(path, "linear")
    assert geometry.dtype == "int16" and geometry.shape == (10, 6, 4)
    assert np.allclose(geometry.input_affine, PIL_ANISO)
    out = write_geometry(tmp_path / "geometry.json", geometry)
    obj = json.loads(out.read_text())
    assert obj["version"] == "1.0" and obj["path"] == str(path.resolve())
    assert read_geometry(out) == geometry


def test_malformed_record_is_a_one_line_error(tmp_path):
    bad = tmp_path / "geometry.json"
    bad.write_text(json.dumps({"path": "x", "affine": [[1, 0], [0, 1]], "shape": [1, 2, 3], "dtype": "int16"}))
    with pytest.raises(InputError, match="not a valid geometry record") as err:
        read_geometry(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_save_on_input_grid_writes_the_input_geometry(write_nifti, tmp_path):
    rng = np.random.default_rng(1)
    ct = rng.integers(-200, 200, (12, 10, 8)).astype(np.int16)
    path = write_nifti("ct.nii.gz", ct, PIL_ANISO)
    std, geometry = _standardised(path, "linear")
    out = save_on_input_grid(tmp_path / "out.nii.gz", std[0], geometry, mode="linear")
    img = nib.load(str(out))
    assert img.shape == ct.shape and img.get_data_dtype() == np.int16
    assert np.allclose(img.affine, PIL_ANISO)
    assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(PIL_ANISO)


def test_cast_to_rounds_integers():
    assert cast_to(np.array([1.4, 1.6, -300.0]), np.uint8).tolist() == [1, 2, 0]
    assert cast_to(np.array([1.4]), np.float32).dtype == np.float32


def test_geometry_is_frozen_and_typed():
    g = InputGeometry("p", tuple(map(tuple, np.eye(4))), (1, 2, 3), "int16", tuple(map(tuple, np.eye(4))), (1, 2, 3))
    assert g.numpy_dtype == np.int16
    with pytest.raises(AttributeError):
        g.dtype = "float32"  # type: ignore[misc]
