import json
import shutil

import pytest
from monai.data import load_decathlon_datalist

from lesiondiffusion.errors import InputError
from lesiondiffusion.manifest import CaseEntry, LesionEntry, Manifest, read_manifest, write_manifest
from lesiondiffusion.placement import Box
from lesiondiffusion.vocabulary import CAVITY_WITHIN


def _manifest(root):
    case = root / "case_000"
    ok = CaseEntry(
        "case_000",
        source_image=root.parent / "inputs" / "ct.nii.gz",
        geometry=case / "geometry.json",
        image=case / "image.nii.gz",
        organ_seg=case / "organ_seg.nii.gz",
        lesions=(
            LesionEntry(
                5,
                CAVITY_WITHIN,
                case / "lesion_0.json",
                Box((10, 11, 12), (4, 5, 6)),
                {"request": {"organ type": "liver"}},
            ),
        ),
        extra={"organ_seg_source": "given"},
    )
    bad = CaseEntry("case_001", source_image=root.parent / "inputs" / "broken.nii.gz").failed(
        "broken.nii.gz: unreadable\nNIfTI"
    )
    return Manifest((ok, bad))


def test_written_paths_are_relative_and_failed_cases_stay_in_place(tmp_path):
    root = tmp_path / "out"
    path = write_manifest(root / "manifest.json", _manifest(root))
    obj = json.loads(path.read_text())
    first, second = obj["testing"]
    assert first["image"] == "case_000/image.nii.gz" and first["geometry"] == "case_000/geometry.json"
    assert first["lesions"][0] == {
        "organ_id": 5,
        "cavity": CAVITY_WITHIN,
        "report": "case_000/lesion_0.json",
        "box": {"centre": [10, 11, 12], "size": [4, 5, 6]},
        "request": {"organ type": "liver"},
    }
    assert first["source_image"] == str((tmp_path / "inputs" / "ct.nii.gz").resolve())  # the user's file: absolute
    assert first["organ_seg_source"] == "given"
    assert second == {
        "case": "case_001",
        "status": "error",
        "error": "broken.nii.gz: unreadable NIfTI",  # one line
        "source_image": str((tmp_path / "inputs" / "broken.nii.gz").resolve()),
    }


def test_round_trip_resolves_paths_and_survives_a_move(tmp_path):
    root = tmp_path / "out"
    original = _manifest(root)
    write_manifest(root / "manifest.json", original)
    assert read_manifest(root / "manifest.json") == original  # tmp_path is already resolved
    moved = tmp_path / "elsewhere"
    shutil.move(str(root), str(moved))
    again = read_manifest(moved / "manifest.json")
    assert again.cases[0].image == (moved / "case_000" / "image.nii.gz").resolve()
    assert again.cases[0].lesions[0].report == (moved / "case_000" / "lesion_0.json").resolve()
    assert [c.case for c in again.ok_cases()] == ["case_000"]
    assert not again.cases[1].ok and again.cases[1].error.startswith("broken.nii.gz")


def test_later_stages_extend_entries_without_losing_keys(tmp_path):
    root = tmp_path / "out"
    path = write_manifest(root / "manifest.json", _manifest(root))
    manifest = read_manifest(path)
    first = manifest.cases[0]
    updated = manifest.replace_case(0, CaseEntry(**{**first.__dict__, "label": root / "case_000" / "label.nii.gz"}))
    write_manifest(path, updated)
    obj = json.loads(path.read_text())["testing"][0]
    assert obj["label"] == "case_000/label.nii.gz"
    assert obj["organ_seg_source"] == "given" and obj["lesions"][0]["request"] == {"organ type": "liver"}


def test_manifest_is_a_monai_datalist(tmp_path):
    root = tmp_path / "out"
    path = write_manifest(root / "manifest.json", _manifest(root))
    items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key="testing")
    assert items[0]["image"] == str(root / "case_000" / "image.nii.gz")


@pytest.mark.parametrize(
    "content, problem",
    [
        ({"training": []}, "expected a JSON object with a 'testing' list"),
        ({"testing": [{"status": "ok"}]}, "entry testing\\[0\\]: no 'case' name"),
        ({"testing": [{"case": "a", "status": "done"}]}, "status must be"),
        ({"testing": [{"case": "a", "status": "error"}]}, "needs an 'error' message"),
        ({"testing": [{"case": "a", "image": "i.nii.gz"}]}, "needs 'organ_seg', 'geometry'"),
        (
            {"testing": [{"case": "a", "image": "i", "organ_seg": "s", "geometry": "g", "lesions": [{"organ_id": 5}]}]},
            "lesions\\[0\\] needs organ_id, cavity, report, box",
        ),
        (
            {
                "testing": [
                    {
                        "case": "a",
                        "image": "i",
                        "organ_seg": "s",
                        "geometry": "g",
                        "lesions": [{"organ_id": 5, "cavity": "c", "report": "r", "box": {"centre": [1, 2]}}],
                    }
                ]
            },
            "malformed organ id or box",
        ),
    ],
)
def test_malformed_manifests_name_the_file_and_entry(tmp_path, content, problem):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError, match=problem) as err:
        read_manifest(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_the_stage_case_loop_marks_a_failed_case_goes_on_and_fails_the_run_after_writing(tmp_path):
    """The LMNet and LINet bundles' loop: a MONAI evaluator over a dataset of the manifest's cases."""
    from dataclasses import replace

    from monai.data import DataLoader, Dataset

    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion.pipelines.cases import CaseEvaluator, ManifestWriter, case_items, one_case

    def entry(name: str) -> CaseEntry:
        files = {k: tmp_path / name / f"{k}.nii.gz" for k in ("image", "organ_seg", "geometry")}
        return CaseEntry(name, source_image=tmp_path / "ct.nii.gz", **files)

    cases = (entry("case_a"), entry("case_b").failed("failed in preprocess"), entry("case_c"), entry("case_d"))
    seen = []

    def process(case: CaseEntry, out_dir) -> CaseEntry:
        seen.append((case.case, out_dir))
        if case.case == "case_c":
            raise InputError(tmp_path / "c.nii.gz", "broken\nvoxels")
        return replace(case, extra={"done": True})

    def run(manifest: Manifest, out_dir):
        loader = DataLoader(Dataset(case_items(manifest)), batch_size=1, collate_fn=one_case)
        writer = ManifestWriter(manifest, out_dir)
        CaseEvaluator("cpu", loader, process, out_dir, val_handlers=[writer]).run()
        return writer.written

    with pytest.raises(LesionDiffusionError) as info:
        run(Manifest(cases), tmp_path / "out")
    written = tmp_path / "out" / "manifest.json"
    assert (
        str(info.value)
        == f"1 of 4 case(s) failed (case_c: {tmp_path / 'c.nii.gz'}: broken voxels); the others are in {written}"
    )
    # the earlier failure is passed on, the later case still runs
    assert seen == [(c, tmp_path / "out") for c in ("case_a", "case_c", "case_d")]
    out = read_manifest(written).cases
    assert [c.status for c in out] == ["ok", "error", "error", "ok"]
    assert out[1].error == "failed in preprocess" and out[3].extra == {"done": True}
    assert run(Manifest(cases[:1]), tmp_path / "ok") == tmp_path / "ok" / "manifest.json"
