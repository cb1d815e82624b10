"""Synthesis requests: which lesion to write into which CT, as one JSON file.

A requests file lists one request per case::

    {"requests": [
        {"case": "liver_0001", "image": "images/liver_0001.nii.gz", "organ_seg": "segs/liver_0001.nii.gz",
         "attributes": {"organ type": "liver", "lesion type": "cyst", "density": "hypodense"}},
        ...
    ]}

``organ_seg`` is optional (without it the preprocess stage segments the CT). An entry may describe the
lesion in one sentence, ``"text": "a 25 mm hypodense, well-defined cyst in the liver"``, instead of or
besides ``attributes``: the sentence is read by :func:`lesiondiffusion.text.read_description`, and the
entry's own attributes win over what it says. The organ maps' TotalSegmentator numbering may be
declared, for the whole file (``"organ_seg_version": "v1"`` beside ``"requests"``) or per entry (the
entry's wins): preprocessing then reads each map in it instead of telling it from the map's anatomy,
unless ``--organ_seg_version`` names one. Relative paths are relative to the file's folder. ``lesiondiffusion synthesize --requests FILE`` runs every request and writes
``<out>/<case>/``; ``lesiondiffusion evaluate --requests FILE`` checks those outputs against the requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import PathLike, read_json, user_path, write_json
from lesiondiffusion.labels import VERSIONS
from lesiondiffusion.text import TextError, TextReading, read_description

REQUIRED_ATTRIBUTES = ("organ type", "lesion type")
VERSION_KEY = "organ_seg_version"
CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name on every system
# names an output folder already holds beside its case folders (the stages' manifest, synthesize's summary
# and its kept work folder)
RESERVED_CASE_NAMES = frozenset({"manifest.json", "summary.json", "work"})


@dataclass(frozen=True)
class SynthesisRequest:
    """One case: the CT to write into, the lesion's attributes, and optionally the CT's organ map.

    For a request described in words, ``text`` is the sentence, ``reading`` what was read from it and
    ``given`` the attributes stated explicitly; ``attributes`` is then the reading's attributes
    overridden by ``given``.
    """

    case: str
    image: Path
    attributes: dict[str, str]
    organ_seg: Path | None = None
    text: str | None = None
    reading: TextReading | None = None
    given: dict[str, str] | None = None
    organ_seg_version: str | None = None  # the organ map's declared numbering ("v1", "v2"; None: not declared)
    source: str | None = None  # where the user gave it, for messages ("requests.json: requests[2]", "--attributes")
    warnings: tuple[str, ...] = ()  # what the input checks found doubtful (lesiondiffusion.sanity), kept in provenance
    organ_seg_numbering: str | None = None  # the numbering the input checks read the map in (lesiondiffusion.sanity)

    def to_json(self, base: Path) -> dict[str, Any]:
        """The entry as written, paths relative to ``base``."""
        obj: dict[str, Any] = {"case": self.case, "image": _relative(self.image, base)}
        if self.organ_seg is not None:
            obj["organ_seg"] = _relative(self.organ_seg, base)
        if self.organ_seg_version is not None:
            obj["organ_seg_version"] = self.organ_seg_version
        if self.text is not None:
            obj["text"] = self.text
            if self.given:
                obj["attributes"] = dict(self.given)
        else:
            obj["attributes"] = dict(self.attributes)
        return obj

    def provenance(self) -> dict[str, Any]:
        """What was asked, for ``provenance.json``: the sentence and its reading, the explicit attributes,
        and the attributes the case was synthesised with."""
        out: dict[str, Any] = {}
        if self.text is not None:
            out["text"] = self.text
            out["text_reading"] = None if self.reading is None else self.reading.to_json()
            out["given_attributes"] = dict(self.given or {})
        out["attributes"] = dict(self.attributes)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


def describe(text: str, given: dict[str, str] | None = None) -> tuple[dict[str, str], TextReading]:
    """The attributes of a lesion described by ``text`` with explicit ``given`` attributes (they win).

    The organ may come from ``given`` instead of the sentence. Raises :class:`TextError`.
    """
    given = dict(given or {})
    reading = read_description(text, require_organ=not given.get("organ type", "").strip())
    return {**reading.attributes, **given}, reading


def with_reading(request: SynthesisRequest, reading: TextReading) -> SynthesisRequest:
    """``request`` with its sentence read anew (e.g. by a model): the reading's attributes under the given ones."""
    attributes = {**reading.attributes, **(request.given or {})}
    return replace(request, attributes=attributes, reading=reading)


