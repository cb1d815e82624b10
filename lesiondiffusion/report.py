"""The structured lesion report (the original's ``type.json``): typed model, schema, read and write.

File format (design 3): ``{"<organ id>": [summary, note, {attributes}, [[[cx, cy, cz]], [[sx, sy, sz]]]]}``.
Reading validates against ``resources/report.schema.json`` (version :data:`SCHEMA_VERSION`); writing
produces the same format, so files stay usable by the original code.

Axis order. The box (element 3: centre and size in voxels) and the ``size`` text (``"[[a b c]] pixel"``)
list the axes in the original's SimpleITK array order, i.e. *reversed* NIfTI voxel order: element ``a``
describes array axis :data:`REPORT_BOX_AXES` ``[a]``, so ``[[k j i]]`` for array axes ``(i, j, k)``.
Both published demo reports hit their lesion only when read that way. :class:`LesionReport` keeps the
file's order in ``centre`` / ``size``; :meth:`LesionReport.array_box` and
:meth:`LesionReport.with_array_box` read and set the box in array axes, and :func:`to_report_axes` /
:func:`from_report_axes` convert any triple (sizes in mm too). Everything else in the package (arrays,
boxes, measurements) uses array axes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar

import jsonschema

from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import InputError
from lesiondiffusion.io import PathLike, read_json, write_json

SCHEMA_VERSION = "1.0"

# report box element a describes NIfTI array axis REPORT_BOX_AXES[a] (the original's z, y, x order)
REPORT_BOX_AXES = (2, 1, 0)

_T = TypeVar("_T")

_NUMBER = r"[-+]?\d+(?:\.\d+)?"


@lru_cache(maxsize=1)
def report_schema() -> dict[str, Any]:
    """The JSON schema every report file is validated against."""
    return json.loads(resources.files("lesiondiffusion").joinpath("resources/report.schema.json").read_text("utf-8"))


def format_size(size: tuple[int, ...]) -> str:
    """Size in voxels as the original writes it: ``"[[23 18 24]] pixel"``."""
    return f"[[{' '.join(str(int(round(s))) for s in size)}]] pixel"


def parse_size(text: str) -> tuple[int, int, int] | None:
    """``"[[23 18 24]] pixel,"`` -> ``(23, 18, 24)``; None when the text has no three numbers."""
    nums = re.findall(_NUMBER, text or "")
    return tuple(int(round(float(n))) for n in nums[:3]) if len(nums) >= 3 else None  # type: ignore[return-value]


def to_report_axes(values: Sequence[_T]) -> tuple[_T, _T, _T]:
    """Array-axis triple -> the report's axis order (element ``a`` is array axis ``REPORT_BOX_AXES[a]``)."""
    return tuple(values[axis] for axis in REPORT_BOX_AXES)  # type: ignore[return-value]


def from_report_axes(values: Sequence[_T]) -> tuple[_T, _T, _T]:
    """Report-order triple -> array axes (inverse of :func:`to_report_axes`)."""
    out: list[Any] = [None, None, None]
    for a, axis in enumerate(REPORT_BOX_AXES):
        out[axis] = values[a]
    return tuple(out)  # type: ignore[return-value]


def format_ct_value(hu: float) -> str:
    """Mean HU as the original's sentence."""
    return f"Mean density of the lesion region is approximately {round(float(hu), 1)} HU,"


def parse_ct_value(text: str) -> float | None:
    """The HU number in a CT-value sentence, or None."""
    m = re.search(rf"({_NUMBER})\s*HU", text or "", flags=re.IGNORECASE)
    return float(m.group(1)) if m else None


