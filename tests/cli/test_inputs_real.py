"""Inputs as users have them: a real DICOM series (folder) and NRRD files, with a v2 organ map.

``tests/data/dicom_series/``: 8 slices of TotalSegmentator's example DICOM series and the matching slab
of its organ map (v2 ids, stored with flipped axes as dcm2niix writes it). NRRD files are written from
the ``ts_small`` CT crop here. Synthesis uses the shipped weights with one sampling step.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from lesiondiffusion.errors import InputError
from lesiondiffusion.geometry import same_grid
from lesiondiffusion.io import as_nifti, image_stem, read_image
from lesiondiffusion.paste import outside_margin

DATA = Path(__file__).resolve().parents[1] / "data"
SERIES = DATA / "dicom_series" / "ct"
SERIES_SEG = DATA / "dicom_series" / "organ_seg.nii.gz"
TS_CT = DATA / "ts_small" / "example_ct_sm.nii.gz"
TS_SEG = DATA / "ts_small" / "example_seg.nii.gz"
LIVER = {"organ type": "liver", "lesion type": "cyst", "density": "hypodense", "size": "12 mm"}
MARGIN_MM = 3.0


def dicom_hu_at_world(points_ras: np.ndarray) -> np.ndarray:
    """HU of the series at world points (RAS mm, on voxel centres), straight from pydicom: an independent reading."""
    slices = [pydicom.dcmread(str(f)) for f in sorted(SERIES.iterdir())]
    out = np.empty(len(points_ras))
    for n, p in enumerate(points_ras):
        lps = np.array([-p[0], -p[1], p[2]])
        ds = min(slices, key=lambda d: abs(float(d.ImagePositionPatient[2]) - lps[2]))
        origin = np.asarray(ds.ImagePositionPatient, float)
        row_dir, col_dir = (
            np.asarray(ds.ImageOrientationPatient[:3], float),
            np.asarray(ds.ImageOrientationPatient[3:], float),
        )
        dr, dc = (float(v) for v in ds.PixelSpacing)
        col = int(round(np.dot(lps - origin, row_dir) / dc))
        row = int(round(np.dot(lps - origin, col_dir) / dr))
        out[n] = ds.pixel_array[row, col] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return out


def test_dicom_series_has_the_true_geometry_and_hu():
    img = read_image(SERIES)
    seg = nib.load(str(SERIES_SEG))
    assert img.shape == (512, 512, 8) and img.get_data_dtype() == np.int16
    assert np.allclose(np.sqrt((img.affine[:3, :3] ** 2).sum(0)), [0.9765625, 0.9765625, 2.0])
    # the organ map of the same scan lies on the same voxels (its axes stored flipped)
    assert not np.allclose(img.affine, seg.affine) and same_grid(img.affine, img.shape, seg.affine, seg.shape)
    # HU after rescale, checked against pydicom at random voxels
    rng = np.random.default_rng(0)
    ijk = np.stack([rng.integers(0, s, 50) for s in img.shape], axis=1)
    world = np.c_[ijk, np.ones(50)] @ img.affine.T
    data = np.asanyarray(img.dataobj)
    assert np.array_equal(data[tuple(ijk.T)], dicom_hu_at_world(world[:, :3]))
    # the liver of the organ map (v2 id 5) is soft tissue in the CT at the same world position
    to_seg = np.linalg.inv(seg.affine) @ img.affine
    liver_ijk = np.argwhere(np.asanyarray(seg.dataobj) == 5)[::97]
    ct_ijk = np.rint((np.c_[liver_ijk, np.ones(len(liver_ijk))] @ np.linalg.inv(to_seg).T)[:, :3]).astype(int)
    assert 40 < float(np.median(data[tuple(ct_ijk.T)])) < 200


def nrrd_from_nifti(src: Path, dst: Path, detached: bool = False) -> Path:
    """The NIfTI's voxels and geometry as an NRRD in LPS space (as 3D Slicer writes it)."""
    img = nib.load(str(src))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "encoding": "gzip",
    }
    nrrd.write(str(dst), np.asanyarray(img.dataobj), header, detached_header=detached)
    return dst


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr"])
def test_nrrd_images_and_label_maps_convert_with_their_geometry(tmp_path, suffix):
    for src, label in ((TS_CT, False), (TS_SEG, True)):
        path = nrrd_from_nifti(src, tmp_path / (src.name.split(".")[0] + suffix), detached=suffix == ".nhdr")
        ref = nib.load(str(src))
        img = read_image(path, label=label)
        assert np.allclose(img.affine, ref.affine) and np.array_equal(
            np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj)
        )
        assert img.get_data_dtype() == ref.get_data_dtype()
        out = as_nifti(path, tmp_path / "converted", "x.nii.gz", label=label)
        assert out.parent == tmp_path / "converted" and np.allclose(nib.load(str(out)).affine, ref.affine)
    assert as_nifti(TS_CT, tmp_path / "converted", "y.nii.gz") == TS_CT  # a NIfTI is used as it is
    assert image_stem("a/ct.nrrd") == "ct" and image_stem("a/ct.nii.gz") == "ct" and image_stem(SERIES) == "ct"