def _relative(path: Path, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def write_requests(path: PathLike, requests: Sequence[SynthesisRequest], organ_seg_version: str | None = None) -> Path:
    """Write ``requests`` to ``path`` atomically, paths relative to its folder; ``organ_seg_version``
    ("v1", "v2") declares the numbering of every organ map in it."""
    path = Path(path)
    if organ_seg_version is not None and organ_seg_version not in VERSIONS:
        raise LesionDiffusionError(f"organ_seg_version must be one of {', '.join(VERSIONS)}, not {organ_seg_version!r}")
    head: dict[str, Any] = {} if organ_seg_version is None else {VERSION_KEY: organ_seg_version}
    return write_json(path, {**head, "requests": [r.to_json(path.parent) for r in requests]})


def read_requests(path: PathLike) -> list[SynthesisRequest]:
    """Read and check a requests file; each problem is an :class:`InputError` naming the file and entry."""
    path = Path(path)
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("requests"), list):
        raise InputError(path, 'not a requests file: expected a JSON object with a "requests" list')
    if not obj["requests"]:
        raise InputError(path, "the requests list is empty")
    base = path.parent
    shared = _version(obj.get(VERSION_KEY), lambda problem: InputError(path, problem))
    out = [_read_entry(path, base, i, entry, shared) for i, entry in enumerate(obj["requests"])]
    seen: set[str] = set()
    for i, request in enumerate(out):
        if request.case in seen:
            raise InputError(path, f"requests[{i}]: case name {request.case!r} is used twice")
        seen.add(request.case)
    return out


def _version(value: Any, bad: Any) -> str | None:
    """A declared numbering ("v1", "v2"), None when absent; anything else is ``bad(problem)``."""
    if value is None:
        return None
    if value not in VERSIONS:
        raise bad(f"{VERSION_KEY!r} must be one of {', '.join(VERSIONS)}, got {value!r}")
    return str(value)


def _read_entry(path: Path, base: Path, index: int, entry: Any, shared_version: str | None = None) -> SynthesisRequest:
    def bad(problem: str) -> InputError:
        return InputError(path, f"requests[{index}]: {problem}")

    if not isinstance(entry, dict):
        raise bad("not a JSON object")
    case = entry.get("case")
    if not isinstance(case, str) or not CASE_NAME.match(case):
        raise bad(f"'case' must be a folder-safe name (letters, digits, '.', '_', '-'), got {case!r}")
    if case in RESERVED_CASE_NAMES:
        raise bad(f"'case' {case!r} is the name of a file or folder the output already holds; choose another")
    paths: dict[str, Path | None] = {}
    for key, required in (("image", True), ("organ_seg", False)):
        value = entry.get(key)
        if value is None and not required:
            paths[key] = None
            continue
        if not isinstance(value, str) or not value:
            raise bad(f"{key!r} must be a path")
        p = user_path(value)
        paths[key] = p if p.is_absolute() else base / p
    text = entry.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise bad("'text' must be a sentence describing the lesion")
    attributes = entry.get("attributes")
    if attributes is None and text is not None:
        attributes = {}
    if not isinstance(attributes, dict):
        raise bad("'attributes' must be a JSON object" + ("" if text is not None else " (or give 'text', a sentence)"))
    if any(not isinstance(v, (str, int, float)) or isinstance(v, bool) for v in attributes.values()):
        raise bad("every attribute value must be text")
    attributes = {str(k): str(v) for k, v in attributes.items()}
    reading = given = None
    if text is not None:
        given = attributes
        try:
            attributes, reading = describe(text, given)
        except TextError as e:
            raise bad(f"text: {e}") from None
    missing = [k for k in REQUIRED_ATTRIBUTES if not attributes.get(k, "").strip()]
    if missing:
        raise bad(f"attributes need {' and '.join(repr(k) for k in missing)}")
    version = _version(entry.get(VERSION_KEY), bad) or shared_version
    return SynthesisRequest(
        case,
        paths["image"],
        attributes,
        paths["organ_seg"],
        text,
        reading,
        given,
        version,
        f"{path}: requests[{index}]",
    )  # type: ignore[arg-type]
