"""Ground-truth phantom dataset (``lesiondiffusion make-dataset``): real files, reports that extraction
reads back, lesions inside their organs, determinism, held-out density-group requests, bad input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from in_process import run_cli as cli

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import array_box
from lesiondiffusion.dataset import read_datalist, read_split, validate_cases
from lesiondiffusion.io import read_json, read_nifti_array
from lesiondiffusion.labels import HOLLOW_ORGANS, label_table
from lesiondiffusion.phantom_dataset import (
    HYPER,
    HYPO,
    ISO,
    MAX_SHAPE,
    build_dataset,
    build_requests,
    load_sources,
    make_case,
)
from lesiondiffusion.report import read_report
from lesiondiffusion.reports.extraction import extract_report
from lesiondiffusion.requests import read_requests

from conftest import snapshot

N_CASES = 5


@pytest.fixture(scope="module")
def dataset(demo_src: Path, demo_src_snapshot: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A five-case dataset made through the command line."""
    out = tmp_path_factory.mktemp("phantom") / "train"
    result = cli("make-dataset", "--n", str(N_CASES), "--out", str(out), "--seed", "3", "--src", str(demo_src))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out / "datalist.json")
    return out


@pytest.fixture(scope="module")
def sources(demo_src: Path):
    return load_sources(demo_src)


def _case_arrays(case) -> tuple[np.ndarray, np.ndarray, np.ndarray, nib.Nifti1Image]:
    image, img = read_nifti_array(case.image)
    label, _ = read_nifti_array(case.label)
    seg, _ = read_nifti_array(case.organ_seg)
    return image, np.rint(label).astype(np.uint8), np.rint(seg).astype(np.int32), img


def test_dataset_files_lists_and_datalist(dataset: Path) -> None:
    splits = read_datalist(dataset / "datalist.json")
    assert len(splits["training"]) == 4 and len(splits["validation"]) == 1  # default 20 % validation
    assert read_split(dataset, "train") == splits["training"]
    assert read_split(dataset, "val") == splits["validation"]
    cases = splits["training"] + splits["validation"]
    assert read_json(dataset / "datalist.json")["organ_seg_version"] == "v1"  # small crops: declared, not guessed
    assert validate_cases(cases, "v1") == []
    summary = read_json(dataset / "dataset.json")
    assert summary["seed"] == 3 and len(summary["cases"]) == N_CASES
    for case in cases:
        image, label, seg, img = _case_arrays(case)
        assert image.dtype == np.int16 and img.get_data_dtype() == np.int16
        assert max(image.shape) <= MAX_SHAPE
        zooms = img.header.get_zooms()[:3]
        assert 1.5 <= min(zooms) and max(zooms) <= 2.0 and np.ptp(zooms) < 1e-3
        assert image.min() >= -1024 and (image < -900).any()  # air outside the body


def test_lesions_lie_inside_their_organ(dataset: Path) -> None:
    for case in read_datalist(dataset / "datalist.json")["training"]:
        _, label, seg, _ = _case_arrays(case)
        report = read_report(case.report)
        (lesion,) = report.lesions
        lesion_mask = label == 2
        assert lesion_mask.sum() >= 4
        assert np.all(seg[lesion_mask] == lesion.organ_id)
        np.testing.assert_array_equal(label >= 1, seg == lesion.organ_id)  # label 1 is the organ


def test_reports_agree_with_extraction_from_the_written_files(dataset: Path) -> None:
    """What the report states is what :func:`extract_report` measures in the image."""
    table = label_table("v1")
    for case in read_datalist(dataset / "datalist.json")["training"]:
        image, label, seg, img = _case_arrays(case)
        (written,) = read_report(case.report).lesions
        measured = extract_report(image, label, seg, img.header.get_zooms()[:3], version="v1")
        assert measured.organ_id == written.organ_id
        for field in (V.DENSITY, V.DENSITY_VARIATIONS, V.CAVITY, V.SHAPE):
            assert written.classes(field) == measured.classes(field), (case.image, field)
        assert written.attributes[V.LOCATION] == str(written.organ_id)
        assert abs(written.mean_hu - float(image[label == 2].mean())) < 0.1
        assert array_box(written) == array_box(measured)
        hollow = table.name(written.organ_id) in HOLLOW_ORGANS
        assert written.classes(V.CAVITY)[0] in ((V.CAVITY_LUMEN, V.CAVITY_WALL) if hollow else (V.CAVITY_WITHIN,))
        assert written.note in ("cyst", "tumor")
        assert not written.unrecognised()


@pytest.mark.parametrize("organ", ["liver", "kidney left", "urinary bladder", "colon"])
def test_each_organ_kind_gets_a_consistent_case(sources, organ: str) -> None:
    case = make_case(sources, np.random.default_rng(7), organ=organ)
    (report,) = case["report"].lesions
    organ_id = label_table("v1").id(organ)
    assert report.organ_id == organ_id
    lesion = case["label"] == 2
    assert np.all(case["grid"].seg[lesion] == organ_id)
    measured = extract_report(case["image"], case["label"], case["grid"].seg, (case["grid"].spacing,) * 3, version="v1")
    assert measured.classes(V.DENSITY) == [case["truth"]["density"]]
    assert measured.classes(V.CAVITY) == [case["truth"]["cavity"]]


