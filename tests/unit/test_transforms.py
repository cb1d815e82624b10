import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged

from lesiondiffusion.io import save_nifti
from lesiondiffusion.transforms import HU_KNOTS, UNIT_KNOTS, CTIntensityMap, CTIntensityMapd, hu_to_unit, unit_to_hu


def test_inverse_within_one_hu_over_range():
    hu = np.linspace(-1000, 1000, 40001, dtype=np.float32)
    back = unit_to_hu(hu_to_unit(hu))
    assert np.abs(back - hu).max() < 1.0


def test_knots_and_clipping():
    out = hu_to_unit(np.array([-3000, -1000, -200, 0, 200, 1000, 3000], dtype=np.float32))
    np.testing.assert_allclose(out, [0, 0, 0.2, 0.5, 0.8, 1, 1], atol=1e-6)
    np.testing.assert_allclose(
        out, np.interp([-3000, -1000, -200, 0, 200, 1000, 3000], HU_KNOTS, UNIT_KNOTS), atol=1e-6
    )


def test_integer_input_and_custom_knots():
    out = CTIntensityMap(hu=(-100, 100), unit=(0, 1))(np.array([-100, 0, 100], dtype=np.int16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0.5, 1])


def test_dict_transform_keeps_metadata_in_a_monai_pipeline(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    data = np.random.default_rng(0).integers(-1000, 1000, (8, 9, 10)).astype(np.int16)
    save_nifti(tmp_path / "ct.nii.gz", data, affine)
    pipeline = Compose([LoadImaged("image", image_only=True), CTIntensityMapd("image")])
    out = pipeline({"image": str(tmp_path / "ct.nii.gz")})["image"]
    assert isinstance(out, MetaTensor)
    np.testing.assert_allclose(out.affine.numpy(), affine, atol=1e-6)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    back = CTIntensityMapd("image", inverse=True)({"image": out})["image"]
    assert torch.allclose(back, torch.as_tensor(data, dtype=torch.float32), atol=0.5)
