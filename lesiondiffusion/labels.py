"""TotalSegmentator label tables (v1: 104 classes, v2: 117 classes) and organ-name lookup.

Names are matched case- and separator-insensitively ("urinary_bladder" == "Urinary Bladder"), then
through the tables' synonym column and a few clinical aliases, then as a unique word match ("bladder").
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from lesiondiffusion.errors import LesionDiffusionError

logger = logging.getLogger(__name__)

# the values of a lesion label map (label.nii.gz, the original's format): background, target organ, lesion
BACKGROUND_LABEL, ORGAN_LABEL, LESION_LABEL = 0, 1, 2

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

# Organs with a lumen: design 4.1's hollow-organ placement rules apply to these.
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
            raise UnknownOrganError(
                f"label id {label_id!r} is not in the TotalSegmentator {self.version} table"
            ) from None

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


@cache
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


def label_ids(labels: np.ndarray) -> np.ndarray:
    """An organ map's voxels as integers: an integer array as it is (no copy), a float one rounded to int32."""
    arr = np.asarray(labels)
    return arr if arr.dtype.kind in "iub" else np.rint(arr).astype(np.int32)


_COUNT_BLOCK = 1 << 22  # voxels per bincount call: a block that stays in cache


def present_ids(labels: np.ndarray) -> np.ndarray:
    """The sorted distinct ids of an organ map (0 included when present), counted rather than sorted."""
    ids = label_ids(labels)
    if ids.size and ids.dtype.kind in "iu" and ids.min() >= 0 and ids.max() < 1 << 16:
        # counted in blocks: bincount casts its input to int64, which for a whole CT is a slow 600 MB copy
        flat = ids.ravel(order="K")  # any order counts: no copy of the volume
        counts = np.zeros(int(ids.max()) + 1, dtype=np.int64)
        for start in range(0, flat.size, _COUNT_BLOCK):
            counts += np.bincount(flat[start : start + _COUNT_BLOCK], minlength=counts.size)
        return np.flatnonzero(counts)
    return np.unique(ids).astype(np.int64)


def mask_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(lo, hi)``: the first and last index per axis of the true (non-zero) voxels of ``mask``; None if none.

    Found from one projection per axis: on a whole CT this is tens of times faster than listing the voxels.
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        mask = mask != 0
    lo, hi = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        lo.append(hit[0])
        hi.append(hit[-1])
    return np.asarray(lo, dtype=int), np.asarray(hi, dtype=int)


