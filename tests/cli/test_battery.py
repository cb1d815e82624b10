"""The bad-input battery: every user mistake is one error line, exit status 1, nothing written, inputs unchanged.

Each case runs ``lesiondiffusion synthesize`` (or another sub-command) through the real command-line
entry point on real NIfTI files (``tests/data/ts_small`` and broken variants of it) and asserts:

- the exit status is 1 and stderr holds exactly one ``error:`` line, naming the user's own option, file or
  request line, and no traceback;
- nothing partial is left: no output folder, no work folder, no lock file beside it;
- every input file is byte-identical afterwards.

All cases fail before any network runs (option parsing, input reading and :mod:`lesiondiffusion.sanity`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion_tools.cli import main

SMALL = Path(__file__).resolve().parents[1] / "data" / "ts_small"
LIVER = {"organ type": "liver", "lesion type": "cyst"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ts_small and broken variants of it, one folder (never written by the cases)."""
    d = tmp_path_factory.mktemp("battery_inputs")
    ct = nib.load(SMALL / "example_ct_sm.nii.gz")
    seg = nib.load(SMALL / "example_seg.nii.gz")
    hu = np.asarray(ct.dataobj)
    labels = np.asarray(seg.dataobj)
    nib.save(ct, d / "ct.nii.gz")
    nib.save(seg, d / "seg.nii.gz")

    def save(name: str, arr: np.ndarray, affine: np.ndarray = ct.affine) -> None:
        nib.save(nib.Nifti1Image(arr, affine), d / name)

    nan = hu.astype(np.float32)
    nan[labels == 5] = np.nan  # v2 liver
    save("nan.nii.gz", nan)
    inf = hu.astype(np.float32)
    inf[tuple(np.argwhere(labels == 5)[0])] = np.inf
    save("inf.nii.gz", inf)
    save("constant.nii.gz", np.full(hu.shape, -1000, np.int16))
    save("unscaled.nii.gz", (hu.astype(np.int32) + 1024).astype(np.uint16))
    save("air.nii.gz", np.full(hu.shape, -1000, np.int16) + (np.arange(hu.size).reshape(hu.shape) % 7).astype(np.int16))
    floats = labels.astype(np.float32)
    floats[labels == 5] = 104.4
    save("float_seg.nii.gz", floats)
    negative = labels.astype(np.int16)
    negative[0, 0, 0] = -3
    save("negative_seg.nii.gz", negative)
    one = np.zeros_like(labels)
    one[60, 50, 15] = 5
    save("one_voxel_seg.nii.gz", one)
    save("flat.nii.gz", hu[:, :, 0])
    save("cropped_seg.nii.gz", labels[:-4])
    shifted = seg.affine.copy()
    shifted[:3, 3] += 15.0
    save("shifted_seg.nii.gz", labels, shifted)
    save("frames.nii.gz", np.stack([hu, hu], axis=-1))
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "truncated.nii.gz").write_bytes((d / "ct.nii.gz").read_bytes()[:2000])
    (d / "text.nii.gz").write_text("not an image\n")
    (d / "garbage").write_bytes(gzip.compress(b"\0" * 400))
    (d / "empty_dir").mkdir()
    (d / "not_dicom").mkdir()
    (d / "not_dicom" / "readme.txt").write_text("hello\n")
    (d / "blank_line.txt").write_text(f"{d / 'ct.nii.gz'}\n\n{d / 'ct.nii.gz'}\n")
    (d / "images.txt").write_text(f"{d / 'ct.nii.gz'}\n{d / 'ct.nii.gz'}\n")
    (d / "attrs_short.txt").write_text(json.dumps(LIVER) + "\n")
    (d / "attrs_bad.txt").write_text(
        json.dumps({**LIVER, "organ type": "spleeen"}) + "\n" + json.dumps({**LIVER, "organ type": "livr"}) + "\n"
    )
    (d / "bad_json.json").write_text('{"requests": [')
    (d / "empty_requests.json").write_text('{"requests": []}')
    entry = {"case": "a", "image": "ct.nii.gz", "organ_seg": "seg.nii.gz", "attributes": LIVER}
    (d / "traversal.json").write_text(json.dumps({"requests": [{**entry, "case": "../escape"}]}))
    (d / "twice.json").write_text(json.dumps({"requests": [entry, entry]}))
    (d / "unknown_value.json").write_text(
        json.dumps(
            {
                "requests": [
                    {**entry, "attributes": {**LIVER, "shape": "star"}},
                    {**entry, "case": "b", "attributes": {**LIVER, "shape": "sphere"}},
                ]
            }
        )
    )
    (d / "a_file").write_text("x\n")
    return d


