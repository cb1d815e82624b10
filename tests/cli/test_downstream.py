"""``lesiondiffusion downstream`` end to end on a tiny real-CT dataset (two iterations, two seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion_tools.downstream import lesion_scores, reading, run_downstream, summarise

DATA = Path(__file__).resolve().parents[1] / "data" / "ts_small"


def _dataset(root: Path) -> Path:
    """Three copies of the small CT, each with a ball lesion in the liver (v2 organ map): 2 training, 1 held out."""
    ct = nib.load(DATA / "example_ct_sm.nii.gz")
    seg = np.asarray(nib.load(DATA / "example_seg.nii.gz").dataobj).astype(np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in seg.shape], indexing="ij"))
    entries = []
    for i, centre in enumerate([(70, 50, 15), (80, 60, 14), (75, 55, 16)]):
        ball = ((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0) <= 9
        label = (seg == 5).astype(np.uint8)
        label[ball & (seg == 5)] = 2
        image = np.asarray(ct.dataobj, dtype=np.float32).copy()
        image[label == 2] -= 40.0
        case = root / f"case{i}"
        case.mkdir(parents=True)
        nib.save(nib.Nifti1Image(image, ct.affine), case / "image.nii.gz")
        nib.save(nib.Nifti1Image(label, ct.affine), case / "label.nii.gz")
        nib.save(nib.Nifti1Image(seg, ct.affine), case / "organ_seg.nii.gz")
        (case / "type.json").write_text(json.dumps({"5": ["", "", {}, ""]}))
        entries.append(
            {k: f"case{i}/{k}.nii.gz" for k in ("image", "label", "organ_seg")} | {"report": f"case{i}/type.json"}
        )
    datalist = {"organ_seg_version": "v2", "training": entries[:2], "validation": entries[2:]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def test_tiny_run_writes_the_report_plot_and_per_seed_scores(tmp_path):
    data = _dataset(tmp_path / "data")
    md = run_downstream(str(data), out=str(tmp_path / "out"), arms="real,flat", iterations=2, eval_every=1, seeds=2,
                        work=str(tmp_path / "work"))  # fmt: skip
    out = tmp_path / "out"
    assert md == out / "downstream.md"
    report = json.loads((out / "downstream.json").read_text())
    assert report["data"] == {**report["data"], "train": 2, "tests": {"real_ct": 1}}
    assert [(r["arm"], r["seed"]) for r in report["runs"]] == [("real", 0), ("flat", 0), ("real", 1), ("flat", 1)]
    assert all(len(r["history"]) == 2 for r in report["runs"])
    flat = report["summary"]["real_ct"]["flat"]
    assert len(flat["dice_curve"]) == 2 and "gain_exceeds_seed_spread" in flat
    assert all(0.0 <= v <= 1.0 for v in flat["dice"][:1])
    # the flat arm wrote lesions during training, the real arm none
    runs = {r["arm"]: r for r in report["runs"] if r["seed"] == 0}
    assert runs["real"]["synthesis_seconds"] == 0.0
    text = md.read_text()
    assert "| flat |" in text and "## Reading" in text and "real_ct test set (1 scans)" in text
    png = (out / "downstream_dsc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_in_parallel_give_the_serial_scores_and_an_interrupted_benchmark_goes_on(tmp_path, caplog):
    """Two worker processes train the same (arm, seed) runs as one process does; each run is saved as it ends,
    so a second call reuses them, unless a setting changed."""
    data = _dataset(tmp_path / "data")
    common = dict(arms="real", iterations=2, eval_every=1, seeds=2, work=str(tmp_path / "work"))
    run_downstream(str(data), out=str(tmp_path / "serial"), **common)
    run_downstream(str(data), out=str(tmp_path / "parallel"), jobs=2, **common)
    serial, parallel = (json.loads((tmp_path / d / "downstream.json").read_text()) for d in ("serial", "parallel"))
    assert [r["history"] for r in serial["runs"]] == [r["history"] for r in parallel["runs"]]
    saved = sorted(p.name for p in (tmp_path / "parallel" / "downstream_runs").iterdir())
    assert saved == ["real_seed0.json", "real_seed1.json"]

    (tmp_path / "parallel" / "downstream_runs" / "real_seed1.json").unlink()  # as if killed during seed 1
    with caplog.at_level("INFO", logger="lesiondiffusion_tools.downstream"):
        run_downstream(str(data), out=str(tmp_path / "parallel"), **common)
    assert "real seed 0: reused" in caplog.text and "real seed 1: reused" not in caplog.text
    again = json.loads((tmp_path / "parallel" / "downstream.json").read_text())
    assert [r["history"] for r in again["runs"]] == [r["history"] for r in serial["runs"]]
    caplog.clear()
    with caplog.at_level("INFO", logger="lesiondiffusion_tools.downstream"):
        run_downstream(str(data), out=str(tmp_path / "parallel"), **{**common, "iterations": 3})
    assert "reused" not in caplog.text  # other settings: every run trained again


def test_lesion_scores_count_hits_by_size_and_false_positives():
    truth = np.zeros((40, 40, 40), bool)
    truth[5:8, 5:8, 5:8] = True  # 27 voxels at 2 mm: ~7.4 mm across
    truth[20:35, 20:35, 20:35] = True  # ~37 mm across
    pred = np.zeros_like(truth)
    pred[20:35, 20:35, 20:35] = True
    pred[0:2, 30:32, 0:2] = True  # a false positive
    s = lesion_scores(pred, truth, 2.0, 2.0)
    assert [les["detected"] for les in s["lesions"]] == [False, True]
    assert s["lesions"][0]["diameter_mm"] < 20 <= s["lesions"][1]["diameter_mm"]
    assert s["false_positives"] == 1
    assert 0.9 < s["dice"] < 1.0


def test_unknown_arm_is_one_clear_error(tmp_path):
    with pytest.raises(LesionDiffusionError, match="--arms"):
        run_downstream(str(tmp_path), arms="real,magic")


def _runs(dice_on_lesion: float) -> list[dict]:
    rows = [{"dice": dice_on_lesion, "nsd": 0.0, "lesions": [{"diameter_mm": 12.0, "detected": dice_on_lesion > 0}],
             "false_positives": 0},
            {"dice": 1.0, "nsd": 1.0, "lesions": [], "false_positives": 0}]  # fmt: skip
    return [{"arm": arm, "seed": seed, "history": [{"iteration": 1, "scores": {"real_ct": rows}}]}
            for seed in (0, 1) for arm in ("real", "online")]  # fmt: skip


def test_reading_says_when_no_arm_segments_any_lesion():
    failed = _runs(0.0)
    text = "\n".join(reading(summarise(failed, ["real_ct"]), failed))
    assert "no arm segments any lesion" in text and "the 1 scan(s) whose crop holds no lesion" in text
    learned = _runs(0.6)
    assert "no arm segments" not in "\n".join(reading(summarise(learned, ["real_ct"]), learned))