def test_density_class_sets_the_lesion_hu_against_its_organ(sources) -> None:
    """Over many draws every density class appears, with the HU order hypo < iso < hyper (vs the organ)."""
    deltas: dict[str, list[float]] = {}
    for i in range(14):
        truth = make_case(sources, np.random.default_rng([11, i]), organ="liver")["truth"]
        deltas.setdefault(truth["density"], []).append(truth["measured_mean_hu"] - truth["reference_hu"])
    fluid = "hypoattenuating fluid-like lesion"
    assert {HYPO, ISO, HYPER, fluid} <= set(deltas), sorted(deltas)  # the draws are seeded: every class is met
    assert max(deltas[fluid] + deltas[HYPO]) < -10 < 10 < min(deltas[HYPER])
    assert max(abs(d) for d in deltas[ISO]) < 10


def test_same_seed_same_data_other_seed_other_data(demo_src: Path, dataset: Path, tmp_path: Path) -> None:
    again = build_dataset(demo_src, tmp_path / "again", N_CASES, seed=3)
    other = build_dataset(demo_src, tmp_path / "other", 2, seed=4)
    first = read_datalist(dataset / "datalist.json")["training"]
    second = read_datalist(again / "datalist.json")["training"]
    for a, b in zip(first, second):
        for key in ("image", "label", "organ_seg"):
            x, xi = read_nifti_array(getattr(a, key))
            y, yi = read_nifti_array(getattr(b, key))
            np.testing.assert_array_equal(x, y)
            np.testing.assert_allclose(xi.affine, yi.affine)
        assert read_json(a.report) == read_json(b.report)
    x, _ = read_nifti_array(first[0].image)
    y, _ = read_nifti_array(read_datalist(other / "datalist.json")["training"][0].image)
    assert x.shape != y.shape or not np.array_equal(x, y)


def test_requests_mode_writes_density_groups_readable_by_read_requests(demo_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "requests"
    result = cli("make-dataset", "--n", "2", "--out", str(out), "--seed", "5", "--requests", "--src", str(demo_src))
    assert result.returncode == 0, result.stderr
    requests = read_requests(out / "requests.json")
    assert len(requests) == 6
    groups = read_json(out / "dataset.json")["density_groups"]
    assert len(groups) == 2
    for g, group in enumerate(groups):
        members = requests[3 * g : 3 * g + 3]
        assert [r.case for r in members] == group["cases"]
        assert [r.attributes[V.DENSITY] for r in members] == [HYPO, ISO, HYPER]
        assert len({r.image for r in members}) == 1 and len({r.organ_seg for r in members}) == 1
        rest = [{k: v for k, v in r.attributes.items() if k != V.DENSITY} for r in members]
        assert rest[0] == rest[1] == rest[2]  # only the density differs
        assert rest[0]["organ type"] == group["organ"] and rest[0][V.SIZE].endswith(" mm")
        image, img = read_nifti_array(members[0].image)
        seg, seg_img = read_nifti_array(members[0].organ_seg)
        assert image.shape == seg.shape and np.allclose(img.affine, seg_img.affine)
        assert (np.rint(seg) == group["organ_id"]).sum() > 30
    # held out: the same seed in training mode draws other images
    train = build_dataset(demo_src, tmp_path / "train", 1, seed=5, val_fraction=0.0)
    x, _ = read_nifti_array(read_datalist(train / "datalist.json")["training"][0].image)
    y, _ = read_nifti_array(requests[0].image)
    assert x.shape != y.shape or not np.array_equal(x, y)
    again = build_requests(demo_src, tmp_path / "again", 2, seed=5)
    assert read_json(again / "requests.json") == read_json(out / "requests.json")


def test_existing_output_is_refused_unless_overwrite(demo_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli("make-dataset", "--n", "1", "--out", str(out), "--src", str(demo_src))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and str(out) in result.stderr and "exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = cli("make-dataset", "--n", "1", "--out", str(out), "--src", str(demo_src), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "datalist.json").is_file()


def test_bad_input_is_one_line_and_writes_nothing(demo_src: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = cli("make-dataset", "--n", "2", "--out", str(tmp_path / "a"), "--src", str(missing))
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1 and str(missing) in result.stderr
    broken = tmp_path / "broken" / "Case"
    broken.mkdir(parents=True)
    (broken / "totalseg_health.nii.gz").write_bytes(b"not a nifti")
    (broken / "label.nii.gz").write_bytes(b"not a nifti")
    (broken / "type.json").write_text("{}")
    result = cli("make-dataset", "--n", "2", "--out", str(tmp_path / "b"), "--src", str(broken.parent))
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "totalseg_health.nii.gz" in result.stderr
    result = cli("make-dataset", "--n", "0", "--out", str(tmp_path / "c"), "--src", str(demo_src))
    assert result.returncode != 0 and "--n" in result.stderr
    assert not any((tmp_path / n).exists() for n in "abc")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_demo_source_is_never_written(dataset: Path, demo_src: Path, demo_src_snapshot: dict) -> None:
    assert snapshot(demo_src) == demo_src_snapshot
