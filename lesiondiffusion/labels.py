"""TotalSegmentator label tables (v1: 104 classes, v2: 117 classes) and organ-name lookup.

Names are matched case- and separator-insensitively ("urinary_bladder" == "Urinary Bladder"), then
through the tables' synonym column and a few clinical aliases, then as a unique word match ("bladder").
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from lesiondiffusion.errors import LesionDiffusionError

VERSIONS = ("v1", "v2")
DEFAULT_VERSION = "v1"  # the original's numbering; type.json keys and demo organ maps use it

# Clinical words users write that the tables spell differently.
_ALIASES = {
    "bladder": "urinary bladder",
    "gall bladder": "gallbladder",
    "oesophagus": "esophagus",
    "large bowel": "colon",
    "large intestine": "colon",
    "small intestine": "small bowel",
    "bowel": "small bowel",
    "left kidney": "kidney left",
    "right kidney": "kidney right",
    "left adrenal gland": "adrenal gland left",
    "right adrenal gland": "adrenal gland right",
}

# Organs with a lumen: SPEC 4.1's hollow-organ placement rules apply to these.
HOLLOW_ORGANS = frozenset({"urinary bladder", "stomach", "colon", "esophagus", "gallbladder"})


class UnknownOrganError(LesionDiffusionError, KeyError):
    """An organ name or id that no table row matches; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def normalize_name(name: str) -> str:
    """Lower-case, separators (``_ - ,``, runs of spaces) folded to one space."""
    return " ".join(re.split(r"[\s_\-,]+", str(name).strip().lower())).strip()


@dataclass(frozen=True)
class LabelTable:
    """One TotalSegmentator numbering: ids <-> canonical names (normalised), with synonyms."""

    version: str
    names: dict[int, str]
    synonyms: dict[str, tuple[int, ...]]

    def name(self, label_id: int) -> str:
        """Canonical name of ``label_id`` (e.g. 104 -> "urinary bladder" in v1)."""
        try:
            return self.names[int(label_id)]
        except (KeyError, ValueError, TypeError):
            raise UnknownOrganError(f"label id {label_id!r} is not in the TotalSegmentator {self.version} table") from None

    def ids(self, name: str | int) -> tuple[int, ...]:
        """All ids a name denotes: one for an organ, several for a group word ("kidney", "lung")."""
        if isinstance(name, int) or str(name).strip().isdigit():
            label_id = int(name)
            self.name(label_id)
            return (label_id,)
        key = normalize_name(name)
        key = _ALIASES.get(key, key)
        by_name = {v: k for k, v in self.names.items()}
        if key in by_name:
            return (by_name[key],)
        if key in self.synonyms:
            return self.synonyms[key]
        words = set(key.split())
        group = tuple(i for i, n in self.names.items() if words and words <= set(n.split()))
        if group:
            return group
        close = difflib.get_close_matches(key, list(by_name) + list(self.synonyms) + list(_ALIASES), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UnknownOrganError(f"unknown organ name {name!r} in TotalSegmentator {self.version}{hint}")

    def id(self, name: str | int) -> int:
        """The single id of an organ; a group word or unknown name is an error naming the choices."""
        found = self.ids(name)
        if len(found) > 1:
            choices = ", ".join(self.names[i] for i in found)
            raise UnknownOrganError(f"organ name {name!r} is ambiguous in TotalSegmentator {self.version}: {choices}")
        return found[0]


def _read_table(version: str) -> LabelTable:
    text = resources.files("lesiondiffusion").joinpath(f"resources/totalseg_{version}.tsv").read_text("utf-8")
    names: dict[int, str] = {}
    synonyms: dict[str, tuple[int, ...]] = {}
    for row in text.splitlines():
        cells = row.split("\t")
        if not cells or not cells[0].strip():
            continue
        label_id, name = int(cells[0]), normalize_name(cells[1])
        names[label_id] = name
        if len(cells) > 2 and cells[2].strip():
            # a synonym shared by left/right rows ("hip bone") names the group
            syn = normalize_name(cells[2])
            synonyms[syn] = synonyms.get(syn, ()) + (label_id,)
    return LabelTable(version, names, synonyms)


@lru_cache(maxsize=None)
def label_table(version: str = DEFAULT_VERSION) -> LabelTable:
    """The label table of TotalSegmentator ``version`` ("v1" or "v2")."""
    if version not in VERSIONS:
        raise LesionDiffusionError(f"unknown TotalSegmentator version {version!r}; use one of {', '.join(VERSIONS)}")
    return _read_table(version)


def convert_ids(src: str = "v2", dst: str = "v1") -> dict[int, int]:
    """Map every id of ``src`` whose organ exists in ``dst`` to the ``dst`` id (by canonical name)."""
    a, b = label_table(src), label_table(dst)
    by_name = {n: i for i, n in b.names.items()}
    return {i: by_name[n] for i, n in a.names.items() if n in by_name}


def is_hollow(organ: str | int, version: str = DEFAULT_VERSION) -> bool:
    """True for organs with a lumen (bladder, stomach, colon, esophagus, gallbladder)."""
    table = label_table(version)
    return table.name(table.id(organ)) in HOLLOW_ORGANS
