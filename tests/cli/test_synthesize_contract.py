"""``lesiondiffusion synthesize`` end to end with the shipped weights: what the README promises.

- The output contract on a scaled, oblique input (a 1.5 mm, rotated crop of ``tests/data/ts_small``
  stored as uint16 with a -1024 intercept, qform code 1 and sform code 2): exact affine, both codes,
  slope and intercept, dtype; a uint8 0/1/2 label map on the same grid.
- ``--num_lesions 2``: two lesions in the case, ``report.json`` a list of both.
- ``--margin_mm 2 --feather_mm 1`` (not the defaults 3 and 2): every voxel 2 mm or more from a lesion is
  bit-identical to the input, those between 2 and 3 mm included, and provenance records both settings.
- A report provider that fails inside the run: the case fails in ``summary.json`` with one line, the
  command exits 1 with one error line, and the API key is in no written file nor on the terminal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from lesiondiffusion.labels import to_v1_map

SMALL = Path(__file__).resolve().parents[1] / "data" / "ts_small"
MARGIN_MM, FEATHER_MM = 2.0, 1.0

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lesiondiffusion_tools.cli", *args]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})},
    )


def oblique_affine(spacing: float) -> np.ndarray:
    """1.5 mm voxels rotated 20 degrees about the feet-head axis and 10 about left-right, off-origin."""
    a, b = np.radians(20), np.radians(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx * spacing
    affine[:3, 3] = [-40.0, 25.0, -310.0]
    return affine


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A liver-centred crop of ts_small, upsampled to 1.5 mm, on an oblique grid, stored as scaled uint16."""
    folder = tmp_path_factory.mktemp("oblique")
    ct = np.asarray(nib.load(SMALL / "example_ct_sm.nii.gz").dataobj).astype(np.float32)
    seg = np.asarray(nib.load(SMALL / "example_seg.nii.gz").dataobj)
    centre = np.rint(ndimage.center_of_mass(seg == 5)).astype(int)  # v2 liver
    box = tuple(slice(max(c - h, 0), c + h) for c, h in zip(centre, (20, 20, 8)))
    ct_up = ndimage.zoom(ct[box], 2, order=1)
    seg_up = ndimage.zoom(seg[box], 2, order=0)
    affine = oblique_affine(1.5)
    img = nib.Nifti1Image(np.clip(np.rint(ct_up + 1024), 0, 65535).astype(np.uint16), affine)
    img.header.set_slope_inter(1.0, -1024.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    image = folder / "ct.nii.gz"
    nib.save(img, str(image))
    organs = nib.Nifti1Image(seg_up.astype(np.uint8), affine)
    nib.save(organs, str(folder / "seg.nii.gz"))
    return {"image": image, "organ_seg": folder / "seg.nii.gz", "folder": folder}


@pytest.fixture(scope="module")
def two_lesions(oblique_case: dict) -> dict:
    out = oblique_case["folder"] / "out"
    attributes = {"organ type": "liver", "lesion type": "cyst", "density": "hypodense", "size": "10 mm"}
    run = cli(
        "synthesize", "--image", str(oblique_case["image"]), "--organ_seg", str(oblique_case["organ_seg"]),
        "--attributes", json.dumps(attributes), "--num_lesions", "2", "--steps", "3", "--seed", "1",
        "--margin_mm", str(MARGIN_MM), "--feather_mm", str(FEATHER_MM), "--out", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return {"out": out / "ct", "run": run, **oblique_case}


def test_output_contract_on_a_scaled_oblique_input(two_lesions: dict) -> None:
    src = nib.load(two_lesions["image"])
    out = nib.load(two_lesions["out"] / "image.nii.gz")
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    assert np.array_equal(out.get_qform(), src.get_qform()) and np.array_equal(out.get_sform(), src.get_sform())
    assert out.get_data_dtype() == np.uint16
    assert (out.dataobj.slope, out.dataobj.inter) == (1.0, -1024.0)
    for name in ("label.nii.gz", "organ_seg.nii.gz"):
        other = nib.load(two_lesions["out"] / name)
        assert other.shape == src.shape and np.array_equal(other.affine, src.affine)
        assert other.get_data_dtype() == np.uint8, name
    label = np.asarray(nib.load(two_lesions["out"] / "label.nii.gz").dataobj)
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    # the organ map given on the image's grid comes back whole and exact, in v1 ids (the chain itself
    # resamples only the organ's neighbourhood onto a 1 mm grid)
    given = np.asarray(nib.load(two_lesions["organ_seg"]).dataobj)
    organs = np.asarray(nib.load(two_lesions["out"] / "organ_seg.nii.gz").dataobj)
    assert np.array_equal(organs, to_v1_map(given, "v2"))


def test_two_lesions_are_written_and_reported(two_lesions: dict) -> None:
    reports = json.loads((two_lesions["out"] / "report.json").read_text())
    assert isinstance(reports, list) and len(reports) == 2
    assert all(list(r) == ["5"] for r in reports)  # both in the liver (v1 id 5)
    prov = json.loads((two_lesions["out"] / "provenance.json").read_text())
    assert len(prov["lesions"]) == 2 and prov["lesions_in_case"] == 2
    assert json.loads((two_lesions["out"].parent / "summary.json").read_text())["lesions"] == 2
    label = np.asarray(nib.load(two_lesions["out"] / "label.nii.gz").dataobj)
    assert ndimage.label(label == 2)[1] >= 2


def test_a_smaller_margin_and_feather_are_honoured_and_recorded(two_lesions: dict) -> None:
    src = nib.load(two_lesions["image"])
    before = np.asarray(src.dataobj.get_unscaled())
    after = np.asarray(nib.load(two_lesions["out"] / "image.nii.gz").dataobj.get_unscaled())
    lesion = np.asarray(nib.load(two_lesions["out"] / "label.nii.gz").dataobj) == 2
    distance = ndimage.distance_transform_edt(~lesion, sampling=[1.5, 1.5, 1.5])
    assert np.array_equal(after[distance >= MARGIN_MM], before[distance >= MARGIN_MM])
    between = (distance >= MARGIN_MM) & (distance < 3.0)  # inside the default margin, outside this run's
    assert between.sum() > 100  # there are such voxels, and (above) none of them changed
    assert (after[lesion] != before[lesion]).any()
    prov = json.loads((two_lesions["out"] / "provenance.json").read_text())
    assert (prov["parameters"]["margin_mm"], prov["parameters"]["feather_mm"]) == (MARGIN_MM, FEATHER_MM)
    linet = prov["bundles"]["linet"]["settings"]
    assert (linet["margin_mm"], linet["feather_mm"]) == (MARGIN_MM, FEATHER_MM)


def test_a_failing_report_provider_fails_the_case_in_one_line(oblique_case: dict, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "sk-test-do-not-write-7f3a9c"
    overrides = {
        "preprocess": {"report_base_url": f"http://127.0.0.1:{port}/v1", "report_max_retries": 0, "report_timeout": 5}
    }
    out = tmp_path / "out"
    run = cli(
        "synthesize", "--image", str(oblique_case["image"]), "--organ_seg", str(oblique_case["organ_seg"]),
        "--organ", "liver", "--lesion_type", "cyst", "--report_provider", "openai", "--bundle_overrides", json.dumps(overrides),
        "--steps", "2", "--out", str(out), env={"OPENAI_API_KEY": secret},
    )  # fmt: skip
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: 1 of 1 case(s) failed (see {out / 'summary.json'})"]
    summary = json.loads((out / "summary.json").read_text())
    (case,) = summary["cases"]
    assert case["status"] == "error" and case["stage"] == "preprocess"
    assert "report provider openai" in case["error"] and "\n" not in case["error"]
    assert not (out / "ct").exists()
    assert secret not in run.stdout + run.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
