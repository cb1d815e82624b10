import json

import nibabel as nib
import numpy as np
import pytest

from lesiondiffusion.data_paths import DEMO_DATA
from lesiondiffusion.errors import InputError
from lesiondiffusion.report import (
    REPORT_BOX_AXES,
    LesionReport,
    Report,
    format_ct_value,
    format_size,
    from_report_axes,
    parse_ct_value,
    parse_size,
    read_report,
    to_report_axes,
    write_report,
)
from lesiondiffusion.vocabulary import classes, parse_classes

DEMO = DEMO_DATA
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
    assert liver.classes("specific features") == [
        "presence of increased density areas",
        "presence of decreased density areas",
    ]
    assert liver.unrecognised() == {}


def test_canonicalisation_through_synonyms():
    r = LesionReport(
        5,
        {
            "lesion location": "5",
            "density": "Low Attenuation Lesion,",
            "shape": "irregular,wall thickening",
            "surface characteristics": "fuzzy edge,",
        },
    )
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


# ---- box axis order ------------------------------------------------------------------------------------
def test_report_axes_are_the_reversed_array_axes():
    assert REPORT_BOX_AXES == (2, 1, 0)
    assert to_report_axes((10, 20, 30)) == (30, 20, 10)
    assert from_report_axes(to_report_axes((10, 20, 30))) == (10, 20, 30)
    assert to_report_axes([1.5, 2.0, 2.5]) == (2.5, 2.0, 1.5)  # sizes in mm convert the same way


def test_box_in_array_axes_reads_and_writes_the_report_order(tmp_path):
    report = LesionReport(5, {"lesion location": "5", "size": "[[9 9 9]] pixel"})
    assert report.array_box() == (None, (9, 9, 9))  # no box: the size text stands in
    moved = report.with_array_box(np.array([40, 50, 60]), (np.int64(3), 4, 5))
    assert moved.centre == (60, 50, 40) and moved.size == (5, 4, 3)
    assert moved.attributes["size"] == "[[5 4 3]] pixel" and report.attributes["size"] == "[[9 9 9]] pixel"
    assert moved.array_box() == ((40, 50, 60), (3, 4, 5))
    write_report(tmp_path / "type.json", Report((moved,)))
    assert json.loads((tmp_path / "type.json").read_text())["5"][3] == [[[60, 50, 40]], [[5, 4, 3]]]
    assert read_report(tmp_path / "type.json")[5].array_box() == ((40, 50, 60), (3, 4, 5))


@pytest.mark.parametrize("path", DEMO_REPORTS, ids=lambda p: p.parent.name)
def test_demo_boxes_hit_their_lesion_only_in_the_report_axis_order(path):
    """The published reports' element 3 read through the convention lands in the labelled lesion."""
    lesion = np.asanyarray(nib.load(str(path.parent / "label.nii.gz")).dataobj) == 2
    report = read_report(path).lesions[0]
    centre, size = report.array_box()
    assert lesion[centre]
    assert not lesion[tuple(report.centre)]  # read as array axes, the centre misses it
    lo = [c - s // 2 for c, s in zip(centre, size)]
    inside = lesion[tuple(slice(a, a + s) for a, s in zip(lo, size))].mean()
    assert inside > 0.6  # the box lies mostly within the lesion (it is smaller than the lesion)


@pytest.mark.parametrize(
    ("field", "text", "expected"),
    [
        ("density", "hypodense", ["hypodense lesion"]),
        ("density", "Hyperdense", ["hyperdense lesion"]),
        ("density", "isodense,", ["isodense lesion"]),
        ("density", "hypodense fluid-like lesion", ["hypoattenuating fluid-like lesion"]),
        ("density", "low-density ground-glass opacity", ["low-density ground-glass opacity"]),
        ("density variations", "inhomogeneous", ["heterogeneous"]),
    ],
)
def test_short_forms_users_type_map_to_their_class(field, text, expected):
    assert parse_classes(field, text) == (expected, [])
