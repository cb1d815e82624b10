"""Requests files: round trip, relative paths, and one-line errors naming the file and entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lesiondiffusion.errors import InputError
from lesiondiffusion.requests import SynthesisRequest, read_requests, write_requests


def test_round_trip_keeps_paths_relative_to_the_file(tmp_path: Path) -> None:
    reqs = [
        SynthesisRequest("a", tmp_path / "img" / "a.nii.gz", {"organ type": "liver", "lesion type": "cyst"}),
        SynthesisRequest(
            "b",
            tmp_path / "img" / "b.nii.gz",
            {"organ type": "kidney", "lesion type": "tumor", "density": "hyperdense"},
            tmp_path / "seg" / "b.nii.gz",
        ),
    ]
    path = write_requests(tmp_path / "sub" / "requests.json", reqs)
    raw = json.loads(path.read_text())
    assert raw["requests"][0]["image"] == "../img/a.nii.gz" and "organ_seg" not in raw["requests"][0]
    back = read_requests(path)
    assert [r.case for r in back] == ["a", "b"]
    assert back[1].organ_seg.resolve() == (tmp_path / "seg" / "b.nii.gz").resolve()
    assert back[1].attributes["density"] == "hyperdense"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"image": "a.nii.gz", "attributes": {"organ type": "liver", "lesion type": "cyst"}}, "'case' must be"),
        (
            {"case": "../x", "image": "a.nii.gz", "attributes": {"organ type": "liver", "lesion type": "cyst"}},
            "'case' must be",
        ),
        (
            {"case": "summary.json", "image": "a.nii.gz", "attributes": {"organ type": "liver", "lesion type": "cyst"}},
            "the output already holds",
        ),
        ({"case": "a", "attributes": {"organ type": "liver", "lesion type": "cyst"}}, "'image' must be a path"),
        ({"case": "a", "image": "a.nii.gz", "attributes": {"organ type": "liver"}}, "attributes need 'lesion type'"),
        (
            {"case": "a", "image": "a.nii.gz", "attributes": {"organ type": "liver", "lesion type": ["x"]}},
            "must be text",
        ),
        ("text", "not a JSON object"),
    ],
)
def test_bad_entries_name_file_and_entry(tmp_path: Path, entry, problem: str) -> None:
    path = tmp_path / "requests.json"
    path.write_text(json.dumps({"requests": [entry]}))
    with pytest.raises(InputError) as err:
        read_requests(path)
    message = str(err.value)
    assert str(path) in message and "requests[0]" in message and problem in message and "\n" not in message


def test_duplicate_case_names_and_empty_or_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    entry = {"case": "a", "image": "a.nii.gz", "attributes": {"organ type": "liver", "lesion type": "cyst"}}
    path.write_text(json.dumps({"requests": [entry, entry]}))
    with pytest.raises(InputError, match="requests\\[1\\]: case name 'a' is used twice"):
        read_requests(path)
    path.write_text(json.dumps({"requests": []}))
    with pytest.raises(InputError, match="empty"):
        read_requests(path)
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match="not a requests file"):
        read_requests(path)


def test_text_entries_are_read_with_explicit_attributes_winning(tmp_path: Path) -> None:
    path = tmp_path / "requests.json"
    path.write_text(json.dumps({"requests": [
        {"case": "words", "image": "a.nii.gz", "text": "a 2.5 cm hypodense, well-defined cyst in the liver without calcification"},
        {"case": "both", "image": "b.nii.gz", "text": "a homogeneous hyperdense nodule in the spleen", "attributes": {"density": "isodense"}},
        {"case": "organ_given", "image": "c.nii.gz", "text": "a 12 mm cyst", "attributes": {"organ type": "kidney left"}},
        {"case": "plain", "image": "d.nii.gz", "attributes": {"organ type": "liver", "lesion type": "cyst"}},
    ]}))  # fmt: skip
    words, both, organ_given, plain = read_requests(path)
    assert words.attributes == {
        "organ type": "liver", "lesion type": "cyst", "density": "hypodense lesion,", "surface characteristics": "well-defined margin,", "size": "25 mm",
    }  # fmt: skip
    assert words.given == {} and [u.words for u in words.reading.understood if u.negated] == ["calcification"]
    assert both.attributes == {
        "organ type": "spleen",
        "lesion type": "nodule",
        "density": "isodense",
        "density variations": "homogeneous,",
    }
    assert both.reading.attributes["density"] == "hyperdense lesion,"  # the sentence's word is kept beside the winner
    assert both.provenance()["given_attributes"] == {"density": "isodense"} and both.provenance()["text"].startswith(
        "a homogeneous"
    )
    assert organ_given.attributes == {"organ type": "kidney left", "lesion type": "cyst", "size": "12 mm"}
    assert plain.text is None and plain.reading is None and plain.provenance() == {"attributes": plain.attributes}
    # written back as given: the sentence and only the explicit attributes
    again = write_requests(tmp_path / "again.json", [words, both, organ_given, plain])
    raw = json.loads(again.read_text())["requests"]
    assert (
        "attributes" not in raw[0]
        and raw[1]["attributes"] == {"density": "isodense"}
        and raw[3]["attributes"] == plain.attributes
    )
    assert [r.attributes for r in read_requests(again)] == [r.attributes for r in (words, both, organ_given, plain)]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"case": "a", "image": "a.nii.gz", "text": "a hypodense hyperdense cyst in the liver"},
         "requests[0]: text: 'hypodense' and 'hyperdense' contradict each other"),
        ({"case": "a", "image": "a.nii.gz", "text": "a cyst in the liver and the spleen"}, "requests[0]: text: 'liver' and 'spleen' name two different organs"),
        ({"case": "a", "image": "a.nii.gz", "text": "a cyst", "attributes": {"lesion type": "cyst"}}, "requests[0]: text: names no organ"),
        ({"case": "a", "image": "a.nii.gz", "text": ""}, "'text' must be a sentence"),
        ({"case": "a", "image": "a.nii.gz", "text": {"organ": "liver"}}, "'text' must be a sentence"),
        ({"case": "a", "image": "a.nii.gz"}, "'attributes' must be a JSON object (or give 'text', a sentence)"),
    ],
)  # fmt: skip
def test_bad_text_entries_name_file_entry_and_words(tmp_path: Path, entry, problem: str) -> None:
    path = tmp_path / "requests.json"
    path.write_text(json.dumps({"requests": [entry]}))
    with pytest.raises(InputError) as err:
        read_requests(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message


def test_synthesize_keeps_a_text_entry_and_lets_command_line_attributes_win(tmp_path: Path) -> None:
    from lesiondiffusion.errors import LesionDiffusionError
    from lesiondiffusion_tools.synthesize import gather_requests

    path = tmp_path / "requests.json"
    path.write_text(
        json.dumps(
            {
                "requests": [
                    {
                        "case": "a",
                        "image": "a.nii.gz",
                        "text": "a 2 cm hypodense cyst in the liver",
                        "attributes": {"shape": "cystic"},
                    }
                ]
            }
        )
    )
    (request,) = gather_requests(requests=str(path), attributes={"density": "isodense"}, lesion_type="abscess")
    assert (
        request.text == "a 2 cm hypodense cyst in the liver"
        and request.reading.attributes["density"] == "hypodense lesion,"
    )
    assert request.given == {"shape": "cystic", "density": "isodense", "lesion type": "abscess"}
    assert request.attributes == {
        "organ type": "liver",
        "lesion type": "abscess",
        "density": "isodense",
        "size": "20 mm",
        "shape": "cystic",
    }
    with pytest.raises(LesionDiffusionError, match="--text goes with --image or --image_list"):
        gather_requests(requests=str(path), text="a cyst in the liver")
