"""Dataset lists, datalists, conversion and validation, each error on a real broken file."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from lesiondiffusion.dataset import (
    Case,
    datalist_to_lists,
    lists_to_datalist,
    load_cases,
    read_datalist,
    read_list_files,
    read_split,
    validate_cases,
    write_datalist,
    write_list_files,
)
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import save_nifti
from lesiondiffusion.report import LesionReport, Report, write_report

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def make_case(folder: Path, organ_id: int = 5) -> Case:
    """A small valid case: organ ``organ_id`` with a lesion inside, and its report."""
    folder.mkdir(parents=True, exist_ok=True)
    seg = np.zeros((16, 16, 12), np.uint8)
    seg[3:13, 3:13, 2:10] = organ_id
    label = (seg > 0).astype(np.uint8)
    label[6:9, 6:9, 5:7] = 2
    image = np.where(seg > 0, 60, -100).astype(np.int16)
    save_nifti(folder / "image.nii.gz", image, AFFINE)
    save_nifti(folder / "label.nii.gz", label, AFFINE)
    save_nifti(folder / "organ_seg.nii.gz", seg, AFFINE)
    write_report(folder / "type.json", Report((LesionReport(organ_id, {"lesion location": str(organ_id)}),)))
    return Case(folder / "image.nii.gz", folder / "label.nii.gz", folder / "type.json", folder / "organ_seg.nii.gz")


@pytest.fixture
def cases(tmp_path):
    return [make_case(tmp_path / f"case{i}") for i in range(3)]


def only_problem(cases):
    problems = validate_cases(cases)
    assert len(problems) == 1, problems
    return problems[0]


def test_valid_cases_have_no_problems(cases):
    assert validate_cases(cases) == []


def test_list_files_round_trip_through_datalist(cases, tmp_path):
    lists = tmp_path / "lists"
    write_list_files(lists, "train", cases[:2])
    write_list_files(lists, "val", cases[2:])
    assert sorted(p.name for p in lists.iterdir()) == sorted(
        f"{s}_{k}_list.txt" for s in ("train", "val") for k in ("img", "label", "type", "seg")
    )
    datalist = lists_to_datalist(lists, tmp_path / "datalist.json")
    loaded = read_datalist(datalist)
    assert loaded == {"training": cases[:2], "validation": cases[2:]}
    # MONAI reads it as is, with paths relative to the datalist's folder
    monai_items = load_decathlon_datalist(str(datalist), data_list_key="training")
    assert [Path(d["image"]) for d in monai_items] == [c.image for c in cases[:2]]
    assert json.loads(datalist.read_text())["training"][0]["image"] == "case0/image.nii.gz"
    back = tmp_path / "back"
    datalist_to_lists(datalist, back)
    assert read_split(back, "train") == cases[:2] and read_split(back, "val") == cases[2:]


def test_load_cases_needs_exactly_one_form(cases, tmp_path):
    write_datalist(tmp_path / "d.json", {"training": cases})
    assert load_cases(datalist=tmp_path / "d.json") == cases
    with pytest.raises(LesionDiffusionError, match="^give either a datalist or an image list"):
        load_cases()


def test_misaligned_lists_name_both_files(cases, tmp_path):
    write_list_files(tmp_path, "train", cases)
    label_list = tmp_path / "train_label_list.txt"
    label_list.write_text("".join(label_list.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(InputError) as e:
        read_split(tmp_path, "train")
    assert (
        str(e.value).startswith(str(label_list))
        and "has 2 lines" in str(e.value)
        and "train_img_list.txt has 3" in str(e.value)
    )


def test_blank_line_inside_a_list_names_the_line(cases, tmp_path):
    write_list_files(tmp_path, "train", cases)
    img = tmp_path / "train_img_list.txt"
    lines = img.read_text().splitlines()
    img.write_text(f"{lines[0]}\n\n{lines[1]}\n")
    with pytest.raises(InputError, match=r"train_img_list.txt:2: empty line"):
        read_split(tmp_path, "train")


def test_missing_file_reports_list_file_and_line(cases, tmp_path):
    cases[1].organ_seg.unlink()
    write_list_files(tmp_path / "lists", "train", cases)
    problem = only_problem(read_split(tmp_path / "lists", "train"))
    assert problem.where.endswith("train_img_list.txt:2")
    assert problem.file == str(cases[1].organ_seg) and "not found" in problem.message


def test_unreadable_nifti(cases):
    cases[0].image.write_bytes(b"this is not a nifti file")
    problem = only_problem(cases)
    assert problem.file == str(cases[0].image) and "unreadable NIfTI" in problem.message


def test_truncated_gzip_is_unreadable(cases):
    data = cases[2].label.read_bytes()
    cases[2].label.write_bytes(data[: len(data) // 2])
    problem = only_problem(cases)
    assert problem.file == str(cases[2].label) and "unreadable" in problem.message


def test_shape_mismatch(cases):
    save_nifti(cases[0].label, np.zeros((16, 16, 11), np.uint8), AFFINE)
    problem = only_problem(cases)
    assert problem.file == str(cases[0].label) and "shape (16, 16, 11)" in problem.message


def test_affine_mismatch(cases):
    seg = np.asarray(nib.load(cases[1].organ_seg).dataobj)
    save_nifti(cases[1].organ_seg, seg, np.diag([1.0, 1.0, 1.0, 1.0]))
    problem = only_problem(cases)
    assert problem.file == str(cases[1].organ_seg) and "affine differs" in problem.message


def test_label_values_outside_0_1_2(cases):
    bad = np.zeros((16, 16, 12), np.uint8)
    bad[0, 0, 0] = 3
    save_nifti(cases[2].label, bad, AFFINE)
    problem = only_problem(cases)
    assert problem.file == str(cases[2].label) and "[3]" in problem.message


def test_four_dimensional_image(cases):
    save_nifti(cases[0].image, np.zeros((16, 16, 12, 2), np.int16), AFFINE)
    problem = only_problem(cases)
    assert "expected a 3D image" in problem.message


def test_report_without_the_cases_organ(cases, tmp_path):
    other = make_case(tmp_path / "spleen", organ_id=1)  # report says spleen (1)
    case = Case(cases[0].image, cases[0].label, other.report, cases[0].organ_seg)
    problem = only_problem([case])
    assert problem.file == str(other.report) and "no entry for the case's organ 5 (liver)" in problem.message


def test_malformed_report(cases):
    cases[1].report.write_text(json.dumps({"5": ["", "", {"size": "[[1 2 3]] pixel"}]}))
    problem = only_problem(cases)
    assert problem.file == str(cases[1].report) and "lesion location" in problem.message


def test_datalist_entry_without_image(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"label": "x.nii.gz"}]}))
    with pytest.raises(InputError, match=r"training\[0\] has no 'image'"):
        read_datalist(path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lesiondiffusion_tools.cli", *args], capture_output=True, text=True)


def test_cli_validate_datalist_ok_and_broken(cases, tmp_path):
    datalist = write_datalist(tmp_path / "d.json", {"training": cases})
    ok = run_cli("validate", "--datalist", str(datalist))
    assert ok.returncode == 0, ok.stderr
    assert "3 case(s), 0 problem(s)" in ok.stdout
    with gzip.open(cases[1].image, "wb") as f:
        f.write(b"garbage")
    broken = run_cli("validate", "--datalist", str(datalist))
    assert broken.returncode == 1
    assert "1 problem(s)" in broken.stdout and str(cases[1].image) in broken.stdout


def test_cli_validate_lists_and_one_line_error(cases, tmp_path):
    files = write_list_files(tmp_path, "train", cases)
    ok = run_cli(
        "validate",
        "--image_list",
        str(files["image"]),
        "--label_list",
        str(files["label"]),
        "--type_list",
        str(files["report"]),
        "--seg_list",
        str(files["organ_seg"]),
    )
    assert ok.returncode == 0 and "0 problem(s)" in ok.stdout
    missing = run_cli("validate", "--image_list", str(tmp_path / "nope.txt"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.txt'}: list file not found"


def test_cli_convert_both_ways(cases, tmp_path):
    write_list_files(tmp_path / "lists", "train", cases)
    out = run_cli("convert", "--datalist", str(tmp_path / "d.json"), "--lists_dir", str(tmp_path / "lists"))
    assert out.returncode == 0, out.stderr
    assert read_datalist(tmp_path / "d.json")["training"] == cases
    out = run_cli(
        "convert", "--datalist", str(tmp_path / "d.json"), "--lists_dir", str(tmp_path / "l2"), "--to", "lists"
    )
    assert (
        out.returncode == 0
        and read_list_files(*(tmp_path / "l2" / f"train_{k}_list.txt" for k in ("img", "label", "type", "seg")))
        == cases
    )