def relabel(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """An organ map's ids through ``mapping`` (e.g. :func:`convert_ids`), uint8; unmapped ids become 0."""
    ids = label_ids(labels)
    lut = np.zeros(max(int(ids.max(initial=0)), max(mapping, default=0)) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[int(src)] = int(dst)
    return lut[np.clip(ids, 0, None)]


def to_v1_map(labels: np.ndarray, version: str) -> np.ndarray:
    """An organ map in ``version`` numbering as v1 ids (uint8); ids without a v1 organ become 0."""
    if version == "v1":
        return np.array(label_ids(labels), dtype=np.uint8)  # a copy, as relabel gives
    return relabel(labels, convert_ids(version, "v1"))


def is_hollow(organ: str | int, version: str = DEFAULT_VERSION) -> bool:
    """True for organs with a lumen (bladder, stomach, colon, esophagus, gallbladder)."""
    table = label_table(version)
    return table.name(table.id(organ)) in HOLLOW_ORGANS


# ---- which numbering an organ map uses ----------------------------------------------------------------
AUTO = "auto"
VERSION_CHOICES = (*VERSIONS, AUTO)

# Cranio-caudal level of each structure's centre, in vertebra steps from C1 (C1=1 ... T1=8 ... L1=20 ...
# S1=25): where anatomy puts it in every patient. Structures spanning many levels (aorta, colon, spinal
# cord, long muscles) are left out; a crop of the scan moves a long structure's centre, not a short one's.
_LEVELS: dict[str, float] = {
    "brain": -3, "skull": -3, "face": -2, "thyroid gland": 6, "trachea": 9, "common carotid artery": 5,
    "subclavian artery": 8, "brachiocephalic trunk": 9, "brachiocephalic vein": 8, "superior vena cava": 10.5,
    "clavicula": 8, "scapula": 11, "sternum": 13, "lung upper lobe": 11, "lung middle lobe right": 15,
    "lung lower lobe": 16, "heart": 15, "heart myocardium": 15, "heart atrium": 14, "heart ventricle": 16,
    "pulmonary artery": 12, "pulmonary vein": 14, "atrial appendage left": 13, "costal cartilages": 16,
    "liver": 19, "spleen": 19, "stomach": 19, "adrenal gland": 19, "portal vein and splenic vein": 20,
    "pancreas": 20.5, "gallbladder": 21, "kidney": 21.5, "kidney cyst": 21.5, "duodenum": 21.5,
    "small bowel": 23.5, "iliac artery": 25, "iliac vena": 25, "sacrum": 26, "hip": 26,
    "gluteus medius": 26, "gluteus minimus": 26.5, "gluteus maximus": 28, "urinary bladder": 29,
    "prostate": 30, "femur": 31,
}  # fmt: skip
_VERTEBRAE = {
    f"vertebrae {p}{i}": float(base + i)
    for p, base, n in (("c", 0, 7), ("t", 7, 12), ("l", 19, 5))
    for i in range(1, n + 1)
}
_VERTEBRAE["vertebrae s1"] = 25.0
_LEVEL_GAP = 3.0  # compare only structures at least this many vertebrae apart: their centres never swap
_MIN_VOLUME_MM3 = 100.0  # specks (a few stray voxels) say nothing about where an organ lies
_TOLERANCE_MM = 1.0


def _side(name: str) -> int:
    """+1 for a structure on the patient's right, -1 on the left, 0 for midline or unpaired ones."""
    words = name.split()
    return 1 if "right" in words else -1 if "left" in words else 0


def _level(name: str) -> float | None:
    if name in _VERTEBRAE:
        return _VERTEBRAE[name]
    match = re.fullmatch(r"rib (left|right) (\d+)", name)
    if match:  # ribs slope down from the spine: a rib's centre lies about two vertebrae below its own
        return 8.5 + int(match.group(2))
    base = " ".join(w for w in name.split() if w not in ("left", "right"))
    return _LEVELS.get(name, _LEVELS.get(base))


@dataclass(frozen=True)
class VersionEvidence:
    """How well a map's labels, read in one numbering, fit anatomy: relations that held and that failed."""

    version: str
    held: int
    failed: int

    @property
    def fits(self) -> bool:
        """Enough relations held and (almost) none failed."""
        return self.held >= 5 and self.failed <= max(1, 0.1 * (self.held + self.failed))

    @property
    def contradicted(self) -> bool:
        """Anatomy clearly disagrees with this reading."""
        return self.failed >= 3 and self.failed > 0.25 * (self.held + self.failed)

    def __add__(self, other: VersionEvidence) -> VersionEvidence:
        return VersionEvidence(self.version, self.held + other.held, self.failed + other.failed)


# CT density of a structure's voxels (median HU): (held above, held below, failed below, failed above).
_BONE_WORDS = {"vertebrae", "rib", "hip", "femur", "humerus", "scapula", "clavicula", "sacrum", "skull", "sternum"}
_AIR_WORDS = {"lung", "trachea"}
_SOFT_NAMES = {
    "liver", "spleen", "kidney right", "kidney left", "pancreas", "adrenal gland right", "adrenal gland left",
    "gallbladder", "urinary bladder", "prostate", "thyroid gland", "brain", "spinal cord", "heart", "heart myocardium",
}  # fmt: skip
_SOFT_WORDS = {"gluteus", "autochthon", "iliopsoas"}


def _density_class(name: str) -> str | None:
    words = set(name.split())
    if words & _BONE_WORDS:
        return "bone"
    if words & _AIR_WORDS:
        return "air"
    if name in _SOFT_NAMES or words & _SOFT_WORDS:
        return "soft"
    return None  # vessels (contrast), bowel (air, contrast), cartilage: no fixed density


def label_medians(labels: np.ndarray, image_hu: np.ndarray, min_voxels: int = 20) -> dict[int, float]:
    """Median CT value of every label with at least ``min_voxels`` voxels (``image_hu`` on the same grid)."""
    ids, hu = label_ids(labels), np.asarray(image_hu)
    # both read in the labels' memory order (a NIfTI volume, or a strided view of one, is Fortran-ordered):
    # no gather across memory; the medians do not depend on the order
    if ids.ndim > 1 and abs(ids.strides[0]) < abs(ids.strides[-1]):
        ids, hu = ids.T, hu.T
    flat, hu = ids.ravel(), hu.ravel()
    inside = np.flatnonzero(flat > 0)
    lab = flat[inside]
    # one stable (radix) sort by label instead of one pass over the volume per label: same medians
    sort = np.argsort(lab.astype(np.uint16) if lab.size and lab.max() < 1 << 16 else lab, kind="stable")
    lab, values = lab[sort], hu[inside[sort]]
    counts = np.bincount(lab) if lab.size else np.zeros(1, int)
    ends = np.cumsum(counts)
    return {
        int(i): float(np.median(values[ends[i] - counts[i] : ends[i]])) for i in np.nonzero(counts >= min_voxels)[0]
    }


def density_evidence(
    labels: np.ndarray, image_hu: np.ndarray, version: str, medians: dict[int, float] | None = None
) -> VersionEvidence:
    """Each label's median CT value against its organ's tissue in ``version``: bone bright, lung dark, organs
    soft. ``medians`` (:func:`label_medians` of the two) saves reading the volume again for another version."""
    medians = label_medians(labels, image_hu) if medians is None else medians
    table = label_table(version)
    held = failed = 0
    for i, median in medians.items():
        kind = _density_class(table.names.get(i, ""))
        if kind is None:
            continue
        if kind == "bone":
            ok, bad = median > 120, median < 60
        elif kind == "air":
            ok, bad = median < -400, median > -200
        else:
            ok, bad = -60 < median < 200, median < -300 or median > 350
        held, failed = held + int(ok), failed + int(bad)
    return VersionEvidence(version, held, failed)


SURVEY_STRIDE_ABOVE = 20_000_000  # voxels: a larger map's anatomy is surveyed at every other voxel


def _survey_step(labels: np.ndarray) -> int:
    """Voxel stride for surveying a map's anatomy: every other voxel of a full-body map gives the same
    centres and tissue medians at an eighth of the reads."""
    return 2 if np.size(labels) > SURVEY_STRIDE_ABOVE else 1


def label_centroids(labels: np.ndarray, affine: np.ndarray) -> dict[int, np.ndarray]:
    """World (RAS mm) centre of every label of ``labels`` whose volume is not a speck."""
    step = _survey_step(labels)
    ids = label_ids(np.asarray(labels)[::step, ::step, ::step])
    idx = np.nonzero(ids > 0)
    if idx[0].size == 0:
        return {}
    lab = ids[idx]
    counts = np.bincount(lab)
    scaled = np.asarray(affine, dtype=np.float64) @ np.diag([step, step, step, 1.0])
    voxel_mm3 = abs(float(np.linalg.det(scaled[:3, :3])))
    sums = [np.bincount(lab, weights=idx[a].astype(np.float64), minlength=counts.size) for a in range(3)]
    out = {}
    for i in np.nonzero(counts)[0]:
        if counts[i] * voxel_mm3 < _MIN_VOLUME_MM3:
            continue
        voxel = np.array([sums[a][i] / counts[i] for a in range(3)] + [1.0])
        out[int(i)] = (scaled @ voxel)[:3]
    return out


def anatomy_evidence(centroids: dict[int, np.ndarray], version: str) -> VersionEvidence:
    """Relations between label centres that anatomy fixes, checked with the labels read in ``version``.

    Left/right: every structure named "right" lies right (+x, RAS) of every one named "left".
    Head/feet: two structures whose usual levels are at least three vertebrae apart are ordered in z.
    """
    table = label_table(version)
    named = [(table.names[i], c) for i, c in centroids.items() if i in table.names]
    held = failed = 0
    for a, (name_a, ca) in enumerate(named):
        for name_b, cb in named[a + 1 :]:
            side = _side(name_a) - _side(name_b)
            if abs(side) == 2:  # one right, one left
                dx = (ca[0] - cb[0]) * side / 2
                if abs(dx) > _TOLERANCE_MM:
                    held, failed = held + int(dx > 0), failed + int(dx < 0)
            la, lb = _level(name_a), _level(name_b)
            if la is not None and lb is not None and abs(la - lb) >= _LEVEL_GAP:
                dz = (cb[2] - ca[2]) * np.sign(la - lb)  # a lower level number lies higher (+z)
                if abs(dz) > _TOLERANCE_MM:
                    held, failed = held + int(dz > 0), failed + int(dz < 0)
    return VersionEvidence(version, held, failed)


def detect_version(
    labels: np.ndarray, affine: np.ndarray, source: object = "organ map", image_hu: np.ndarray | None = None
) -> str:
    """The TotalSegmentator numbering ("v1" or "v2") of an organ map, from its labels and their anatomy.

    Labels above 104 exist only in v2. Otherwise each reading is checked against anatomy
    (:func:`anatomy_evidence`, and with the CT ``image_hu`` on the same grid :func:`density_evidence`);
    the one that fits while the other is contradicted wins. Labels that
    mean the same in both (1-6: spleen, kidneys, gallbladder, liver, stomach) need no choice. A map
    that fits both or neither is an :class:`~lesiondiffusion.errors.InputError` asking for the flag.
    """
    from lesiondiffusion.errors import InputError

    ids = present_ids(labels)
    ids = ids[ids != 0]
    ask = "set --organ_seg_version v1 or v2"
    if ids.size == 0:
        return "v1"  # no label to misread; whoever needs an organ reports its absence
    top = {v: max(label_table(v).names) for v in VERSIONS}
    if ids.min() < 0 or ids.max() > top["v2"]:
        bad = [int(i) for i in ids if i < 0 or i > top["v2"]][:5]
        raise InputError(source, f"labels {bad} are not TotalSegmentator ids (v1: 1-{top['v1']}, v2: 1-{top['v2']})")
    if ids.max() > top["v1"]:
        return "v2"
    v1, v2 = label_table("v1"), label_table("v2")
    if all(v1.names[i] == v2.names[i] for i in ids.tolist()):
        return "v1"  # the two numberings agree on every label present
    centroids = label_centroids(labels, affine)
    evidence = {v: anatomy_evidence(centroids, v) for v in VERSIONS}
    if image_hu is not None and np.shape(image_hu) == np.shape(labels):
        step = _survey_step(labels)
        survey = (slice(None, None, step),) * 3
        medians = label_medians(np.asarray(labels)[survey], np.asarray(image_hu)[survey])
        evidence = {v: e + density_evidence(labels, image_hu, v, medians) for v, e in evidence.items()}
    for mine, other in (("v1", "v2"), ("v2", "v1")):
        if evidence[mine].fits and evidence[other].contradicted:
            logger.info("%s: TotalSegmentator %s numbering (anatomy: %s)", source, mine, _summary(evidence))
            return mine
    raise InputError(
        source,
        f"cannot tell whether the organ map uses TotalSegmentator v1 or v2 numbering ({_summary(evidence)}); {ask}",
    )


def _summary(evidence: dict[str, VersionEvidence]) -> str:
    return ", ".join(f"{v}: {e.held} relations hold, {e.failed} fail" for v, e in evidence.items())


def resolve_version(
    requested: str | None,
    labels: np.ndarray,
    affine: np.ndarray,
    source: object = "organ map",
    image_hu: np.ndarray | None = None,
) -> str:
    """``requested`` ("v1", "v2") as is, or for "auto"/None the numbering :func:`detect_version` finds."""
    choice = AUTO if requested is None else str(requested).strip().lower()
    if choice not in VERSION_CHOICES:
        raise LesionDiffusionError(f"organ_seg_version must be one of {', '.join(VERSION_CHOICES)}, not {requested!r}")
    return detect_version(labels, affine, source, image_hu) if choice == AUTO else choice


def choose_version(requested: str | None, declared: str | None) -> str:
    """The numbering to read maps in: an explicit ``requested`` ("v1", "v2") wins, then what the dataset or
    requests file ``declared``, then "auto" (told per map by :func:`detect_version`)."""
    choice = AUTO if requested is None else str(requested).strip().lower()
    if choice not in VERSION_CHOICES:
        raise LesionDiffusionError(f"organ_seg_version must be one of {', '.join(VERSION_CHOICES)}, not {requested!r}")
    return choice if choice != AUTO or declared is None else declared
