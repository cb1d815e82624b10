"""Datasets and requests files declare their organ maps' numbering ("organ_seg_version"); readers honour
the declaration before telling a map's numbering from its anatomy, and an explicit flag wins over it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.dataset import datalist_version, lists_to_datalist, read_datalist
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import load_nifti, read_json
from lesiondiffusion.labels import detect_version
from lesiondiffusion.manifest import MANIFEST_NAME, read_manifest
from lesiondiffusion.phantom_dataset import build_dataset
from lesiondiffusion.real_dataset import threshold_organ_map
from lesiondiffusion.requests import read_requests
from lesiondiffusion_tools.bundle_runner import BundleRunError, run_bundle_in_process
from lesiondiffusion_tools.cli import Commands
from lesiondiffusion_tools.synthesize import CaseState, SynthesisSettings, _stage_overrides, _write_inputs

sys.path.insert(0, str(Path(__file__).parent))
from test_real_dataset import synthetic_chest  # noqa: E402


def _ambiguous(path: Path) -> bool:
    img = load_nifti(path)
    try:
        detect_version(np.asanyarray(img.dataobj), img.affine, path)
    except InputError as e:
        return "cannot tell" in str(e)
    return False


def _validate(capsys: pytest.CaptureFixture, datalist: Path, version: str = "auto") -> tuple[int, str]:
    try:
        Commands().validate(datalist=str(datalist), organ_seg_version=version)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().out


def test_phantom_dataset_declares_v1_and_validates_where_anatomy_cannot_tell(
    demo_src: Path, tmp_path: Path, capsys
) -> None:
    out = build_dataset(demo_src, tmp_path / "phantom", 3, seed=0)  # seed 0: two of its three crops are undecidable
    obj = read_json(out / "datalist.json")
    assert obj["organ_seg_version"] == "v1" and datalist_version(out / "datalist.json") == "v1"
    cases = [c for split in read_datalist(out / "datalist.json").values() for c in split]
    assert any(_ambiguous(c.organ_seg) for c in cases)  # anatomy alone cannot place this crop's numbering
    assert _validate(capsys, out / "datalist.json")[0] == 0  # the declaration settles it, no flag

    undeclared = out / "undeclared.json"  # beside the original: its relative paths still hold
    undeclared.write_text(json.dumps({k: v for k, v in obj.items() if k != "organ_seg_version"}))
    code, text = _validate(capsys, undeclared)
    assert code == 1 and "cannot tell whether the organ map uses TotalSegmentator v1 or v2" in text

    wrong = out / "declared_v2.json"  # a wrong declaration misreads the v1 maps; the explicit flag wins over it
    wrong.write_text(json.dumps({**obj, "organ_seg_version": "v2"}))
    assert _validate(capsys, wrong)[0] == 1
    assert _validate(capsys, wrong, "v1")[0] == 0

    bad = out / "bad.json"
    bad.write_text(json.dumps({**obj, "organ_seg_version": "v3"}))
    with pytest.raises(InputError, match=r"bad.json: 'organ_seg_version' must be one of v1, v2, got 'v3'"):
        datalist_version(bad)

    # list files cannot say the numbering; the conversion to a datalist declares it when told
    converted = lists_to_datalist(out, tmp_path / "converted.json", "v1")
    assert read_json(converted)["organ_seg_version"] == "v1" and _validate(capsys, converted)[0] == 0
    assert "organ_seg_version" not in read_json(lists_to_datalist(out, tmp_path / "plain.json"))


def test_requests_file_version_is_per_entry_over_top_level(tmp_path: Path) -> None:
    path = tmp_path / "requests.json"
    entry = {
        "image": "ct.nii.gz",
        "organ_seg": "seg.nii.gz",
        "attributes": {"organ type": "liver", "lesion type": "cyst"},
    }
    path.write_text(json.dumps({"organ_seg_version": "v1", "requests": [
        {"case": "a", **entry}, {"case": "b", **entry, "organ_seg_version": "v2"}]}))  # fmt: skip
    assert [r.organ_seg_version for r in read_requests(path)] == ["v1", "v2"]
    path.write_text(json.dumps({"requests": [{"case": "a", **entry, "organ_seg_version": "V1"}]}))
    with pytest.raises(InputError, match=r"requests\[0\]: 'organ_seg_version' must be one of v1, v2, got 'V1'"):
        read_requests(path)


def test_declared_v1_lungs_only_map_preprocesses_without_the_flag(tmp_path: Path) -> None:
    """A synthetic chest with its lungs-only threshold map (v1), which anatomy cannot place, run through the
    preprocess stage exactly as ``synthesize --requests`` hands it over (in this process, as its chain runs)."""
    image, affine, *_ = synthetic_chest()
    seg = threshold_organ_map(image, affine, "v1")
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), tmp_path / "seg.nii.gz")
    assert _ambiguous(tmp_path / "seg.nii.gz")
    entry = {"image": "ct.nii.gz", "organ_seg": "seg.nii.gz",
             "attributes": {"organ type": "lung upper lobe left", "lesion type": "tumor", "size": "8 mm"}}  # fmt: skip
    (tmp_path / "requests.json").write_text(json.dumps({"requests": [
        {"case": "declared_v1", **entry, "organ_seg_version": "v1"},
        {"case": "undeclared", **entry},
        {"case": "declared_v2", **entry, "organ_seg_version": "v2"},
    ]}))  # fmt: skip
    states = [CaseState(r) for r in read_requests(tmp_path / "requests.json")]

    def preprocess(flag: str) -> list:
        work = tmp_path / f"work_{flag}"
        work.mkdir()
        overrides = {
            **_stage_overrides("preprocess", SynthesisSettings(organ_seg_version=flag), {}),
            **_write_inputs(work, states),
        }
        try:
            run_bundle_in_process("preprocess", {**overrides, "output_dir": str(work / "preprocess")})
        except BundleRunError as e:  # a failed case: named in one line, after the manifest of every case
            cases = read_manifest(work / "preprocess" / MANIFEST_NAME).cases
            failed = [c.case for c in cases if not c.ok]
            assert str(e).startswith(f"error: {len(failed)} of 3 case(s) failed ({failed[0]}: ") and failed, e
        return list(read_manifest(work / "preprocess" / MANIFEST_NAME).cases)

    declared, undeclared, wrong = preprocess("auto")
    assert declared.ok and declared.extra["organ_seg_version"] == "v1"
    assert not undeclared.ok and "cannot tell whether the organ map uses TotalSegmentator v1 or v2" in undeclared.error
    assert (
        not wrong.ok and "absent from the organ segmentation" in wrong.error
    )  # read as v2, the left upper lobe is gone
    # the explicit flag wins over every declaration
    assert [(c.ok, c.extra.get("organ_seg_version")) for c in preprocess("v1")] == [(True, "v1")] * 3


def test_an_unknown_declaration_in_a_version_list_is_one_error(tmp_path: Path) -> None:
    from lesiondiffusion.pipelines.preprocess_inputs import read_version_lines

    (tmp_path / "v.txt").write_text("v1\nauto\nv4\n")
    with pytest.raises(LesionDiffusionError, match=r"v.txt:3: 'v4' is not one of v1, v2, auto"):
        read_version_lines(tmp_path / "v.txt", 3)
    (tmp_path / "v.txt").write_text("v1\nauto\n")
    assert read_version_lines(tmp_path / "v.txt", 2) == ["v1", None]
