"""``lesiondiffusion demo``: the real-CT demo's requests, and one lesion end to end on the small real-CT fixture.

The end-to-end run uses ``tests/data/ts_small`` (a 122 x 101 x 30 crop of TotalSegmentator's example CT,
v2 organ map) with the liver request only and three sampling steps, so it stays cheap; the default
(``data/ts_example``, five organs) is what ``make demo`` runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.data_paths import TS_EXAMPLE_CT, TS_EXAMPLE_SEG
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import label_table
from lesiondiffusion_tools.demo import DEMO_REQUESTS, demo, select_requests

SMALL = Path(__file__).resolve().parents[1] / "data" / "ts_small"
SMALL_CT, SMALL_SEG = SMALL / "example_ct_sm.nii.gz", SMALL / "example_seg.nii.gz"


def organ_of(request: dict) -> str:
    """The organ a demo request names (its attributes, or the last words of its sentence)."""
    if "attributes" in request:
        return request["attributes"]["organ type"]
    return request["text"].rsplit(" in the ", 1)[1]


def test_default_requests_cover_five_organs_of_the_shipped_ct_and_one_is_a_sentence():
    assert TS_EXAMPLE_CT.is_file() and TS_EXAMPLE_SEG.is_file()
    present = set(np.unique(np.asarray(nib.load(str(TS_EXAMPLE_SEG)).dataobj)).tolist())
    table = label_table("v2")
    organs = [organ_of(r) for r in DEMO_REQUESTS]
    for organ in organs:
        assert set(table.ids(organ)) & present, f"{organ} is not in the example CT's organ map"
    for wanted in ("liver", "kidney", "spleen", "pancreas", "urinary bladder"):
        assert any(wanted in organ for organ in organs), wanted
    assert len({r["case"] for r in DEMO_REQUESTS}) == len(DEMO_REQUESTS)
    assert any(isinstance(r.get("text"), str) and r["text"].strip() for r in DEMO_REQUESTS), "one request is a sentence"


def test_unknown_lesion_name_or_source_is_one_error(tmp_path):
    with pytest.raises(LesionDiffusionError, match="unknown demo lesion"):
        select_requests("liver_cyst,lung_nodule")
    with pytest.raises(LesionDiffusionError, match="--source"):
        demo(out=str(tmp_path / "out"), source="mri")
    assert not (tmp_path / "out").exists()


def test_a_demo_into_an_out_another_run_writes_is_refused_before_any_work(tmp_path):
    from lesiondiffusion.io import OutputLock, lock_file

    out = tmp_path / "out"
    with OutputLock(out, "first"):
        with pytest.raises(LesionDiffusionError, match="another run is writing this output"):
            demo(out=str(out), lesions="liver_cyst")
        assert not out.exists()  # nothing written: no requests, no synthesis
    assert not lock_file(out).exists()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_writes_a_lesion_into_the_real_ct_and_evaluates_it(tmp_path, capsys):
    before = {p: sha(p) for p in (SMALL_CT, SMALL_SEG)}
    out = tmp_path / "demo"
    report = demo(out=str(out), image=str(SMALL_CT), organ_seg=str(SMALL_SEG), lesions="liver_cyst", steps=3)

    # the requests file lies in --out, names the shipped input by a path relative to it, and holds the sentence
    requests = json.loads((out / "requests.json").read_text())["requests"]
    assert [r["case"] for r in requests] == ["liver_cyst"]
    assert (out / requests[0]["image"]).resolve() == SMALL_CT.resolve()
    assert (out / requests[0]["organ_seg"]).resolve() == SMALL_SEG.resolve()
    liver = next(r for r in DEMO_REQUESTS if r["case"] == "liver_cyst")
    assert {k: v for k, v in requests[0].items() if k not in ("case", "image", "organ_seg")} == {
        k: v for k, v in liver.items() if k != "case"
    }

    case = out / "synthesis" / "liver_cyst"
    ct_in = np.asarray(nib.load(str(SMALL_CT)).dataobj)
    ct_out = np.asarray(nib.load(str(case / "image.nii.gz")).dataobj)
    label = np.asarray(nib.load(str(case / "label.nii.gz")).dataobj)
    seg = np.asarray(nib.load(str(SMALL_SEG)).dataobj)
    assert ct_out.shape == ct_in.shape and (label == 2).any()
    assert set(np.unique(seg[label == 2]).tolist()) == {5}, "the lesion lies in the liver (v2 id 5)"
    asked = json.loads((case / "provenance.json").read_text())
    assert "a 25 mm hypodense" in json.dumps(asked), "the sentence is recorded with the case"
    assert not np.array_equal(ct_out, ct_in)
    assert (case / "preview.png").stat().st_size > 0

    assert report["totals"]["evaluated"] == 1 and report["totals"]["preserved_rate"] == 1.0
    assert (out / "evaluation" / "evaluation.json").is_file()
    printed = capsys.readouterr().out
    assert str(case / "preview.png") in printed
    assert "seconds per lesion:" in printed and "evaluated 1/1 case(s)" in printed
    assert {p: sha(p) for p in before} == before, "the shipped inputs were written"
