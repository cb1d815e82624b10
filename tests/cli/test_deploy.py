"""The MONAI Deploy application (deploy/app.py) in its own environment, made by ``make deploy-venv``.

The environment holds monai-deploy-app-sdk, holoscan (CPU-only here, libcudart preloaded from the pip
wheel) and highdicom beside torch and monai, and this project as a built wheel. The application runs
in-process on a NIfTI CT and as ``python app.py -i IN -o OUT`` on a DICOM series; its synthetic CT and
label must equal, voxel for voxel, what ``lesiondiffusion synthesize`` writes for the same request and
seed, and the DICOM input also gets a DICOM Segmentation of exactly the lesion's voxels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.data_paths import REPO_ROOT

PYTHON = REPO_ROOT / ".deployvenv" / "bin" / "python"
APP = REPO_ROOT / "deploy" / "app.py"
ATTRIBUTES = {"organ type": "liver", "lesion type": "cyst", "size": "10 mm"}
CASES = {
    "nifti": (
        REPO_ROOT / "tests/data/ts_small/example_ct_sm.nii.gz",
        REPO_ROOT / "tests/data/ts_small/example_seg.nii.gz",
    ),
    "dicom": (REPO_ROOT / "tests/data/dicom_series/ct", REPO_ROOT / "tests/data/dicom_series/organ_seg.nii.gz"),
}


@pytest.fixture(scope="module")
def deploy_env() -> Path:
    run = subprocess.run(["make", "deploy-venv"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return PYTHON


def request_folder(tmp: Path, kind: str) -> Path:
    folder = tmp / f"in_{kind}"
    folder.mkdir()
    image, seg = CASES[kind]
    (folder / "request.json").write_text(
        json.dumps({"image": str(image), "organ_seg": str(seg), "attributes": ATTRIBUTES, "seed": 0, "steps": 2})
    )
    return folder


def cli_reference(tmp: Path, kind: str) -> Path:
    image, seg = CASES[kind]
    out = tmp / f"cli_{kind}"
    cmd = [sys.executable, "-m", "lesiondiffusion", "synthesize", "--image", str(image), "--organ_seg", str(seg),
           "--attributes", json.dumps(ATTRIBUTES), "--seed", "0", "--steps", "2", "--out", str(out)]  # fmt: skip
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    return case


def assert_same(app_out: Path, reference: Path) -> np.ndarray:
    for name in ("image.nii.gz", "label.nii.gz"):
        a, b = nib.load(app_out / name), nib.load(reference / name)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.array_equal(a.affine, b.affine), name
    assert json.loads((app_out / "report.json").read_text()) == json.loads((reference / "report.json").read_text())
    return np.asarray(nib.load(app_out / "label.nii.gz").dataobj) == 2


def test_app_in_process_on_nifti(deploy_env: Path, tmp_path: Path) -> None:
    folder, out = request_folder(tmp_path, "nifti"), tmp_path / "out_nifti"
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.argv = ['app', '-i', sys.argv[2], '-o', sys.argv[3]];"
        "import app; application = app.LesionSynthesisApp(); application.run();"
        "import monai.deploy, lesiondiffusion; print('MODULES', monai.deploy.__file__, lesiondiffusion.__file__)"
    )
    run = subprocess.run(
        [str(deploy_env), "-c", code, str(APP.parent), str(folder), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    modules = next(line for line in run.stdout.splitlines() if line.startswith("MODULES")).split()[1:]
    assert all(".deployvenv" in m for m in modules)  # the SDK and the installed wheel, not the source tree
    lesion = assert_same(out, cli_reference(tmp_path, "nifti"))
    assert lesion.sum() > 0 and not (out / "lesion_seg.dcm").exists()  # no DICOM input, no DICOM SEG


def test_app_command_on_dicom_writes_a_matching_dicom_seg(deploy_env: Path, tmp_path: Path) -> None:
    import pydicom

    folder, out = request_folder(tmp_path, "dicom"), tmp_path / "out_dicom"
    run = subprocess.run(
        [str(deploy_env), str(APP), "-i", str(folder), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lesion = assert_same(out, cli_reference(tmp_path, "dicom"))
    seg = pydicom.dcmread(out / "lesion_seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "synthetic lesion"
    assert int(seg.pixel_array.sum()) == int(lesion.sum()) > 0  # every lesion voxel, on the source slices
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(list(CASES["dicom"][0].iterdir()))
