import json
from pathlib import Path

import pytest

from lesiondiffusion.errors import InputError
from lesiondiffusion.report import (
    LesionReport,
    Report,
    format_ct_value,
    format_size,
    parse_ct_value,
    parse_size,
    read_report,
    write_report,
)
from lesiondiffusion.vocabulary import classes, parse_classes

DEMO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "demo"
DEMO_REPORTS = sorted(DEMO.glob("*/type.json"))


def test_both_demo_reports_are_found():
    assert {p.parent.name for p in DEMO_REPORTS} == {"Bladder_cancer", "Liver_cancer"}


@pytest.mark.parametrize("path", DEMO_REPORTS, ids=lambda p: p.parent.name)
def test_demo_report_round_trip(path, tmp_path):
    original = json.loads(path.read_text())
    report = read_report(path)
    out = tmp_path / "type.json"
    write_report(out, report)
    assert json.loads(out.read_text()) == original  # same format, same content
    assert read_report(out) == report


def test_demo_report_typed_fields():
    bladder = read_report(DEMO / "Bladder_cancer" / "type.json")[104]
    assert bladder.size_voxels == (23, 18, 24) and bladder.centre == (76, 191, 146)
    assert bladder.mean_hu == 35.0
    assert bladder.classes("shape") == ["round-like", "protrusion into the lumen"]
    liver = read_report(DEMO / "Liver_cancer" / "type.json")[5]
    assert liver.classes("density") == ["hypodense lesion"]  # "low density lesion" is a synonym
    assert liver.classes("specific features") == ["presence of increased density areas", "presence of decreased density areas"]
    assert liver.unrecognised() == {}


def test_canonicalisation_through_synonyms():
    r = LesionReport(5, {"lesion location": "5", "density": "Low Attenuation Lesion,", "shape": "irregular,wall thickening", "surface characteristics": "fuzzy edge,"})
    c = r.canonical()
    assert c.attributes["density"] == "hypodense lesion,"
    assert c.attributes["shape"] == "irregular wall thickening,"  # a synonym containing a comma stays whole
    assert c.attributes["surface characteristics"] == "fuzzy edge,"  # unknown words are kept
    assert r.unrecognised() == {"surface characteristics": ["fuzzy edge"]}
    assert parse_classes("cavity", "wall thickening") == (["wall thickening"], [])
    assert "within the lumen of a hollow organ" in classes("cavity")


def test_size_and_ct_value_text():
    assert parse_size("[[28 29 26]] pixel,") == (28, 29, 26)
    assert parse_size(format_size((3, 4, 5))) == (3, 4, 5)
    assert parse_size("large") is None
    assert parse_ct_value(format_ct_value(-12.34)) == -12.3
    assert parse_ct_value("no number") is None


@pytest.mark.parametrize(
    "obj, where",
    [
        ({}, "top level"),
        ({"liver": ["", "", {"lesion location": "5"}]}, "liver"),
        ({"5": ["", "", {"size": "[[1 2 3]] pixel"}]}, "5/2"),
        ({"5": ["", "", {"lesion location": "5", "size": "big"}]}, "5/2/size"),
        ({"5": ["", "", {"lesion location": "5", "shape": 3}]}, "5/2/shape"),
        ({"5": ["", "", {"lesion location": "5"}, [[[1, 2]], [[3, 4, 5]]]]}, "5/3/0/0"),
        ({"5": "not a list"}, "5"),
    ],
)
def test_schema_rejects_malformed_reports(tmp_path, obj, where):
    path = tmp_path / "type.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(InputError) as e:
        read_report(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "schema 1.0" in msg and where in msg and "\n" not in msg


def test_unparsable_json_names_the_file(tmp_path):
    path = tmp_path / "type.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_report(path)


def test_write_refuses_invalid_report_and_leaves_no_file(tmp_path):
    bad = Report((LesionReport(5, {"lesion location": "5", "size": "huge"}),))
    out = tmp_path / "type.json"
    with pytest.raises(InputError):
        write_report(out, bad)
    assert list(tmp_path.iterdir()) == []
