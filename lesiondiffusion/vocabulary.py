"""The attribute vocabulary: report fields, their value classes and synonyms.

Classes and synonyms come from the original project's ``description.json``; cavity classes are
design 3's. A free-text value ("round-like,protrusion into the lumen,") is parsed into canonical classes
by greedy longest-synonym matching, so synonyms that themselves contain commas stay whole.
"""

from __future__ import annotations

import json
import re
from functools import cache, lru_cache
from importlib import resources

# type.json attribute keys, in the original's order
ENHANCEMENT = "enhancement status"
LOCATION = "lesion location"
SHAPE = "shape"
SIZE = "size"
DENSITY = "density"
DENSITY_VARIATIONS = "density variations"
CT_VALUE = "CT value"
SURFACE = "surface characteristics"
RELATIONSHIP = "relationship with adjacent organs"
SPECIFIC = "specific features"
CAVITY = "cavity"

REPORT_FIELDS = (
    ENHANCEMENT,
    LOCATION,
    SHAPE,
    SIZE,
    DENSITY,
    DENSITY_VARIATIONS,
    CT_VALUE,
    SURFACE,
    RELATIONSHIP,
    SPECIFIC,
)
OPTIONAL_FIELDS = (CAVITY,)

# What each network is conditioned on (design 4.2 and 4.4).
MASK_FIELDS = (ENHANCEMENT, LOCATION, SHAPE, SURFACE, RELATIONSHIP, SPECIFIC, CAVITY)
IMAGE_FIELDS = MASK_FIELDS + (DENSITY, DENSITY_VARIATIONS, CT_VALUE)

CAVITY_LUMEN = "within the lumen of a hollow organ"
CAVITY_WALL = "wall thickening"
CAVITY_WITHIN = "within the parenchymal organ"
CAVITY_PROTRUDING = "protruding from the parenchymal organ"
CAVITY_CLASSES = (CAVITY_LUMEN, CAVITY_WALL, CAVITY_WITHIN, CAVITY_PROTRUDING)

# Short forms users type in requests ("density": "hypodense") that the original's table lacks.
EXTRA_SYNONYMS = {
    DENSITY: {
        "hypodense lesion": ("hypodense", "low density", "low-density", "hypoattenuating"),
        "isodense lesion": ("isodense", "isoattenuating"),
        "hyperdense lesion": ("hyperdense", "high density", "high-density", "hyperattenuating"),
        "mixed-density lesion": ("mixed density", "mixed-density", "mixed attenuation"),
        "hypoattenuating fluid-like lesion": ("fluid-like", "fluid-like lesion", "fluid density"),
    },
    DENSITY_VARIATIONS: {"homogeneous": ("uniform",), "heterogeneous": ("inhomogeneous", "non-uniform")},
}


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" ,")


@lru_cache(maxsize=1)
def synonym_table() -> dict[str, list[list[str]]]:
    """Field -> list of classes, each a list of synonyms (first = canonical), normalised."""
    raw = json.loads(resources.files("lesiondiffusion").joinpath("resources/description.json").read_text("utf-8"))
    table = {field: [[_norm(s) for s in cls] for cls in classes] for field, classes in raw.items()}
    table[CAVITY] = [[c] for c in CAVITY_CLASSES]
    for field, extra in EXTRA_SYNONYMS.items():
        for cls in table[field]:
            cls.extend(_norm(s) for s in extra.get(cls[0], ()) if _norm(s) not in cls)
    return table


def classes(field: str) -> tuple[str, ...]:
    """Canonical class names of a categorical ``field`` (empty for free fields such as size)."""
    return tuple(cls[0] for cls in synonym_table().get(field, []))


def is_categorical(field: str) -> bool:
    """True when ``field`` takes values from a class list."""
    return field in synonym_table()


@cache
def _matchers(field: str) -> list[tuple[str, str]]:
    pairs = [(syn, cls[0]) for cls in synonym_table()[field] for syn in cls]
    return sorted(pairs, key=lambda p: -len(p[0]))


def parse_classes(field: str, text: str) -> tuple[list[str], list[str]]:
    """Split a report value into (canonical classes, unrecognised pieces), in text order."""
    s = _norm(text)
    found: list[str] = []
    unknown: list[str] = []
    i = 0
    while i < len(s):
        if s[i] in " ,":
            i += 1
            continue
        for syn, canonical in _matchers(field):
            end = i + len(syn)
            if s.startswith(syn, i) and (end == len(s) or s[end] in " ,"):
                if canonical not in found:
                    found.append(canonical)
                i = end
                break
        else:
            end = s.find(",", i)
            end = len(s) if end < 0 else end
            unknown.append(s[i:end].strip())
            i = end
    return found, unknown


def format_classes(values: list[str]) -> str:
    """Write classes back in the original's style: each followed by a comma ("a,b,")."""
    return "".join(f"{v}," for v in values)
