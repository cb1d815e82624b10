"""A lesion described in one sentence -> request attributes ("a 25 mm hypodense, well-defined cyst in the liver").

:func:`read_description` is the offline reader: no model, no network. It tokenises the sentence, matches
the longest known phrase at each word (the report vocabulary of :mod:`lesiondiffusion.vocabulary` with
its synonyms, clinical words, TotalSegmentator organ names through :mod:`lesiondiffusion.labels`), reads
sizes ("2.5 cm", "25 x 18 mm", "3 cm x 2 cm x 2 cm") and CT values ("about 40 HU"), and honours negations
("no calcification", "without necrosis": read, but they set nothing). It returns a :class:`TextReading`:
the request attributes (``organ type``, ``lesion type`` and every report field the sentence fixes), what
each group of words was read as, and the words it did not use.

A sentence that names no organ, names two (``in the liver and the spleen``), or says two things that
exclude each other (``a hypodense hyperdense cyst``) is a :class:`TextError` naming the words.

An OpenAI-compatible model can read the sentence instead (``lesiondiffusion.reports.providers``):
it answers in the JSON schema of :func:`answer_schema`, and :func:`reading_from_answer` turns that
answer into the same attributes, so both readers write requests the same way.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import (
    ENHANCED,
    LESION_TYPE,
    NON_CONTRAST,
    ORGAN_TYPE,
    allowed_cavities,
    lesion_kind,
    margin_text,
)
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import VERSIONS, UnknownOrganError, label_table, normalize_name
from lesiondiffusion.report import format_ct_value

logger = logging.getLogger(__name__)

# Requests name organs in the v1 numbering (the reports' keys; preprocess converts v2 organ maps).
REQUEST_VERSION = "v1"
DEFAULT_LESION_TYPE = "lesion"
# A 2D size ("25 x 18 mm", the two axial diameters) gets the smaller of the two as its third axis:
# the craniocaudal extent was not given, and the smaller guess never makes the lesion outgrow its organ.
MAX_SIZE_MM = 400.0  # larger than any organ: a typo, not a lesion
HU_RANGE = (-1024.0, 3071.0)

# fields the reader fills besides organ and lesion type
SURFACE_WELL = "well-defined"
SURFACE_ILL = "ill-defined"


class TextError(LesionDiffusionError):
    """A sentence that cannot be read as one lesion; the message names the words."""


@dataclass(frozen=True)
class Understood:
    """One group of words and what it was read as (``negated``: read, but it sets nothing)."""

    words: str
    field: str
    value: str
    negated: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"words": self.words, "field": self.field, "value": self.value}
        if self.negated:
            out["negated"] = True
        return out


@dataclass(frozen=True)
class TextReading:
    """What a sentence says: request attributes, which words gave them, which words were not used."""

    text: str
    attributes: dict[str, str]
    understood: tuple[Understood, ...] = ()
    unused: tuple[str, ...] = ()
    reader: str = "offline"

    def to_json(self) -> dict[str, Any]:
        """The reading as recorded in provenance."""
        return {
            "text": self.text,
            "reader": self.reader,
            "attributes": dict(self.attributes),
            "understood": [u.to_json() for u in self.understood],
            "unused_words": list(self.unused),
        }

    def summary(self) -> str:
        """One line: each field with the words that set it, what was negated, and the unused words."""
        parts = []
        for name, value in self.attributes.items():
            words = [u.words for u in self.understood if u.field == name and not u.negated]
            said = f" ({', '.join(repr(w) for w in words)})" if words else ""
            parts.append(f"{name} = {value.rstrip(',')}{said}")
        negated = [u.words for u in self.understood if u.negated]
        if negated:
            parts.append("negated, not set: " + ", ".join(repr(w) for w in negated))
        if self.unused:
            parts.append("unused words: " + ", ".join(repr(w) for w in self.unused))
        return f"{self.reader} reading: " + "; ".join(parts)


# ---- lexicon ---------------------------------------------------------------------------------------------
# Kinds of lexicon entries. ``field`` entries set a report field; the others are resolved at the end.
_ORGAN, _LESION, _FIELD, _SURFACE, _NEGATION, _NEIGHBOUR, _CALC = (
    "organ",
    "lesion",
    "field",
    "surface",
    "negation",
    "neighbour",
    "calc",
)


@dataclass(frozen=True)
class _Entry:
    kind: str
    field: str = ""
    value: str = ""
    ids: frozenset[int] = frozenset()  # organs: the v1 ids the words denote
    problem: str = ""  # organs: why the words cannot be a request's organ

    @property
    def negatable(self) -> bool:
        return self.kind in (_FIELD, _SURFACE, _CALC, _LESION, _ORGAN)


_HYPO, _ISO, _HYPER = "hypodense lesion", "isodense lesion", "hyperdense lesion"
_MIXED, _FLUID, _RING = "mixed-density lesion", "hypoattenuating fluid-like lesion", "ring enhancement"
_GGO, _SOLID, _PART_SOLID = (
    "low-density ground-glass opacity",
    "isodense soft tissue mass",
    "isodense soft tissue mass with peripheral low-density ground-glass opacity",
)
_INC, _DEC = "presence of increased density areas", "presence of decreased density areas"
_CLOSE, _NOT_CLOSE = "close relationship with adjacent organs", "no close relationship with surrounding organs"

# words beyond the vocabulary's own synonyms, per field and class
_FIELD_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    V.DENSITY: {
        _HYPO: (
            "hypodense",
            "hypodensity",
            "hypoattenuating",
            "hypoattenuation",
            "low attenuation",
            "low density",
            "hypo dense",
        ),
        _ISO: ("isodense", "isoattenuating", "isoattenuation", "iso dense"),
        _HYPER: (
            "hyperdense",
            "hyperdensity",
            "hyperattenuating",
            "hyperattenuation",
            "high attenuation",
            "high density",
            "hyper dense",
        ),
        _MIXED: ("mixed density", "mixed attenuation", "mixed"),
        _FLUID: (
            "fluid like",
            "fluid density",
            "fluid attenuation",
            "water density",
            "water attenuation",
            "near water density",
        ),
        _RING: (
            "ring enhancing",
            "rim enhancing",
            "rim enhancement",
            "peripheral enhancement",
            "peripherally enhancing",
        ),
        _GGO: ("ground glass", "ground glass opacity", "ggo"),
        _SOLID: ("soft tissue density", "soft tissue attenuation"),
        _PART_SOLID: ("part solid", "partly solid", "subsolid"),
    },
    V.DENSITY_VARIATIONS: {
        "homogeneous": ("homogeneous", "homogenous", "homogeneously", "uniform", "uniformly"),
        "heterogeneous": (
            "heterogeneous",
            "heterogenous",
            "heterogeneously",
            "inhomogeneous",
            "non uniform",
            "nonuniform",
        ),
    },
    V.SHAPE: {
        "round-like": (
            "round",
            "rounded",
            "round like",
            "roundish",
            "spherical",
            "oval",
            "ovoid",
            "oval shaped",
            "round shaped",
            "elliptical",
        ),
        "irregular": (
            "irregular",
            "irregularly shaped",
            "irregular shape",
            "lobulated",
            "lobular",
            "multilobulated",
            "polylobulated",
        ),
        "punctate": ("punctate", "nodular", "dot like", "pinpoint"),
        "cystic": ("cystic",),
        "luminal narrowing": ("luminal narrowing", "narrowing of the lumen", "narrowing the lumen", "stenosing"),
    },
    V.SPECIFIC: {
        _DEC: (
            "necrosis",
            "necrotic",
            "necrotic areas",
            "necrotic centre",
            "necrotic center",
            "central necrosis",
            "cystic degeneration",
            "cystic change",
            "cystic changes",
        ),
        _INC: (
            "calcified",
            "calcific",
            "calcific foci",
            "calcified foci",
            "haemorrhage",
            "hemorrhage",
            "haemorrhagic",
            "hemorrhagic",
            "bleeding",
        ),
        "spiculated margins": (
            "spiculated",
            "spiculation",
            "spiculations",
            "spiculated margin",
            "spiculated margins",
            "spiculated borders",
        ),
    },
    V.RELATIONSHIP: {
        _NOT_CLOSE: (
            "separate from adjacent organs",
            "separate from surrounding organs",
            "isolated",
            "no contact with adjacent organs",
        ),
    },
    V.ENHANCEMENT: {
        V.classes(V.ENHANCEMENT)[0]: (
            "enhanced ct",
            "contrast enhanced",
            "contrast enhanced ct",
            "post contrast",
            "portal venous phase",
            "venous phase",
            "arterial phase",
            "with contrast",
        ),
        V.classes(V.ENHANCEMENT)[1]: (
            "non contrast",
            "non contrast ct",
            "noncontrast",
            "unenhanced",
            "unenhanced ct",
            "non enhanced ct",
            "plain ct",
            "without contrast",
            "native ct",
        ),
    },
    V.CAVITY: {
        V.CAVITY_LUMEN: ("intraluminal", "within the lumen", "in the lumen", "into the lumen"),
        V.CAVITY_WALL: ("mural", "intramural", "in the wall"),
        V.CAVITY_WITHIN: ("intraparenchymal", "within the parenchyma", "parenchymal", "in the parenchyma"),
        V.CAVITY_PROTRUDING: ("exophytic", "protruding", "protruding from", "bulging", "exophytically"),
    },
}
# phrases that set two fields at once: (field, class) pairs
_COMPOUND: dict[str, tuple[tuple[str, str], ...]] = {
    "protrusion into the lumen": ((V.SHAPE, "protrusion into the lumen"), (V.CAVITY, V.CAVITY_LUMEN)),
    "protruding into the lumen": ((V.SHAPE, "protrusion into the lumen"), (V.CAVITY, V.CAVITY_LUMEN)),
    "polypoid": ((V.SHAPE, "protrusion into the lumen"), (V.CAVITY, V.CAVITY_LUMEN)),
    "wall thickening": ((V.SHAPE, "irregular wall thickening"), (V.CAVITY, V.CAVITY_WALL)),
    "irregular wall thickening": ((V.SHAPE, "irregular wall thickening"), (V.CAVITY, V.CAVITY_WALL)),
    "thickened wall": ((V.SHAPE, "irregular wall thickening"), (V.CAVITY, V.CAVITY_WALL)),
    "wall thickened": ((V.SHAPE, "irregular wall thickening"), (V.CAVITY, V.CAVITY_WALL)),
    "mural thickening": ((V.SHAPE, "irregular wall thickening"), (V.CAVITY, V.CAVITY_WALL)),
}
_SURFACE_WORDS = {
    SURFACE_WELL: (
        "well defined",
        "well circumscribed",
        "circumscribed",
        "well marginated",
        "well delineated",
        "sharply defined",
        "sharply demarcated",
        "sharply marginated",
        "sharp",
        "sharp margin",
        "sharp margins",
        "sharp borders",
        "clear margin",
        "clear margins",
        "clearly defined",
        "smooth",
        "smooth margin",
        "smooth margins",
        "smooth borders",
        "distinct",
        "clear boundary",
    ),
    SURFACE_ILL: (
        "ill defined",
        "poorly defined",
        "poorly circumscribed",
        "poorly marginated",
        "blurred",
        "blurry",
        "blurred margin",
        "blurred margins",
        "indistinct",
        "unclear",
        "unclear margin",
        "unclear margins",
        "unclear boundary",
        "infiltrative",
        "infiltrating",
        "irregular margin",
        "irregular margins",
        "irregular borders",
        "fuzzy",
        "vague",
        "ill circumscribed",
    ),
}
# words that put the organ named after them beside the lesion, not around it
_NEIGHBOUR_WORDS = (
    "abutting",
    "abuts",
    "adjacent to",
    "close to",
    "next to",
    "in contact with",
    "contacting",
    "touching",
    "invading",
    "invades",
    "encasing",
    "compressing",
    "displacing",
    "indenting",
)
_NEGATIONS = (
    "no",
    "not",
    "without",
    "absent",
    "absence of",
    "free of",
    "negative for",
    "lacking",
    "lack of",
    "non",
    "nor",
    "neither",
)
# lesion nouns: each must be a kind :func:`lesiondiffusion.attributes.lesion_kind` knows (tested)
LESION_WORDS: dict[str, tuple[str, ...]] = {
    "cyst": ("cyst", "cysts", "pseudocyst", "cystic lesion"),
    "tumour": ("tumour", "tumours"),
    "tumor": ("tumor", "tumors"),
    "mass": ("mass", "masses", "neoplasm", "neoplasms"),
    "nodule": ("nodule", "nodules", "granuloma"),
    "metastasis": ("metastasis", "metastases", "metastatic lesion", "metastatic deposit", "secondaries", "mets"),
    "hemangioma": ("hemangioma", "hemangiomas", "angioma"),
    "haemangioma": ("haemangioma", "haemangiomas"),
    "abscess": ("abscess", "abscesses", "infected collection"),
    "stone": ("stone", "stones", "calculus", "calculi"),
    "carcinoma": ("carcinoma", "cancer", "malignancy"),
    "hepatocellular carcinoma": ("hepatocellular carcinoma", "hcc"),
    "adenoma": ("adenoma",),
    "lymphoma": ("lymphoma",),
    "sarcoma": ("sarcoma",),
    "polyp": ("polyp", "polyps", "papilloma"),
    "lesion": ("lesion", "lesions", "focal lesion", "focus", "area"),
}
_CALCIFICATION = ("calcification", "calcifications")
# clinical words for organs -> a name the label tables resolve (sides and lobes are added below)
ORGAN_WORDS: dict[str, str] = {
    "liver": "liver",
    "hepatic": "liver",
    "spleen": "spleen",
    "splenic": "spleen",
    "pancreas": "pancreas",
    "pancreatic": "pancreas",
    "kidney": "kidney",
    "kidneys": "kidney",
    "renal": "kidney",
    "gallbladder": "gallbladder",
    "gall bladder": "gallbladder",
    "bladder": "urinary bladder",
    "urinary bladder": "urinary bladder",
    "vesical": "urinary bladder",
    "stomach": "stomach",
    "gastric": "stomach",
    "colon": "colon",
    "colonic": "colon",
    "large bowel": "colon",
    "large intestine": "colon",
    "small bowel": "small bowel",
    "small intestine": "small bowel",
    "duodenum": "duodenum",
    "duodenal": "duodenum",
    "oesophagus": "esophagus",
    "esophagus": "esophagus",
    "oesophageal": "esophagus",
    "esophageal": "esophagus",
    "adrenal": "adrenal gland",
    "adrenal gland": "adrenal gland",
    "suprarenal": "adrenal gland",
    "lung": "lung",
    "lungs": "lung",
    "pulmonary": "lung",
    "thyroid": "thyroid gland",
    "prostate": "prostate",
    "prostatic": "prostate",
}
_SIDED = {
    "kidney": "kidney",
    "renal": "kidney",
    "adrenal": "adrenal gland",
    "adrenal gland": "adrenal gland",
    "lung": "lung",
    "pulmonary": "lung",
}
_LOBE_LEVELS = {"upper": "upper", "superior": "upper", "middle": "middle", "lower": "lower", "inferior": "lower"}
_LOBE_ABBREVIATIONS = {
    "rul": "lung upper lobe right",
    "rml": "lung middle lobe right",
    "rll": "lung lower lobe right",
    "lul": "lung upper lobe left",
    "lll": "lung lower lobe left",
}
_ARTICLES = frozenset({"a", "an", "the"})
# words that carry no attribute: never reported as unused
_STOPWORDS = frozenset(
    "a an the in of with and or at on is are was were be to within which that there seen noted shows showing demonstrating "
    "located measuring measures measured size sized diameter approximately about around roughly circa ca approx mean density "
    "attenuation value ct its it has having this one single small large big tiny lesion's by from into for as mm cm x adjacent "
    "surrounding organ organs structures".split()
)
_NUMBER_RE = r"(?<![\w)])[-\u2212]\d+(?:\.\d+)?|\d+(?:\.\d+)?"
_TOKEN_RE = re.compile(rf"{_NUMBER_RE}|[^\W\d_]+|[\u00d7*~]|[,;.:()!?]")
_UNITS = {
    "mm": 1.0,
    "millimetre": 1.0,
    "millimetres": 1.0,
    "millimeter": 1.0,
    "millimeters": 1.0,
    "cm": 10.0,
    "centimetre": 10.0,
    "centimetres": 10.0,
    "centimeter": 10.0,
    "centimeters": 10.0,
}
_SIZE_SEPARATORS = frozenset({"x", "\u00d7", "*", "by"})
_CLAUSE_BREAKS = frozenset({",", ";", ".", ":", "(", ")", "!", "?", "but", "with", "however", "whereas"})


def _phrase(text: str) -> tuple[str, ...]:
    """A phrase as the token words it matches (articles dropped, hyphens and commas as spaces)."""
    return tuple(
        t for t in (m.group(0).lower() for m in _TOKEN_RE.finditer(text)) if t not in _ARTICLES and t not in ",;.:()"
    )


def _organ_entry(name: str) -> _Entry:
    """The v1 organs ``name`` denotes (through the label tables' own lookup), or why it names none."""
    try:
        ids = label_table(REQUEST_VERSION).ids(name)
        return _Entry(_ORGAN, ORGAN_TYPE, name, frozenset(ids))
    except UnknownOrganError:
        return _Entry(
            _ORGAN, ORGAN_TYPE, name, problem=f"the {name} has no TotalSegmentator v1 label, and requests use v1 organs"
        )


@lru_cache(maxsize=1)
def _lexicon() -> dict[tuple[str, ...], tuple[_Entry, ...]]:
    """Phrase -> what it means; built once from the vocabulary, the label tables and the word lists above."""
    lex: dict[tuple[str, ...], list[_Entry]] = {}

    def add(text: str, *entries: _Entry) -> None:
        key = _phrase(text)
        if key:
            bucket = lex.setdefault(key, [])
            bucket.extend(e for e in entries if e not in bucket)

    # organs first: later vocabulary phrases that contain an organ word ("clear boundary with the renal
    # parenchyma") are longer, so they win where they occur
    for version in VERSIONS:
        table = label_table(version)
        for name in list(table.names.values()) + list(table.synonyms):
            add(name, _organ_entry(name))
    for word, name in ORGAN_WORDS.items():
        add(word, _organ_entry(name))
    for word, base in _SIDED.items():
        for side in ("left", "right"):
            entry = _organ_entry(f"{base} {side}")
            add(f"{side} {word}", entry)
            add(f"{word} {side}", entry)
    for level_word, level in _LOBE_LEVELS.items():
        add(f"{level_word} lobe", _organ_entry(f"lung {level} lobe"))
        for side in ("left", "right"):
            entry = _organ_entry(f"lung {level} lobe {side}")
            for form in (
                f"{side} {level_word} lobe",
                f"{level_word} lobe of {side} lung",
                f"{side} lung {level_word} lobe",
                f"{level_word} {side} lobe",
                f"{level_word} lobe of the {side} lung",
            ):
                add(form, entry)
    for abbreviation, name in _LOBE_ABBREVIATIONS.items():
        add(abbreviation, _organ_entry(name))

    table = V.synonym_table()
    for name in (V.DENSITY, V.DENSITY_VARIATIONS, V.SHAPE, V.SPECIFIC, V.RELATIONSHIP, V.ENHANCEMENT):
        for cls in table[name]:
            for syn in cls:
                add(syn, _Entry(_FIELD, name, cls[0]))
    for name, classes in _FIELD_WORDS.items():
        for cls, words in classes.items():
            for word in words:
                add(word, _Entry(_FIELD, name, cls))
    for cls in table[V.SURFACE]:
        well = cls[0].startswith(("well", "clear"))
        for syn in cls:
            add(syn, _Entry(_SURFACE, V.SURFACE, SURFACE_WELL if well else SURFACE_ILL))
    for value, words in _SURFACE_WORDS.items():
        for word in words:
            add(word, _Entry(_SURFACE, V.SURFACE, value))
    for text, pairs in _COMPOUND.items():
        lex.pop(_phrase(text), None)  # the pair replaces a single-field meaning
        add(text, *(_Entry(_FIELD, name, cls) for name, cls in pairs))
    for word in _NEIGHBOUR_WORDS:
        add(word, _Entry(_NEIGHBOUR, V.RELATIONSHIP, _CLOSE))
    for lesion, words in LESION_WORDS.items():
        for word in words:
            lex.pop(_phrase(word), None)  # "stone" is a lesion where it is a noun; see _CALC for features
            add(word, _Entry(_LESION, LESION_TYPE, lesion))
    for word in _CALCIFICATION:
        add(word, _Entry(_CALC, V.SPECIFIC, _INC))
    for word in _NEGATIONS:
        lex.pop(_phrase(word), None)
        add(word, _Entry(_NEGATION))
    return {k: tuple(v) for k, v in lex.items()}


@lru_cache(maxsize=1)
def _longest_phrase() -> int:
    return max(len(k) for k in _lexicon())


# ---- reading ---------------------------------------------------------------------------------------------
@dataclass
class _Token:
    text: str  # lower case
    start: int
    end: int


@dataclass
class _Span:
    """Matched words: tokens [first, last] of the article-free token list, and what they mean."""

    first: int
    last: int
    words: str
    entries: tuple[_Entry, ...] = ()
    size_mm: tuple[float, ...] | None = None
    hu: float | None = None
    negated: bool = False
    neighbour: bool = False


@dataclass
class _Found:
    """Values collected per field, each with the words that gave it."""

    values: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, name: str, value: str, words: str) -> None:
        self.values.setdefault(name, []).append((value, words))

    def get(self, name: str) -> list[tuple[str, str]]:
        return self.values.get(name, [])