@dataclass(frozen=True)
class LesionReport:
    """One lesion's report: the organ it lies in, its attributes, and optionally its box in voxels."""

    organ_id: int
    attributes: dict[str, str]
    centre: tuple[int, int, int] | None = None
    size: tuple[int, int, int] | None = None
    summary: str = ""
    note: str = ""

    # ---- typed views of the free-text attributes -------------------------------------------------
    def classes(self, name: str) -> list[str]:
        """Canonical classes of a categorical attribute (unrecognised words dropped)."""
        return V.parse_classes(name, self.attributes.get(name, ""))[0]

    @property
    def size_voxels(self) -> tuple[int, int, int] | None:
        """Lesion size in voxels, from the box element or the ``size`` attribute."""
        return self.size or parse_size(self.attributes.get(V.SIZE, ""))

    @property
    def mean_hu(self) -> float | None:
        """Mean lesion HU parsed from the ``CT value`` attribute."""
        return parse_ct_value(self.attributes.get(V.CT_VALUE, ""))

    # ---- the box in array axes (see the module docstring) ----------------------------------------
    def array_box(self) -> tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]:
        """``(centre, size)`` of the box in array axes; the size falls back to the ``size`` text.

        Either is None where the report has none.
        """
        size = self.size_voxels
        return (
            None if self.centre is None else from_report_axes(tuple(int(v) for v in self.centre)),
            None if size is None else from_report_axes(tuple(int(v) for v in size)),
        )

    def with_array_box(self, centre: Sequence[int], size: Sequence[int]) -> LesionReport:
        """This report with its box and ``size`` text set from a centre and size in array axes."""
        report_size = to_report_axes(tuple(int(v) for v in size))
        attrs = {**self.attributes, V.SIZE: format_size(report_size)}
        return replace(self, attributes=attrs, centre=to_report_axes(tuple(int(v) for v in centre)), size=report_size)

    def unrecognised(self) -> dict[str, list[str]]:
        """Per categorical field, the pieces of text no vocabulary class matched."""
        out = {}
        for name, text in self.attributes.items():
            if V.is_categorical(name):
                unknown = V.parse_classes(name, text)[1]
                if unknown:
                    out[name] = unknown
        return out

    def canonical(self) -> LesionReport:
        """The same report with every categorical value rewritten as its canonical classes.

        Unrecognised pieces are kept after the recognised ones, so nothing the user wrote is lost.
        """
        attrs = dict(self.attributes)
        for name, text in self.attributes.items():
            if V.is_categorical(name):
                found, unknown = V.parse_classes(name, text)
                attrs[name] = V.format_classes(found + unknown)
        return replace(self, attributes=attrs)

    # ---- original format ---------------------------------------------------------------------------
    def to_entry(self) -> list[Any]:
        """The list stored under the organ id in ``type.json``."""
        entry: list[Any] = [self.summary, self.note, dict(self.attributes)]
        if self.centre is not None and self.size is not None:
            entry.append([[list(map(int, self.centre))], [list(map(int, self.size))]])
        return entry

    @classmethod
    def from_entry(cls, organ_id: int | str, entry: list[Any]) -> LesionReport:
        """Build from one ``type.json`` entry (already schema-valid)."""
        box = entry[3] if len(entry) > 3 else None
        centre = tuple(int(round(v)) for v in box[0][0]) if box else None
        size = tuple(int(round(v)) for v in box[1][0]) if box else None
        return cls(int(organ_id), dict(entry[2]), centre, size, entry[0], entry[1])  # type: ignore[arg-type]


@dataclass(frozen=True)
class Report:
    """A whole ``type.json``: one :class:`LesionReport` per organ id, in file order."""

    lesions: tuple[LesionReport, ...] = field(default_factory=tuple)

    def __getitem__(self, organ_id: int | str) -> LesionReport:
        for lesion in self.lesions:
            if lesion.organ_id == int(organ_id):
                return lesion
        raise KeyError(organ_id)

    def __contains__(self, organ_id: object) -> bool:
        try:
            self[organ_id]  # type: ignore[index]
        except (KeyError, ValueError, TypeError):
            return False
        return True

    @property
    def organ_ids(self) -> tuple[int, ...]:
        return tuple(lesion.organ_id for lesion in self.lesions)

    def to_json(self) -> dict[str, list[Any]]:
        """The ``type.json`` dict."""
        return {str(lesion.organ_id): lesion.to_entry() for lesion in self.lesions}

    @classmethod
    def from_json(cls, obj: Any, source: PathLike | None = None) -> Report:
        """Validate ``obj`` against the schema and build the model; errors name ``source``."""
        validate_report(obj, source)
        return cls(tuple(LesionReport.from_entry(k, v) for k, v in obj.items()))

    def canonical(self) -> Report:
        """Every lesion's values canonicalised through the synonym table."""
        return Report(tuple(lesion.canonical() for lesion in self.lesions))


def validate_report(obj: Any, source: PathLike | None = None) -> None:
    """Raise :class:`InputError` (one line, naming ``source`` and the JSON path) if ``obj`` is malformed."""
    validator = jsonschema.Draft202012Validator(report_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise InputError(source, f"not a valid report (schema {SCHEMA_VERSION}) at {where}: {error.message}")


def read_report(path: PathLike) -> Report:
    """Read and validate a ``type.json`` file."""
    return Report.from_json(read_json(path), path)


def write_report(path: PathLike, report: Report) -> None:
    """Write ``report`` atomically in the original ``type.json`` format (validated first)."""
    obj = report.to_json()
    validate_report(obj, path)
    write_json(path, obj, indent=4)
