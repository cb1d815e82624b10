"""The manifest passed between stages (docs/architecture.md): a datalist JSON of typed case entries.

Preprocess writes it; LMNet adds ``label`` / ``label_original``; LINet adds ``synthetic_image``. Cases
are under ``"testing"`` in input order; a case that failed keeps its place with ``"status": "error"``
and a one-line ``"error"``, so line *i* of the user's input list is always entry *i*. Paths are
stored relative to the manifest's folder (the folder can be moved as a whole), except
``source_image``, the user's own input, which is stored absolute. In memory every path is absolute.
Keys this module does not know are kept as they are (``extra``), so a stage never drops what a later
one added.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lesiondiffusion.errors import InputError
from lesiondiffusion.io import PathLike, read_json, user_path, write_json
from lesiondiffusion.placement import Box

MANIFEST_NAME = "manifest.json"
SPLIT = "testing"
STATUS_OK = "ok"
STATUS_ERROR = "error"

_CASE_PATHS = ("geometry", "image", "organ_seg", "label", "label_original", "synthetic_image")
_CASE_KEYS = ("case", "status", "error", "source_image", *_CASE_PATHS, "lesions")
_LESION_KEYS = ("organ_id", "cavity", "report", "box")


@dataclass(frozen=True)
class LesionEntry:
    """One lesion of a case: its organ (v1 id), cavity class, report file and box (standardised voxels)."""

    organ_id: int
    cavity: str
    report: Path
    box: Box
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, base: Path) -> dict[str, Any]:
        """The entry with the report path relative to ``base``."""
        return {
            "organ_id": int(self.organ_id),
            "cavity": self.cavity,
            "report": _relative(self.report, base),
            "box": self.box.to_json(),
            **self.extra,
        }


@dataclass(frozen=True)
class CaseEntry:
    """One case: where it came from, what each stage wrote, or why it failed."""

    case: str
    status: str = STATUS_OK
    source_image: Path | None = None
    geometry: Path | None = None
    image: Path | None = None
    organ_seg: Path | None = None
    lesions: tuple[LesionEntry, ...] = ()
    label: Path | None = None
    label_original: Path | None = None
    synthetic_image: Path | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the case was processed without error."""
        return self.status == STATUS_OK

    def failed(self, message: str) -> CaseEntry:
        """The same case marked as failed with a one-line ``message`` (outputs of later stages dropped)."""
        return CaseEntry(self.case, STATUS_ERROR, source_image=self.source_image, error=" ".join(str(message).split()))

    def to_json(self, base: Path) -> dict[str, Any]:
        """The entry as written: paths relative to ``base`` (``source_image`` absolute), absent keys left out."""
        obj: dict[str, Any] = {"case": self.case, "status": self.status}
        if self.error is not None:
            obj["error"] = self.error
        if self.source_image is not None:
            obj["source_image"] = str(Path(self.source_image).resolve())
        for key in _CASE_PATHS[:3]:
            if getattr(self, key) is not None:
                obj[key] = _relative(getattr(self, key), base)
        if self.ok or self.lesions:
            obj["lesions"] = [lesion.to_json(base) for lesion in self.lesions]
        for key in _CASE_PATHS[3:]:
            if getattr(self, key) is not None:
                obj[key] = _relative(getattr(self, key), base)
        obj.update(self.extra)
        return obj


@dataclass(frozen=True)
class Manifest:
    """All cases in input order."""

    cases: tuple[CaseEntry, ...] = ()

    def ok_cases(self) -> list[CaseEntry]:
        """The cases that succeeded, in order."""
        return [c for c in self.cases if c.ok]

    def replace_case(self, index: int, case: CaseEntry) -> Manifest:
        """A copy with entry ``index`` replaced (later stages update cases this way)."""
        cases = list(self.cases)
        cases[index] = case
        return replace(self, cases=tuple(cases))

    def to_json(self, base: Path) -> dict[str, Any]:
        """The datalist dict, paths relative to ``base``."""
        return {SPLIT: [c.to_json(base) for c in self.cases]}


def _relative(path: PathLike, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def write_manifest(path: PathLike, manifest: Manifest) -> Path:
    """Write ``manifest`` to ``path`` (atomically), paths relative to its folder."""
    path = Path(path)
    return write_json(path, manifest.to_json(path.parent))


def read_manifest(path: PathLike) -> Manifest:
    """Read a manifest; every path comes back absolute. Malformed entries name the file and entry."""
    path = Path(path)
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get(SPLIT), list):
        raise InputError(path, f"not a manifest: expected a JSON object with a {SPLIT!r} list")
    base = path.parent.resolve()
    return Manifest(tuple(_read_case(path, base, i, entry) for i, entry in enumerate(obj[SPLIT])))


def _read_case(path: Path, base: Path, index: int, entry: Any) -> CaseEntry:
    where = f"{SPLIT}[{index}]"

    def bad(problem: str) -> InputError:
        return InputError(path, f"entry {where}: {problem}")

    if not isinstance(entry, dict):
        raise bad("not a JSON object")
    if not isinstance(entry.get("case"), str):
        raise bad("no 'case' name")
    status = entry.get("status", STATUS_OK)
    if status not in (STATUS_OK, STATUS_ERROR):
        raise bad(f"status must be {STATUS_OK!r} or {STATUS_ERROR!r}, not {status!r}")
    if status == STATUS_ERROR and not isinstance(entry.get("error"), str):
        raise bad("a failed case needs an 'error' message")
    paths: dict[str, Path | None] = {}
    for key in ("source_image", *_CASE_PATHS):
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise bad(f"{key!r} must be a path string")
        paths[key] = None if value is None else _absolute(value, base)
    if status == STATUS_OK:
        missing = [k for k in ("image", "organ_seg", "geometry") if paths[k] is None]
        if missing:
            raise bad(f"a processed case needs {', '.join(repr(k) for k in missing)}")
    raw_lesions = entry.get("lesions", [])
    if not isinstance(raw_lesions, list):
        raise bad("'lesions' must be a list")
    lesions = tuple(_read_lesion(bad, base, j, lesion) for j, lesion in enumerate(raw_lesions))
    extra = {k: v for k, v in entry.items() if k not in _CASE_KEYS}
    return CaseEntry(entry["case"], status, lesions=lesions, error=entry.get("error"), extra=extra, **paths)


def _read_lesion(bad, base: Path, index: int, obj: Any) -> LesionEntry:
    if not isinstance(obj, dict) or any(k not in obj for k in _LESION_KEYS):
        raise bad(f"lesions[{index}] needs {', '.join(_LESION_KEYS)}")
    try:
        box = Box.from_json(obj["box"])
        organ_id = int(obj["organ_id"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"lesions[{index}] has a malformed organ id or box ({e})") from None
    if not isinstance(obj["report"], str) or not isinstance(obj["cavity"], str):
        raise bad(f"lesions[{index}]: 'report' and 'cavity' must be strings")
    extra = {k: v for k, v in obj.items() if k not in _LESION_KEYS}
    return LesionEntry(organ_id, obj["cavity"], _absolute(obj["report"], base), box, extra)


def _absolute(value: str, base: Path) -> Path:
    p = user_path(value)
    return p if p.is_absolute() else base / p