def _tokens(text: str) -> list[_Token]:
    return [_Token(m.group(0).lower().replace("\u2212", "-"), m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?\d+(?:\.\d+)?", text))


def _measurement(tokens: list[_Token], i: int) -> tuple[int, tuple[float, ...] | None, float | None] | None:
    """At a number: ``(last token, size in mm, None)``, ``(last token, None, HU)``, or None."""
    words = [t.text for t in tokens]
    if i + 1 < len(words) and words[i + 1] == "hu":
        return i + 1, None, float(words[i])
    if i + 2 < len(words) and words[i + 1] == "hounsfield" and words[i + 2] in ("unit", "units"):
        return i + 2, None, float(words[i])
    dims: list[tuple[float, str | None]] = []
    j = i
    while True:
        if j >= len(words) or not _is_number(words[j]) or words[j].startswith("-"):
            return None
        value, unit, j = float(words[j]), None, j + 1
        if j < len(words) and words[j] in _UNITS:
            unit, j = words[j], j + 1
        dims.append((value, unit))
        if len(dims) < 3 and j + 1 < len(words) and words[j] in _SIZE_SEPARATORS and _is_number(words[j + 1]):
            j += 1
            continue
        break
    if dims[-1][1] is None:
        return None  # a bare number ("segment 7") is no size
    mm, unit = [], dims[-1][1]
    for value, own in reversed(dims):  # a number without a unit takes the unit after it
        unit = own or unit
        mm.append(value * _UNITS[unit])
    return j - 1, tuple(reversed(mm)), None


def _match(sentence: str, tokens: list[_Token]) -> list[_Span]:
    """Longest known phrase (or measurement) at each word, left to right."""
    lex, longest = _lexicon(), _longest_phrase()
    words = [t.text for t in tokens]
    spans, i = [], 0
    while i < len(tokens):
        if words[i] in _ARTICLES:
            i += 1
            continue
        found = None
        if _is_number(words[i]):
            hit = _measurement(tokens, i)
            if hit is not None:
                last, size, hu = hit
                found = _Span(i, last, "", size_mm=size, hu=hu)
        if found is None:
            # phrases skip articles: "lower lobe of the left lung" == "lower lobe of left lung"
            key: list[str] = []
            j = i
            best = None
            while j < len(tokens) and len(key) < longest:
                if words[j] in _ARTICLES and key:
                    j += 1
                    continue
                if words[j] in ",;.:()":
                    break
                key.append(words[j])
                if tuple(key) in lex:
                    best = (j, lex[tuple(key)])
                j += 1
            if best is not None:
                found = _Span(i, best[0], "", entries=best[1])
        if found is None:
            i += 1
            continue
        found.words = sentence[tokens[found.first].start : tokens[found.last].end]
        spans.append(found)
        i = found.last + 1
    return spans


def _scope(tokens: list[_Token], spans: list[_Span]) -> None:
    """Mark what negations and neighbour words ("abutting the stomach") apply to.

    A negation covers the next described thing and the ones joined to it that set the same field
    ("without necrosis or calcification"); it ends at punctuation, "but", "with", a thing of another
    field, or after four unread words ("non" covers only the word it is joined to). Before a neighbour
    word it flips the relationship ("not abutting"). A neighbour word marks the organs that follow it.
    """
    words = [t.text for t in tokens]
    for k, span in enumerate(spans):
        kinds = {e.kind for e in span.entries}
        if _NEGATION not in kinds and _NEIGHBOUR not in kinds:
            continue
        negation = _NEGATION in kinds
        prefix = negation and words[span.last] == "non"
        previous_fields: set[str] | None = None
        last = span.last
        for nxt in spans[k + 1 :]:
            gap = words[last + 1 : nxt.first]
            if prefix and gap:
                break
            if (
                any(w in _CLAUSE_BREAKS for w in gap)
                or len([w for w in gap if w not in _STOPWORDS and w not in ("or", "nor")]) > 4
            ):
                break
            nxt_kinds = {e.kind for e in nxt.entries}
            if not nxt.entries or _NEGATION in nxt_kinds:
                break
            fields = {e.field for e in nxt.entries}
            if negation:
                if _NEIGHBOUR in nxt_kinds:  # "not abutting the stomach": the neighbour word does the rest
                    nxt.negated = previous_fields is None
                    break
                if not all(e.negatable for e in nxt.entries) or (
                    previous_fields is not None and not fields & previous_fields
                ):
                    break
                nxt.negated = True
            else:
                if _ORGAN not in nxt_kinds:
                    break
                nxt.neighbour = True
            previous_fields, last = fields, nxt.last
            if prefix:
                break


def _one(found: _Found, name: str, compatible: Mapping[frozenset[str], str] | None = None) -> tuple[str, str] | None:
    """The single value of a one-valued field; two that exclude each other are an error naming the words."""
    pairs = found.get(name)
    if not pairs:
        return None
    value, words = pairs[0]
    for other, other_words in pairs[1:]:
        if other == value:
            continue
        merged = (compatible or {}).get(frozenset((value, other)))
        if merged is None:
            raise TextError(f"{words!r} and {other_words!r} contradict each other ({name}: {value} / {other})")
        value, words = merged, words if merged == value else other_words
    return value, words


def read_description(text: str, *, require_organ: bool = True) -> TextReading:
    """Read one sentence describing one lesion into request attributes (see the module docstring).

    ``require_organ``: a sentence that names no organ is an error (pass False when the organ is given
    another way). Raises :class:`TextError` naming the words it cannot reconcile.
    """
    sentence = " ".join(str(text or "").split())
    if not sentence:
        raise TextError("the description is empty")
    tokens = _tokens(sentence)
    spans = _match(sentence, tokens)
    _scope(tokens, spans)

    notes: list[Understood] = []  # negated words and neighbour organs: read, but they set no field
    found = _Found()
    organs: list[_Span] = []
    lesions: list[tuple[str, str]] = []
    calcifications: list[str] = []
    sizes: list[tuple[tuple[float, ...], str]] = []
    hus: list[tuple[float, str]] = []
    for span in spans:
        if span.size_mm is not None:
            sizes.append((span.size_mm, span.words))
        elif span.hu is not None:
            hus.append((span.hu, span.words))
        for e in span.entries:
            if e.kind == _NEGATION:
                continue
            if span.negated:
                flipped = _flip(e)
                if flipped is None:
                    notes.append(Understood(span.words, e.field, e.value, negated=True))
                    continue
                e = flipped
            if e.kind == _ORGAN and span.neighbour:
                notes.append(Understood(span.words, V.RELATIONSHIP, f"adjacent organ: {e.value}"))
            elif e.kind == _ORGAN:
                organs.append(span)
            elif e.kind == _LESION:
                lesions.append((e.value, span.words))
            elif e.kind == _CALC:
                calcifications.append(span.words)
            else:
                found.add(e.field, e.value, span.words)

    organ_name, organ_words = _host_organ(organs, require_organ)

    # lesion type: the specific noun ("lesion" gives way to it); nouns of two different kinds contradict.
    # Calcification is the lesion only when nothing else is; else bright areas inside the lesion.
    specific = [(v, w) for v, w in lesions if v != DEFAULT_LESION_TYPE]
    if calcifications and not lesions:
        specific = [("calcification", calcifications.pop(0))]
    for words in calcifications:
        found.add(V.SPECIFIC, _INC, words)
    lesion_type, lesion_words = (specific or lesions or [(DEFAULT_LESION_TYPE, "")])[0]
    for other, words in specific[1:]:
        if lesion_kind(other).name != lesion_kind(lesion_type).name:
            raise TextError(f"{lesion_words!r} and {words!r} name two different lesions; describe one lesion")

    one = {
        V.DENSITY: _one(found, V.DENSITY, _DENSITY_REFINES),
        V.DENSITY_VARIATIONS: _one(found, V.DENSITY_VARIATIONS),
        "margin": _one(found, V.SURFACE),
        V.RELATIONSHIP: _one(found, V.RELATIONSHIP),
        V.CAVITY: _one(found, V.CAVITY),
        V.ENHANCEMENT: _one(found, V.ENHANCEMENT),
        "size in mm": _single(sizes, "size"),
        "CT value in HU": _single(hus, "CT value"),
    }
    many = {V.SHAPE: _many(found, V.SHAPE), V.SPECIFIC: _many(found, V.SPECIFIC)}
    shapes = dict(many[V.SHAPE])
    irregular = [w for v, w in many[V.SHAPE] if v in ("irregular", "irregular wall thickening")]
    if "round-like" in shapes and irregular:
        raise TextError(
            f"{shapes['round-like']!r} and {irregular[0]!r} contradict each other (shape: round-like / irregular)"
        )

    fields: dict[str, Any] = {name: pair[0] for name, pair in one.items() if pair is not None}
    fields.update({name: [v for v, _ in pairs] for name, pairs in many.items() if pairs})
    attributes: dict[str, str] = {}
    if organ_name is not None:
        attributes[ORGAN_TYPE] = organ_name
    attributes[LESION_TYPE] = lesion_type
    attributes.update(_field_attributes(fields, organ_name))

    understood: list[Understood] = []
    if organ_name is not None:
        understood.append(Understood(organ_words, ORGAN_TYPE, organ_name))
    understood.append(Understood(lesion_words, LESION_TYPE, lesion_type))
    source = {V.SURFACE: "margin", V.SIZE: "size in mm", V.CT_VALUE: "CT value in HU"}
    for name, value in attributes.items():
        key = source.get(name, name)
        if key in many:
            understood.extend(Understood(w, name, v) for v, w in many[key])
        elif one.get(key) is not None:
            understood.append(Understood(one[key][1], name, value))  # type: ignore[index]
    used = {k for span in spans for k in range(span.first, span.last + 1)}
    unused = tuple(
        sentence[t.start : t.end]
        for k, t in enumerate(tokens)
        if k not in used and t.text not in _STOPWORDS and t.text not in _SIZE_SEPARATORS and t.text not in ",;.:()!?~*"
    )
    reading = TextReading(sentence, attributes, tuple(understood + notes), unused)
    logger.debug("%s", reading.summary())
    return reading


# a second density word that only makes the first more precise ("hypodense, fluid-like")
_DENSITY_REFINES = {
    frozenset((_HYPO, _FLUID)): _FLUID,
    frozenset((_HYPO, _RING)): _RING,
    frozenset((_SOLID, _PART_SOLID)): _PART_SOLID,
    frozenset((_GGO, _PART_SOLID)): _PART_SOLID,
}


def _flip(e: _Entry) -> _Entry | None:
    """The meaning of a negated two-valued field ("not well-defined" is ill-defined), else None."""
    if e.kind == _SURFACE:
        return _Entry(_SURFACE, V.SURFACE, SURFACE_ILL if e.value == SURFACE_WELL else SURFACE_WELL)
    if e.kind == _NEIGHBOUR or (e.kind == _FIELD and e.field == V.RELATIONSHIP):
        return _Entry(_FIELD, V.RELATIONSHIP, _NOT_CLOSE if e.value == _CLOSE else _CLOSE)
    return None


def _many(found: _Found, name: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for value, words in found.get(name):
        if value not in [v for v, _ in out]:
            out.append((value, words))
    return out


def _single(values: list[tuple[Any, str]], what: str) -> tuple[Any, str] | None:
    if not values:
        return None
    first, words = values[0]
    for other, other_words in values[1:]:
        if other != first:
            raise TextError(f"{words!r} and {other_words!r} give two different values ({what})")
    return first, words


def _host_organ(organs: list[_Span], require: bool) -> tuple[str | None, str]:
    """The one v1 organ every organ mention agrees on (``left lung`` + ``lower lobe`` -> the left lower lobe)."""
    if not organs:
        if require:
            raise TextError(
                "names no organ: say where the lesion is (e.g. 'in the liver', 'left kidney', 'right lower lobe')"
            )
        return None, ""
    ids: frozenset[int] | None = None
    first_words = organs[0].words
    for span in organs:
        entry = next(e for e in span.entries if e.kind == _ORGAN)
        if entry.problem:
            raise TextError(f"{span.words!r}: {entry.problem}")
        if ids is not None and not (ids & entry.ids):
            raise TextError(
                f"{first_words!r} and {span.words!r} name two different organs; describe one lesion in one organ"
            )
        ids = entry.ids if ids is None else ids & entry.ids
    assert ids is not None
    table = label_table(REQUEST_VERSION)
    words = " + ".join(dict.fromkeys(s.words for s in organs))
    if len(ids) > 1:
        choices = ", ".join(table.name(i) for i in sorted(ids))
        raise TextError(
            f"{words!r} names more than one organ ({choices}): say which one, e.g. 'left' or 'right', or the lobe"
        )
    return table.name(next(iter(ids))), words


def _field_attributes(fields: Mapping[str, Any], organ_name: str | None) -> dict[str, str]:
    """Report strings of the fields a reader found (see :func:`answer_schema` for the keys)."""
    out: dict[str, str] = {}
    if fields.get(V.DENSITY):
        out[V.DENSITY] = V.format_classes([fields[V.DENSITY]])
    if fields.get(V.DENSITY_VARIATIONS):
        out[V.DENSITY_VARIATIONS] = V.format_classes([fields[V.DENSITY_VARIATIONS]])
    if fields.get(V.SHAPE):
        out[V.SHAPE] = V.format_classes(list(fields[V.SHAPE]))
    if fields.get("margin"):
        well = fields["margin"] == SURFACE_WELL
        out[V.SURFACE] = (
            margin_text(organ_name, well) if organ_name else ("well-defined margin" if well else "ill-defined margin")
        ) + ","
    if fields.get(V.RELATIONSHIP):
        out[V.RELATIONSHIP] = V.format_classes([fields[V.RELATIONSHIP]])
    if fields.get(V.SPECIFIC):
        out[V.SPECIFIC] = V.format_classes(list(fields[V.SPECIFIC]))
    if fields.get(V.CAVITY):
        cavity = fields[V.CAVITY]
        if organ_name is not None and cavity not in allowed_cavities(organ_name):
            raise TextError(
                f"cavity {cavity!r} does not fit the {organ_name}; it admits {' or '.join(allowed_cavities(organ_name))}"
            )
        out[V.CAVITY] = cavity
    if fields.get(V.ENHANCEMENT):
        out[V.ENHANCEMENT] = ENHANCED if str(fields[V.ENHANCEMENT]).lower().startswith("enhanced") else NON_CONTRAST
    size = fields.get("size in mm")
    if size:
        mm = [float(v) for v in size]
        if any(v <= 0 or v > MAX_SIZE_MM for v in mm):
            raise TextError(
                f"size {' x '.join(f'{v:g}' for v in mm)} mm is not a lesion size (each axis above 0 and at most {MAX_SIZE_MM:g} mm)"
            )
        if len(mm) == 2:
            mm.append(min(mm))
        out[V.SIZE] = f"{mm[0]:g} mm" if len(mm) == 1 else " x ".join(f"{v:g}" for v in mm) + " mm"
    hu = fields.get("CT value in HU")
    if hu is not None and hu is not False:
        if not HU_RANGE[0] <= float(hu) <= HU_RANGE[1]:
            raise TextError(f"CT value {float(hu):g} HU is outside the CT range {HU_RANGE[0]:g}..{HU_RANGE[1]:g} HU")
        out[V.CT_VALUE] = format_ct_value(float(hu))
    return out


# ---- model readers ---------------------------------------------------------------------------------------
def _nullable_enum(values: Iterable[str]) -> dict[str, Any]:
    return {"type": ["string", "null"], "enum": [*values, None]}


def answer_schema() -> dict[str, Any]:
    """The JSON schema a model answers a sentence with: organ, lesion type, and each field or null.

    Categorical fields take the vocabulary's canonical classes; the organ one of the v1 organ names;
    ``margin`` is well- or ill-defined (worded for the organ afterwards); the size is 1-3 diameters
    in mm, the CT value a number of HU.
    """
    organ_names = sorted(set(label_table(REQUEST_VERSION).names.values()))
    props: dict[str, Any] = {
        ORGAN_TYPE: {"type": "string", "enum": organ_names},
        LESION_TYPE: {"type": "string", "minLength": 1, "maxLength": 80},
        V.DENSITY: _nullable_enum(V.classes(V.DENSITY)),
        V.DENSITY_VARIATIONS: _nullable_enum(V.classes(V.DENSITY_VARIATIONS)),
        V.SHAPE: {"type": "array", "items": {"type": "string", "enum": list(V.classes(V.SHAPE))}, "maxItems": 3},
        "margin": _nullable_enum((SURFACE_WELL, SURFACE_ILL)),
        V.RELATIONSHIP: _nullable_enum(V.classes(V.RELATIONSHIP)),
        V.SPECIFIC: {"type": "array", "items": {"type": "string", "enum": list(V.classes(V.SPECIFIC))}, "maxItems": 3},
        V.CAVITY: _nullable_enum(V.CAVITY_CLASSES),
        V.ENHANCEMENT: _nullable_enum((ENHANCED.rstrip(","), NON_CONTRAST.rstrip(","))),
        "size in mm": {
            "type": ["array", "null"],
            "items": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SIZE_MM},
            "minItems": 1,
            "maxItems": 3,
        },
        "CT value in HU": {"type": ["number", "null"], "minimum": HU_RANGE[0], "maximum": HU_RANGE[1]},
    }
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


ANSWER_INSTRUCTIONS = (
    "Read the radiologist's description of one lesion on a CT scan into the given JSON schema. Use only the "
    "listed values; give null (or an empty list) for everything the description does not say; a negated "
    "finding ('no calcification') is not a feature. 'size in mm' lists the diameters given, converted to mm."
)


def reading_from_answer(text: str, answer: Mapping[str, Any], reader: str) -> TextReading:
    """A schema-valid model answer (:func:`answer_schema`) as a :class:`TextReading` of ``text``.

    A lesion type the model wrote is kept as it wrote it; a cavity the organ does not admit is a
    :class:`TextError`. The model does not say which words gave what, so ``understood`` lists fields only.
    """
    organ_name = normalize_name(answer[ORGAN_TYPE])
    label_table(REQUEST_VERSION).id(organ_name)  # the schema's enum: always a single v1 organ
    attributes = {ORGAN_TYPE: organ_name, LESION_TYPE: " ".join(str(answer[LESION_TYPE]).split()).lower()}
    attributes.update(_field_attributes(answer, organ_name))
    understood = tuple(Understood("", name, value) for name, value in attributes.items())
    return TextReading(" ".join(str(text).split()), attributes, understood, (), reader)
