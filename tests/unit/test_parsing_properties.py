"""Property-based tests (hypothesis): whatever a user types, parsing gives a result or one clean error.

Requests files, attribute objects, lesion sentences, sizes, vocabulary values and command-line options
are generated at random (with the vocabulary's own words mixed in, so that many inputs are nearly
right); each parser must return or raise :class:`LesionDiffusionError` with a one-line message, never
anything else.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import parse_lesion_size
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.requests import read_requests
from lesiondiffusion.sanity import check_attributes
from lesiondiffusion.text import LESION_WORDS, ORGAN_WORDS, read_description
from lesiondiffusion_tools.cli import Commands, convert_option, parse_options
from lesiondiffusion_tools.synthesize import json_object

SETTINGS = settings(max_examples=100, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

WORDS = sorted(
    {
        *ORGAN_WORDS,
        *(w for syns in LESION_WORDS.values() for w in syns),
        "hypodense",
        "hyperdense",
        "isodense",
        "no",
        "without",
        "calcification",
        "mm",
        "cm",
        "HU",
        "x",
        "by",
        "well-defined",
        "ill-defined",
        "heterogeneous",
        "left",
        "right",
        "lobe",
        "upper",
        "the",
        "a",
        "in",
        ",",
        ".",
    }
)
numbers = st.one_of(st.integers(-5, 600).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str))
tokens = st.one_of(st.sampled_from(WORDS), numbers, st.text(string.printable, max_size=6))
sentences = st.lists(tokens, max_size=14).map(" ".join)
field_names = st.one_of(st.sampled_from([*V.REPORT_FIELDS, V.CAVITY, "organ type", "lesion type"]), st.text(max_size=8))
values = st.one_of(sentences, st.text(max_size=20))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=10,
)


def clean(error: LesionDiffusionError) -> None:
    assert "\n" not in str(error) and str(error).strip()


@SETTINGS
@given(sentences, st.booleans())
def test_any_sentence_is_read_or_refused(text: str, require_organ: bool) -> None:
    try:
        reading = read_description(text, require_organ=require_organ)
    except LesionDiffusionError as e:
        clean(e)
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in reading.attributes.items())
    if require_organ:
        assert reading.attributes.get("organ type")


@SETTINGS
@given(
    st.one_of(
        sentences, st.builds(lambda a, b, u: f"{a} x {b} {u}", numbers, numbers, st.sampled_from(["mm", "cm", "pixel"]))
    )
)
def test_any_size_is_read_or_refused(text: str) -> None:
    try:
        size = parse_lesion_size(text)
    except LesionDiffusionError as e:
        clean(e)
        return
    assert len(size) == 3 and all(isinstance(v, int) and v >= 1 for v in size)


@SETTINGS
@given(st.dictionaries(field_names, values, max_size=5), st.booleans())
def test_any_attributes_are_accepted_or_refused(attributes: dict[str, str], allow_unknown: bool) -> None:
    for name, value in attributes.items():
        if V.is_categorical(name):
            found, unknown = V.parse_classes(name, value)
            assert set(found) <= set(V.classes(name)) and all(isinstance(u, str) for u in unknown)
    try:
        warnings = check_attributes(attributes, "--attributes", allow_unknown)
    except LesionDiffusionError as e:
        clean(e)
        assert str(e).startswith("--attributes: ")
        return
    assert all("\n" not in w for w in warnings)
    if warnings:
        assert allow_unknown


@SETTINGS
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "requests": st.lists(
                    st.one_of(
                        json_values,
                        st.fixed_dictionaries(
                            {
                                "case": st.one_of(st.text(max_size=6), st.just("a")),
                                "image": st.one_of(st.just("ct.nii.gz"), json_values),
                                "attributes": st.one_of(st.dictionaries(field_names, values, max_size=3), json_values),
                                "text": st.one_of(st.none(), sentences),
                            }
                        ),
                    ),
                    max_size=3,
                )
            }
        ),
    )
)
def test_any_requests_file_is_read_or_refused(obj: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.json"
        path.write_text(json.dumps(obj))
        try:
            requests = read_requests(path)
        except LesionDiffusionError as e:
            clean(e)
            assert str(path) in str(e)
            return
    assert requests and all(r.attributes.get("organ type") and r.attributes.get("lesion type") for r in requests)


@SETTINGS
@given(st.one_of(st.text(max_size=30), st.builds(json.dumps, json_values)))
@example("~0")  # a home folder of no known user: expanduser raised instead of "not found"
def test_any_attributes_option_is_parsed_or_refused(text: str) -> None:
    try:
        obj = json_object(text if text.strip() else "{}", "--attributes")
    except LesionDiffusionError as e:
        clean(e)
        return
    assert isinstance(obj, dict)


OPTION_TYPES = [int, float, bool, str, int | None, str | None, Any, tuple[int, int, int]]


@SETTINGS
@given(st.sampled_from(OPTION_TYPES), st.one_of(st.none(), numbers, st.text(max_size=12)))
def test_any_option_value_is_typed_or_refused(annotation: Any, text: str | None) -> None:
    try:
        value = convert_option("opt", text, annotation)
    except LesionDiffusionError as e:
        clean(e)
        assert str(e).startswith("--opt")
        return
    if annotation is int:
        assert isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        assert isinstance(value, float) and value == value and abs(value) != float("inf")
    elif annotation is bool:
        assert isinstance(value, bool)


@SETTINGS
@given(
    st.sampled_from(["synthesize", "train", "preprocess", "make_dataset", "evaluate", "validate"]),
    st.lists(
        st.one_of(st.sampled_from(["--seed", "--out", "--steps", "--overwrite", "--lr", "-x", "--", "--=1"]), tokens),
        max_size=8,
    ),
)
def test_any_command_line_is_parsed_or_refused(command: str, argv: list[str]) -> None:
    try:
        _, kwargs = parse_options(getattr(Commands(), command), argv)
    except LesionDiffusionError as e:
        clean(e)
        return
    assert isinstance(kwargs, dict)


@pytest.mark.parametrize("text", ["a hypodense hyperdense cyst in the liver", "a cyst in the liver and the spleen"])
def test_contradictions_are_refused(text: str) -> None:
    with pytest.raises(LesionDiffusionError):
        read_description(text)