def ok_base(d: Path, **attrs: str) -> list[str]:
    return ["synthesize", "--image", str(d / "ct.nii.gz"), "--organ_seg", str(d / "seg.nii.gz"), "--attributes",
            json.dumps({**LIVER, **attrs})]  # fmt: skip


def with_image(image: str, seg: str = "seg.nii.gz", **attrs: str) -> Callable[[Path], list[str]]:
    return lambda d: [
        "synthesize",
        "--image",
        str(d / image),
        "--organ_seg",
        str(d / seg),
        "--attributes",
        json.dumps({**LIVER, **attrs}),
    ]


# (id, arguments given the inputs folder (--out is added unless given), words the error line must hold)
CASES: list[tuple[str, Callable[[Path], list[str]], tuple[str, ...]]] = [
    # options
    ("seed_text", lambda d: [*ok_base(d), "--seed", "abc"], ("--seed", "whole number")),
    ("num_lesions_text", lambda d: [*ok_base(d), "--num_lesions", "abc"], ("--num_lesions",)),
    ("guidance_text", lambda d: [*ok_base(d), "--guidance", "abc"], ("--guidance", "number")),
    ("guidance_nan", lambda d: [*ok_base(d), "--guidance", "nan"], ("--guidance",)),
    ("steps_fraction", lambda d: [*ok_base(d), "--steps", "1.5"], ("--steps",)),
    ("steps_zero", lambda d: [*ok_base(d), "--steps", "0"], ("--steps",)),
    ("num_lesions_zero", lambda d: [*ok_base(d), "--num_lesions", "0"], ("--num_lesions",)),
    ("sampler_unknown", lambda d: [*ok_base(d), "--sampler", "euler"], ("--sampler",)),
    ("margin_negative", lambda d: [*ok_base(d), "--margin_mm", "-1"], ("--margin_mm",)),
    ("overwrite_maybe", lambda d: [*ok_base(d), "--overwrite", "maybe"], ("--overwrite", "true or false")),
    ("unknown_option", lambda d: [*ok_base(d), "--sed", "1"], ("--sed", "unknown option")),
    ("option_twice", lambda d: [*ok_base(d), "--seed", "1", "--seed", "2"], ("--seed", "twice")),
    ("seed_without_value", lambda d: [*ok_base(d), "--seed"], ("--seed", "needs a value")),
    (
        "attributes_bad_json",
        lambda d: ["synthesize", "--image", str(d / "ct.nii.gz"), "--attributes", "{bad"],
        ("--attributes", "JSON"),
    ),
    (
        "attributes_list_json",
        lambda d: ["synthesize", "--image", str(d / "ct.nii.gz"), "--attributes", "[1, 2]"],
        ("attributes",),
    ),
    (
        "overrides_unknown_stage",
        lambda d: [*ok_base(d), "--bundle_overrides", '{"nosuch": {}}'],
        ("--bundle_overrides", "nosuch"),
    ),
    ("overrides_unknown_key", lambda d: [*ok_base(d), "--bundle_overrides", '{"linet": {"nokey": 1}}'], ("nokey",)),
    ("organ_seg_version", lambda d: [*ok_base(d), "--organ_seg_version", "v3"], ("--organ_seg_version",)),
    ("no_out", lambda d: [*ok_base(d), "--out", ""], ("--out",)),
    ("out_is_a_file", lambda d: [*ok_base(d), "--out", str(d / "a_file"), "--overwrite"], ("a_file", "not a folder")),
    ("out_under_a_file", lambda d: [*ok_base(d), "--out", str(d / "a_file" / "sub")], ("a_file",)),
    (
        "out_holds_the_inputs",
        lambda d: [*ok_base(d), "--out", str(d), "--overwrite"],
        ("ct.nii.gz", "inside the output"),
    ),
    ("device_unknown", lambda d: [*ok_base(d), "--device", "gpu7"], ("--device",)),
    ("device_cuda_absent", lambda d: [*ok_base(d), "--device", "cuda:3"], ("--device", "CUDA")),
    ("unknown_command", lambda d: ["synthesise", "--out", "x"], ("unknown command",)),
    (
        "evaluate_without_pred",
        lambda d: ["evaluate", "--out", str(d / "report")],
        ("evaluate: give --pred ... --requests ...",),
    ),
    # files
    ("image_missing", with_image("nope.nii.gz"), ("nope.nii.gz", "not found")),
    ("organ_seg_missing", with_image("ct.nii.gz", "nope_seg.nii.gz"), ("nope_seg.nii.gz",)),
    ("image_empty", with_image("empty.nii.gz"), ("empty.nii.gz",)),
    ("image_truncated", with_image("truncated.nii.gz"), ("truncated.nii.gz",)),
    ("image_text", with_image("text.nii.gz"), ("text.nii.gz",)),
    ("image_not_nifti_by_content", with_image("garbage"), ("garbage", "not a NIfTI")),
    ("image_2d", with_image("flat.nii.gz"), ("flat.nii.gz", "3D")),
    ("image_4d", with_image("frames.nii.gz"), ("frames.nii.gz", "3D")),
    ("folder_empty", with_image("empty_dir"), ("empty_dir", "DICOM")),
    ("folder_not_dicom", with_image("not_dicom"), ("not_dicom", "DICOM")),
    ("grid_shape_mismatch", with_image("ct.nii.gz", "cropped_seg.nii.gz"), ("cropped_seg.nii.gz", "shape")),
    ("grid_affine_mismatch", with_image("ct.nii.gz", "shifted_seg.nii.gz"), ("shifted_seg.nii.gz", "affine")),
    # scan content
    ("label_map_as_ct", with_image("seg.nii.gz"), ("seg.nii.gz", "label map")),
    ("nan_in_organ", with_image("nan.nii.gz"), ("nan.nii.gz", "non-finite", "liver")),
    ("inf_in_organ", with_image("inf.nii.gz"), ("inf.nii.gz", "non-finite")),
    ("constant_ct", with_image("constant.nii.gz"), ("constant.nii.gz", "image is constant")),
    ("not_hounsfield", with_image("unscaled.nii.gz"), ("unscaled.nii.gz", "Hounsfield")),
    ("all_air", with_image("air.nii.gz"), ("air.nii.gz",)),
    ("float_labels", with_image("ct.nii.gz", "float_seg.nii.gz"), ("float_seg.nii.gz", "whole numbers", "104.4")),
    ("negative_labels", with_image("ct.nii.gz", "negative_seg.nii.gz"), ("negative_seg.nii.gz", "negative")),
    ("organ_one_voxel", with_image("ct.nii.gz", "one_voxel_seg.nii.gz"), ("one_voxel_seg.nii.gz", "liver", "mm3")),
    (
        "organ_absent",
        with_image("ct.nii.gz", **{"organ type": "urinary bladder"}),
        ("seg.nii.gz", "urinary bladder", "not in"),
    ),
    ("size_beyond_organ", with_image("ct.nii.gz", size="500 mm"), ("seg.nii.gz", "liver", "500 x 500 x 500 mm")),
    # vocabulary
    (
        "lesion_type_unknown",
        with_image("ct.nii.gz", **{"lesion type": "dragon egg"}),
        ("--attributes", "dragon egg", "known"),
    ),
    ("organ_unknown", with_image("ct.nii.gz", **{"organ type": "livr"}), ("--attributes", "livr", "liver")),
    ("density_conflict", with_image("ct.nii.gz", density="hypodense hyperdense"), ("--attributes", "exclude")),
    ("density_unknown", with_image("ct.nii.gz", density="purple"), ("--attributes", "purple")),
    (
        "homogeneity_conflict",
        with_image("ct.nii.gz", **{"density variations": "homogeneous, heterogeneous"}),
        ("exclude",),
    ),
    ("attribute_unknown", with_image("ct.nii.gz", colour="blue"), ("colour",)),
    ("cavity_unknown", with_image("ct.nii.gz", cavity="inside out"), ("cavity",)),
    ("size_unreadable", with_image("ct.nii.gz", size="big"), ("--attributes", "lesion size 'big'")),
    ("size_negative", with_image("ct.nii.gz", size="-5 mm"), ("--attributes", "-5 mm")),
    ("ct_value_unreadable", with_image("ct.nii.gz", **{"CT value": "bright"}), ("--attributes", "CT value 'bright'")),
    ("ct_value_absurd", with_image("ct.nii.gz", **{"CT value": "90000 HU"}), ("--attributes", "90000")),
    (
        "text_contradiction",
        lambda d: ["synthesize", "--image", str(d / "ct.nii.gz"), "--text", "a hypodense hyperdense cyst in the liver"],
        ("--text",),
    ),  # fmt: skip
    ("text_no_organ", lambda d: ["synthesize", "--image", str(d / "ct.nii.gz"), "--text", "a cyst"], ("--text",)),
    # lists and requests files
    (
        "list_blank_line",
        lambda d: ["synthesize", "--image_list", str(d / "blank_line.txt"), "--attributes", json.dumps(LIVER)],
        ("blank_line.txt:2",),
    ),  # fmt: skip
    (
        "list_lengths",
        lambda d: [
            "synthesize",
            "--image_list",
            str(d / "images.txt"),
            "--attributes_list",
            str(d / "attrs_short.txt"),
        ],
        ("attrs_short.txt",),
    ),  # fmt: skip
    (
        "list_line_unknown_organ",
        lambda d: ["synthesize", "--image_list", str(d / "images.txt"), "--attributes_list", str(d / "attrs_bad.txt")],
        ("attrs_bad.txt:1", "spleeen"),
    ),  # fmt: skip
    ("requests_bad_json", lambda d: ["synthesize", "--requests", str(d / "bad_json.json")], ("bad_json.json", "JSON")),
    (
        "requests_empty",
        lambda d: ["synthesize", "--requests", str(d / "empty_requests.json")],
        ("empty_requests.json", "empty"),
    ),
    (
        "requests_traversal",
        lambda d: ["synthesize", "--requests", str(d / "traversal.json")],
        ("traversal.json", "../escape"),
    ),
    ("requests_case_twice", lambda d: ["synthesize", "--requests", str(d / "twice.json")], ("twice.json", "twice")),
    (
        "requests_unknown_value",
        lambda d: ["synthesize", "--requests", str(d / "unknown_value.json")],
        ("unknown_value.json: requests[0]", "star"),
    ),  # fmt: skip
    # other sub-commands
    ("train_no_datalist", lambda d: ["train", "--out", "x"], ("--datalist",)),
    ("train_epochs_text", lambda d: ["train", "--max_epochs", "many"], ("--max_epochs",)),
    (
        "make_dataset_into_its_source",
        lambda d: ["make-dataset", "--n", "1", "--src", str(d), "--out", str(d), "--overwrite"],
        ("inside the output",),
    ),
    ("make_dataset_n_fraction", lambda d: ["make-dataset", "--n", "2.5"], ("--n",)),
    ("preprocess_seed_text", lambda d: ["preprocess", "--seed", "x"], ("--seed",)),
    ("evaluate_tile_text", lambda d: ["evaluate", "--pred", "p", "--requests", "r", "--tile", "big"], ("--tile",)),
]


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` with the SHA-256 of each file (folders as "dir")."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def keep_signals():
    """``main`` turns SIGTERM into an exception for its cleanup; give pytest its own handlers back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_the_battery_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, build, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, build, words, inputs, tmp_path, capsys, keep_signals):
    before = tree(inputs)
    args = build(inputs)
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        main(args)
    out, err = capsys.readouterr()
    assert stop.value.code == 1, (name, err)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert list(tmp_path.iterdir()) == [], "something was left beside --out"
    assert tree(inputs) == before, "an input was changed"


def test_help_runs_nothing(inputs, tmp_path, capsys, keep_signals):
    """``--help``/``-h`` anywhere shows help and exits 0, also for commands that pass options on to bundles."""
    for args in (["train", "--help"], ["preprocess", "--out", str(tmp_path / "p"), "--help"], [*ok_base(inputs), "-h"],
                 ["make-dataset", "--n", "2", "--out", str(tmp_path / "m"), "-h"]):  # fmt: skip
        try:
            main(args)
        except SystemExit as e:
            assert e.code in (0, None), args
        out, err = capsys.readouterr()
        assert "SYNOPSIS" in out + err and "error:" not in out + err, args
    assert list(tmp_path.iterdir()) == []


def test_a_batch_reports_a_refused_case_and_runs_the_others(inputs):
    """In a batch, a case the input checks refuse is reported with its reason, the others go on; when every
    case is refused the first reason is the run's one error line."""
    from dataclasses import replace

    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.requests import SynthesisRequest
    from lesiondiffusion.sanity import check_requests

    good = SynthesisRequest("good", inputs / "ct.nii.gz", dict(LIVER), inputs / "seg.nii.gz", source="a.txt:1")
    bad = SynthesisRequest("bad", inputs / "nan.nii.gz", dict(LIVER), inputs / "seg.nii.gz", source="a.txt:2")
    big = replace(good, case="big", attributes={**LIVER, "size": "120 mm"}, source="a.txt:3")
    checked, refused = check_requests([good, bad, big])
    assert [r.case for r in checked] == ["good", "bad", "big"] and list(refused) == ["bad"]
    assert "nan.nii.gz" in refused["bad"] and "non-finite" in refused["bad"]
    assert checked[0].warnings == () and "clipped to the organ's box" in checked[2].warnings[0]
    assert "clipped" in checked[2].provenance()["warnings"][0]
    with pytest.raises(LesionDiffusionError, match="nan.nii.gz"):
        check_requests([bad, replace(bad, case="bad2")])


def test_the_input_checks_tell_the_numbering_once_for_the_later_stages(inputs, tmp_path):
    """The organ map's numbering is told by the input checks and handed to preprocessing, which then does not
    tell it again; a refused case carries none."""
    from lesiondiffusion.requests import SynthesisRequest
    from lesiondiffusion.sanity import check_requests
    from lesiondiffusion_tools.synthesize import CaseState, _write_inputs

    good = SynthesisRequest("good", inputs / "ct.nii.gz", dict(LIVER), inputs / "seg.nii.gz")
    bad = SynthesisRequest("bad", inputs / "nan.nii.gz", dict(LIVER), inputs / "seg.nii.gz")
    checked, refused = check_requests([good, bad])
    assert checked[0].organ_seg_numbering == "v2" and checked[1].organ_seg_numbering is None  # ts_small is v2
    lists = _write_inputs(tmp_path, [CaseState(checked[0])])
    assert Path(lists["organ_seg_version_list"]).read_text() == "v2\n"
    assert Path(lists["case_list"]).read_text() == "good\n"  # the case's name, which seeds it, goes along


def test_case_names_from_image_files_are_names_every_stage_accepts():
    from lesiondiffusion.requests import CASE_NAME, RESERVED_CASE_NAMES
    from lesiondiffusion_tools.synthesize import case_names

    names = case_names([Path("/a/_scan 1.nii.gz"), Path("/b/.x.nii"), Path("/c/___.nii.gz"), Path("/d/work.nii.gz")])
    assert names == ["scan_1", "x", "case", "case_work"]
    assert all(CASE_NAME.match(n) and n not in RESERVED_CASE_NAMES for n in names)


def test_the_command_line_starts_without_torch():
    """Help, and a mistake in the options, answer in well under a second: torch is imported by the commands that
    need it, not by the command line itself."""
    import subprocess
    import sys

    code = "import sys, lesiondiffusion_tools.cli; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr
