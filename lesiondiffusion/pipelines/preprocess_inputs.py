"""The preprocess bundle's inputs: images, attribute lines and optional organ maps, one request per case.

Single form: ``image`` + ``attributes`` (a JSON object, as text, a dict, or a file holding one) +
optional ``organ_seg``. Batch form (the original's): ``image_list`` (one path per line) +
``attributes_list`` (one JSON object per line, aligned by line) + optional ``organ_seg_list``; a single
``attributes`` may stand for every line. Relative paths in a list file are relative to that file.
``organ_seg_version_list`` (optional, aligned by line) gives each organ map's numbering, ``v1``, ``v2``
or ``auto``, as a requests file declares it; a ``organ_seg_version`` other than auto wins over it.
``case_list`` (optional, aligned by line) names each case: its output folder and its seed (so a case's
boxes and reports do not depend on its position in the batch); without it cases are ``case_<line>``.

Everything is checked before any case is processed, so a typo never costs a long run: lists of
different lengths, a line that is not a JSON object, a missing ``organ type`` / ``lesion type``, an
organ name no TotalSegmentator table knows. Each is one :class:`InputError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lesiondiffusion.dataset import read_list_files
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import user_path
from lesiondiffusion.labels import AUTO, VERSION_CHOICES, UnknownOrganError, label_table
from lesiondiffusion.requests import CASE_NAME, RESERVED_CASE_NAMES
from lesiondiffusion.vocabulary import OPTIONAL_FIELDS, REPORT_FIELDS

logger = logging.getLogger(__name__)

ORGAN_TYPE = "organ type"
LESION_TYPE = "lesion type"
REQUIRED = (ORGAN_TYPE, LESION_TYPE)
KNOWN_KEYS = frozenset(REQUIRED + REPORT_FIELDS + OPTIONAL_FIELDS)


@dataclass(frozen=True)
class CaseRequest:
    """One case to prepare: its image, requested attributes and optional organ map."""

    index: int
    image: Path
    attributes: dict[str, str]
    organ_id: int
    organ_name: str
    organ_seg: Path | None = None
    source: str = field(default="", compare=False)  # where it was listed, for messages
    organ_seg_version: str | None = None  # the numbering declared for this case's organ map (None: not declared)
    name: str = ""  # the case's name: its output folder and its seed (``case_<index>`` when not given)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"case_{self.index:03d}")


def parse_attributes(value: Any, where: str | Path, line: int | None = None) -> dict[str, str]:
    """One attribute object (dict or JSON text) -> ``{field: text}``; errors name ``where`` (and ``line``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(where, f"attribute line is not valid JSON ({e.msg} at column {e.colno})", line) from None
    if not isinstance(value, Mapping):
        raise InputError(
            where,
            f'attributes must be a JSON object such as {{"organ type": "liver", "lesion type": "cyst"}}, got {type(value).__name__}',
            line,
        )
    out: dict[str, str] = {}
    for key, text in value.items():
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise InputError(where, f"attribute {key!r} must be text, got {type(text).__name__}", line)
        out[str(key)] = str(text)
    missing = [k for k in REQUIRED if not out.get(k, "").strip()]
    if missing:
        raise InputError(where, f"attributes need {' and '.join(repr(k) for k in missing)}", line)
    unknown = sorted(set(out) - KNOWN_KEYS)
    if unknown:
        logger.warning(
            "%s%s: ignoring unknown attribute(s) %s", where, f":{line}" if line else "", ", ".join(map(repr, unknown))
        )
        out = {k: v for k, v in out.items() if k in KNOWN_KEYS}
    return out


def _single_attributes(value: Any) -> tuple[dict[str, str], str | Path, int | None]:
    """``attributes`` given once: a dict, JSON text, or a file with one JSON object (or one JSON line).

    Returns the attributes and where they came from (for later messages).
    """
    if isinstance(value, Mapping):
        return parse_attributes(value, "attributes"), "attributes", None
    text = str(value).strip()
    if text.startswith("{"):
        return parse_attributes(text, "attributes"), "attributes", None
    path = user_path(text)
    if not path.is_file():
        raise InputError("attributes", f"neither a JSON object nor an existing file: {text!r}")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) > 1:
        try:
            return parse_attributes(json.loads(path.read_text(encoding="utf-8")), path), path, None  # pretty-printed
        except json.JSONDecodeError:
            raise InputError(
                path, f"holds {len(lines)} attribute lines; give one object, or use attributes_list with image_list"
            ) from None
    if not lines:
        raise InputError(path, "empty attributes file")
    return parse_attributes(lines[0], path, 1), path, 1


def read_attribute_lines(path: str | Path) -> list[dict[str, str]]:
    """An attributes list file: one JSON object per line (trailing blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "attributes list file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(path, "empty line inside the list (lists are aligned by line)", i)
        out.append(parse_attributes(line, path, i))
    if not out:
        raise InputError(path, "the attributes list is empty")
    return out


def _organ(attributes: dict[str, str], where: str | Path, line: int | None) -> tuple[int, str]:
    table = label_table("v1")  # reports and organ maps use the v1 numbering
    try:
        organ_id = table.id(attributes[ORGAN_TYPE])
    except UnknownOrganError as e:
        raise InputError(where, str(e), line) from None
    return organ_id, table.name(organ_id)


def read_requests(
    image: str | None = None,
    image_list: str | None = None,
    attributes: Any = None,
    attributes_list: str | None = None,
    organ_seg: str | None = None,
    organ_seg_list: str | None = None,
    organ_seg_version_list: str | None = None,
    case_list: str | None = None,
) -> list[CaseRequest]:
    """Every case's request, in input order, fully checked (see the module docstring)."""
    if (image is None) == (image_list is None):
        raise LesionDiffusionError("give either image (one CT) or image_list (a file with one CT path per line)")
    if attributes is None and attributes_list is None:
        raise LesionDiffusionError(
            'give attributes (e.g. {"organ type": "liver", "lesion type": "cyst"}) or attributes_list'
        )
    if attributes is not None and attributes_list is not None:
        raise LesionDiffusionError("give attributes or attributes_list, not both")
    if image is not None:
        if organ_seg_list is not None:
            raise LesionDiffusionError("organ_seg_list goes with image_list; with one image give organ_seg")
        images = [(user_path(str(image)), None if organ_seg is None else user_path(str(organ_seg)), "image")]
    else:
        if organ_seg is not None:
            raise LesionDiffusionError("organ_seg goes with image; with image_list give organ_seg_list")
        cases = read_list_files(str(image_list), seg_list=None if organ_seg_list is None else str(organ_seg_list))
        images = [(c.image, c.organ_seg, c.source or "") for c in cases]

    if attributes_list is not None:
        per_line = read_attribute_lines(attributes_list)
        if len(per_line) != len(images):
            listed = image_list if image_list is not None else "image (one case)"
            raise InputError(
                attributes_list,
                f"has {len(per_line)} lines but {listed} has {len(images)}; the lists must be aligned line by line",
            )
        where: list[tuple[str | Path, int | None]] = [(Path(attributes_list), i + 1) for i in range(len(per_line))]
    else:
        one, origin, line_no = _single_attributes(attributes)
        per_line = [dict(one) for _ in images]
        where = [(origin, line_no)] * len(images)

    versions: list[str | None] = [None] * len(images)
    if organ_seg_version_list is not None:
        versions = read_version_lines(organ_seg_version_list, len(images))
    names = [""] * len(images) if case_list is None else read_name_lines(case_list, len(images))
    requests = []
    for i, ((img, seg, source), attrs, (w, line), version, name) in enumerate(
        zip(images, per_line, where, versions, names)
    ):
        organ_id, organ_name = _organ(attrs, w, line)
        requests.append(CaseRequest(i, img, attrs, organ_id, organ_name, seg, source, version, name))
    return requests


def read_name_lines(path: str | Path, n: int) -> list[str]:
    """A case-name list: ``n`` distinct folder names (letters, digits, ``._-``), one per line."""
    lines = _aligned_lines(path, n, "case list")
    seen: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        name = line.strip()
        if not CASE_NAME.match(name):
            raise InputError(
                path,
                f"{name!r} is not a case name: use letters, digits, '.', '_' and '-', starting with a letter or digit",
                i,
            )
        if name in RESERVED_CASE_NAMES:
            raise InputError(path, f"case name {name!r} is a file or folder the output already holds", i)
        if name in seen:
            raise InputError(path, f"case name {name!r} repeats line {seen[name]}; each case needs its own", i)
        seen[name] = i
    return [line.strip() for line in lines]


def _aligned_lines(path: str | Path, n: int, what: str) -> list[str]:
    """The ``n`` lines of a list aligned with the images (trailing blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} file not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != n:
        raise InputError(
            path, f"has {len(lines)} lines but there are {n} images; the lists must be aligned line by line"
        )
    return lines


def read_version_lines(path: str | Path, n: int) -> list[str | None]:
    """An organ-map numbering list: ``v1``, ``v2`` or ``auto`` (None: nothing declared) per line, ``n`` lines."""
    lines = _aligned_lines(path, n, "organ_seg_version list")
    out: list[str | None] = []
    for i, line in enumerate(lines, 1):
        value = line.strip().lower()
        if value not in VERSION_CHOICES:
            raise InputError(path, f"{line.strip()!r} is not one of {', '.join(VERSION_CHOICES)}", i)
        out.append(None if value == AUTO else value)
    return out
