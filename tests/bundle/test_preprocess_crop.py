"""Preprocess standardises only the organ's neighbourhood: the same voxels, organ map, boxes, reports and scan
measures as standardising the whole scan (real CT crop, v2 organ map)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.manifest import read_manifest
from lesiondiffusion.pipelines.standard_grid import resample_region, standard_grid
from lesiondiffusion_tools.bundle_runner import run_bundle_in_process

SMALL = Path(__file__).resolve().parents[1] / "data" / "ts_small"
CT, SEG = SMALL / "example_ct_sm.nii.gz", SMALL / "example_seg.nii.gz"


def test_standard_grid_and_a_region_match_the_whole_scan_chain() -> None:
    from monai.transforms import LoadImage, Orientation, Spacing

    img = nib.load(CT)
    whole = Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear", padding_mode="border")(
        Orientation(axcodes="RAS", labels=None)(LoadImage(image_only=True, ensure_channel_first=True)(str(CT)))
    )
    affine, shape = standard_grid(img.affine, img.shape)
    assert shape == tuple(whole.shape[1:]) and np.allclose(affine, np.asarray(whole.affine), atol=1e-6)
    start, stop = np.array([0, 40, 10]), np.array([90, 130, 60])  # one edge on the scan's border
    region = resample_region(np.asanyarray(img.dataobj), img.affine, affine, start, stop)
    assert np.abs(region - whole[0].numpy()[0:90, 40:130, 10:60]).max() < 0.05  # HU, float rounding only


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for mode, margin in (("region", 48.0), ("whole", "")):
        folder = tmp_path_factory.mktemp(mode) / "out"
        request = {"organ type": "liver", "lesion type": "cyst"}
        run_bundle_in_process("preprocess", {
            "image": str(CT), "organ_seg": str(SEG), "attributes": json.dumps(request), "output_dir": str(folder),
            "crop_margin_mm": margin, "num_lesions": 2, "seed": 4,
        })  # fmt: skip
        out[mode] = read_manifest(folder / "manifest.json").cases[0]
    return out


def test_region_is_the_whole_scans_voxels_and_smaller(prepared: dict) -> None:
    region, whole = prepared["region"], prepared["whole"]
    ri, wi = nib.load(region.image), nib.load(whole.image)
    assert np.allclose(ri.affine[:3, :3], wi.affine[:3, :3])
    shift = np.rint(np.linalg.inv(wi.affine) @ ri.affine[:, 3])[:3].astype(int)
    box = tuple(slice(a, a + n) for a, n in zip(shift, ri.shape))
    assert np.prod(ri.shape) < 0.8 * np.prod(wi.shape)  # only the neighbourhood was standardised
    assert np.array_equal(np.asanyarray(ri.dataobj), np.asanyarray(wi.dataobj)[box])
    seg_r, seg_w = (np.asanyarray(nib.load(c.organ_seg).dataobj) for c in (region, whole))
    assert np.array_equal(seg_r, seg_w[box])
    assert (seg_w == 5).sum() == (seg_r == 5).sum() > 0  # the whole liver lies inside the region
    assert region.extra["scan"] == whole.extra["scan"] and region.extra["scan"]["aorta_hu"] is not None
    for a, b in zip(region.lesions, whole.lesions, strict=True):
        assert tuple(np.add(a.box.centre, shift)) == tuple(b.box.centre) and a.box.size == b.box.size
        ra, rb = json.loads(Path(a.report).read_text()), json.loads(Path(b.report).read_text())
        assert ra["5"][2] == rb["5"][2]  # the attributes; element 3 holds the box in each grid's voxels
