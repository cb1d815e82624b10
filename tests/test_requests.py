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
        SynthesisRequest("b", tmp_path / "img" / "b.nii.gz", {"organ type": "kidney", "lesion type": "tumor", "density": "hyperdense"}, tmp_path / "seg" / "b.nii.gz"),
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
        ({"case": "../x", "image": "a.nii.gz", "attributes": {"organ type": "liver", "lesion type": "cyst"}}, "'case' must be"),
        ({"case": "a", "attributes": {"organ type": "liver", "lesion type": "cyst"}}, "'image' must be a path"),
        ({"case": "a", "image": "a.nii.gz", "attributes": {"organ type": "liver"}}, "attributes need 'lesion type'"),
        ({"case": "a", "image": "a.nii.gz", "attributes": {"organ type": "liver", "lesion type": ["x"]}}, "must be text"),
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