def test_unreadable_inputs_are_one_line_naming_the_path(tmp_path):
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: gzip\n\n\x00\x01")
    with pytest.raises(InputError) as err:
        read_image(bad)
    assert str(err.value).startswith(f"{bad}:") and "\n" not in str(err.value)
    broken = nrrd_from_nifti(TS_CT, tmp_path / "broken.nrrd")
    broken.write_bytes(broken.read_bytes()[:-4000])  # truncated data
    with pytest.raises(InputError, match=f"^{broken}: unreadable NRRD"):
        read_image(broken)
    empty = tmp_path / "series"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    with pytest.raises(InputError, match=f"^{empty}: no DICOM image files"):
        read_image(empty)
    gap = tmp_path / "gap"
    shutil.copytree(SERIES, gap)
    sorted(gap.iterdir())[3].unlink()  # a missing slice would stretch the grid silently
    with pytest.raises(InputError, match=f"^{gap}: slices are unevenly spaced"):
        read_image(gap)


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lesiondiffusion_tools.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def test_synthesize_dicom_series_and_v2_ct_without_flags(tmp_path):
    """One batch: the DICOM series with its map, and the ts_small CT with its v2 map (no --organ_seg_version)."""
    requests = {"requests": [
        {"case": "series", "image": str(SERIES), "organ_seg": str(SERIES_SEG), "attributes": LIVER},
        {"case": "ts_small", "image": str(TS_CT), "organ_seg": str(TS_SEG), "attributes": LIVER},
    ]}  # fmt: skip
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    out = tmp_path / "synth"
    before = snapshot(DATA / "dicom_series")
    run = cli(
        "synthesize", "--requests", str(tmp_path / "requests.json"), "--out", str(out), "--steps", "1", "--margin_mm", str(MARGIN_MM),
        "--keep_work",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert snapshot(DATA / "dicom_series") == before  # nothing written beside the input

    # preprocess turned the series into a NIfTI inside its own output, on the series' grid, and read the flipped v2 map
    prep = out / "work" / "preprocess"
    case = json.loads((prep / "manifest.json").read_text())["testing"][0]
    assert (
        case["status"] == "ok" and case["organ_seg_version"] == "v2" and case["input_image"] == str(SERIES.absolute())
    )
    assert case["case"] == "series"  # preprocessing names each case as the request does
    assert case["source_image"].endswith("preprocess/series/source_image.nii.gz")
    converted, series = nib.load(str(prep / "series" / "source_image.nii.gz")), read_image(SERIES)
    assert np.array_equal(converted.affine, series.affine) and np.array_equal(
        np.asanyarray(converted.dataobj), np.asanyarray(series.dataobj)
    )
    geometry = json.loads((prep / "series" / "geometry.json").read_text())
    assert geometry["path"] == case["source_image"] and geometry["shape"] == [512, 512, 8]
    organ = np.asanyarray(nib.load(str(prep / "series" / "organ_seg.nii.gz")).dataobj)
    assert (organ == 5).sum() > 1000 and not (organ > 104).any()  # converted to v1

    for name, reference in (("series", read_image(SERIES)), ("ts_small", nib.load(str(TS_CT)))):
        result = nib.load(str(out / name / "image.nii.gz"))
        label = np.asanyarray(nib.load(str(out / name / "label.nii.gz")).dataobj)
        assert result.shape == reference.shape and np.allclose(result.affine, reference.affine, atol=1e-6)
        assert result.get_data_dtype() == reference.get_data_dtype()
        before, after = np.asanyarray(reference.dataobj), np.asanyarray(result.dataobj)
        far = outside_margin(label == 2, result.affine, MARGIN_MM)
        assert (label == 2).any() and np.array_equal(after[far], before[far])
        assert not np.array_equal(after, before)
        provenance = json.loads((out / name / "provenance.json").read_text())
        assert provenance["request"]["organ_seg_version"] == "v2"
