"""Organ-aware lesion boxes (design 4.1) and the region a lesion mask may occupy.

A box is a centre and a size in voxels of the standardised grid; it spans ``[centre - size // 2,
centre - size // 2 + size)`` on each axis, so it holds exactly ``size`` voxels. Placement rules, by
cavity class (:mod:`lesiondiffusion.vocabulary`):

- hollow organ, *within the lumen*: the centre lies in the organ eroded by ``erosion`` voxels
  (Euclidean distance to the organ's outside > ``erosion``); a thin organ with no such voxel uses
  its deepest voxels;
- hollow organ, *wall thickening*: the centre lies in the organ minus that erosion;
- solid organ, *within the parenchymal organ*: the whole box lies inside the organ; when no position
  fits, the box is shrunk (keeping its proportions) until one does;
- solid organ, *protruding from the parenchymal organ*: the centre lies inside the organ and the box
  reaches outside it (when no centre gives that, any centre inside the organ).

Always: the box lies inside the image, its size never exceeds the organ's bounding box, and boxes
placed for the same case never overlap. Centres are drawn uniformly from the voxels that satisfy the
rule with a caller-given ``numpy.random.Generator``: same seed, same boxes.

:func:`allowed_region` is the region a lesion mask inside a placed box may occupy (LMNet clips its
masks to it): the box within the organ, except for protruding lesions, which may leave the organ
within their box.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import mask_bounds
from lesiondiffusion.vocabulary import CAVITY_CLASSES, CAVITY_LUMEN, CAVITY_PROTRUDING, CAVITY_WALL, CAVITY_WITHIN

logger = logging.getLogger(__name__)

DEFAULT_EROSION = 5  # voxels (mm on the standardised grid): design 4.1's "~5 voxels"
HOLLOW_CAVITIES = (CAVITY_LUMEN, CAVITY_WALL)
SOLID_CAVITIES = (CAVITY_WITHIN, CAVITY_PROTRUDING)
_SHRINK = 0.9  # per step when a "within" box fits nowhere


class PlacementError(LesionDiffusionError):
    """No box can satisfy the rules (empty organ, impossible cavity for the organ)."""


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in voxels: ``centre`` and ``size`` per array axis."""

    centre: tuple[int, int, int]
    size: tuple[int, int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "centre", tuple(int(c) for c in self.centre))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        if len(self.centre) != 3 or len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"a box needs 3 centre coordinates and 3 positive sizes, got {self.centre}, {self.size}")

    @property
    def lo(self) -> tuple[int, int, int]:
        """First voxel (inclusive) per axis."""
        return tuple(c - s // 2 for c, s in zip(self.centre, self.size))  # type: ignore[return-value]

    @property
    def hi(self) -> tuple[int, int, int]:
        """Last voxel + 1 (exclusive) per axis."""
        return tuple(lo + s for lo, s in zip(self.lo, self.size))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index expression selecting the box (valid when the box is inside the array)."""
        return tuple(slice(a, b) for a, b in zip(self.lo, self.hi))  # type: ignore[return-value]

    def inside(self, shape: Sequence[int]) -> bool:
        """True when the whole box lies within an array of ``shape``."""
        return all(a >= 0 and b <= n for a, b, n in zip(self.lo, self.hi, shape))

    def overlaps(self, other: Box) -> bool:
        """True when the two boxes share at least one voxel."""
        return all(a0 < b1 and a1 < b0 for a0, b0, a1, b1 in zip(self.lo, self.hi, other.lo, other.hi))

    def to_json(self) -> dict[str, list[int]]:
        """``{"centre": [...], "size": [...]}`` (the manifest's form)."""
        return {"centre": list(self.centre), "size": list(self.size)}

    @classmethod
    def from_json(cls, obj: dict) -> Box:
        """Inverse of :meth:`to_json`."""
        return cls(tuple(obj["centre"]), tuple(obj["size"]))  # type: ignore[arg-type]


def box_mask(shape: Sequence[int], box: Box) -> np.ndarray:
    """Boolean array of ``shape``, True inside ``box`` (clipped to the array)."""
    mask = np.zeros(tuple(shape), dtype=bool)
    lo = [max(0, a) for a in box.lo]
    hi = [min(n, b) for b, n in zip(box.hi, shape)]
    if all(a < b for a, b in zip(lo, hi)):
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def bounding_box(mask: np.ndarray) -> Box:
    """The smallest box holding every True voxel of ``mask`` (centre per :class:`Box`'s convention)."""
    bounds = mask_bounds(mask)
    if bounds is None:
        raise PlacementError("the organ mask is empty")
    lo = bounds[0]
    size = bounds[1] - lo + 1
    return Box(tuple(lo + size // 2), tuple(size))  # type: ignore[arg-type]


def check_cavity(cavity: str, hollow: bool) -> None:
    """Raise :class:`PlacementError` unless ``cavity`` is a class that applies to the organ's kind."""
    allowed = HOLLOW_CAVITIES if hollow else SOLID_CAVITIES
    if cavity not in CAVITY_CLASSES:
        raise PlacementError(f"unknown cavity {cavity!r}; use one of: {', '.join(CAVITY_CLASSES)}")
    if cavity not in allowed:
        kind = "a hollow" if hollow else "a solid"
        raise PlacementError(f"cavity {cavity!r} does not apply to {kind} organ; use one of: {', '.join(allowed)}")


def _depth(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) from each organ voxel to the nearest voxel outside the organ."""
    padded = np.pad(mask, 1)  # the array's edge counts as outside
    return ndi.distance_transform_edt(padded)[1:-1, 1:-1, 1:-1]


def _box_counts(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``counts[lo]`` = organ voxels in the box whose first voxel is ``lo`` (every ``lo`` that fits)."""
    # int32 holds any count of a volume below 2^29 voxels (the 8-term sum stays below 2^31): half the memory traffic
    dtype = np.int32 if mask.size < 1 << 29 else np.int64
    s = np.zeros(tuple(n + 1 for n in mask.shape), dtype=dtype)
    s[1:, 1:, 1:] = mask.astype(dtype).cumsum(0, dtype=dtype).cumsum(1, dtype=dtype).cumsum(2, dtype=dtype)
    a, b, c = (int(v) for v in size)
    nx, ny, nz = (n - v + 1 for n, v in zip(mask.shape, (a, b, c)))
    if min(nx, ny, nz) <= 0:
        return np.zeros((0, 0, 0), dtype=np.int64)
    # inclusion-exclusion over the 8 corners of each box in the summed-volume table
    return (
        s[a:, b:, c:]
        - s[:nx, b:, c:]
        - s[a:, :ny, c:]
        - s[a:, b:, :nz]
        + s[:nx, :ny, c:]
        + s[:nx, b:, :nz]
        + s[a:, :ny, :nz]
        - s[:nx, :ny, :nz]
    )


def _fit_size(size: Sequence[int], limit: Sequence[int]) -> tuple[int, int, int]:
    return tuple(max(1, min(int(s), int(m))) for s, m in zip(size, limit))  # type: ignore[return-value]


def centre_region(
    organ: np.ndarray,
    cavity: str,
    size: Sequence[int],
    hollow: bool,
    erosion: float = DEFAULT_EROSION,
) -> np.ndarray:
    """Voxels where a box of ``size`` may be centred under ``cavity``'s rule and stay in the image.

    ``organ`` is the boolean organ mask on the whole image. Returns a boolean array of its shape
    (possibly empty: the caller decides how to fall back).
    """
    check_cavity(cavity, hollow)
    shape = organ.shape
    half = np.array([s // 2 for s in size])
    size_arr = np.array([int(s) for s in size])
    # centres that keep the box inside the image: lo = c - half >= 0 and lo + size <= shape
    c_lo, c_hi = half, np.array(shape) - size_arr + half  # inclusive range
    region = np.zeros(shape, dtype=bool)
    if np.any(c_hi < c_lo):
        return region
    if cavity in (CAVITY_LUMEN, CAVITY_WALL, CAVITY_PROTRUDING):
        if cavity == CAVITY_PROTRUDING:
            candidates = organ.copy()
        else:
            depth = _depth(organ)
            candidates = depth > erosion if cavity == CAVITY_LUMEN else organ & (depth <= erosion)
            if cavity == CAVITY_LUMEN and not candidates.any() and organ.any():
                deepest = depth.max()
                logger.warning(
                    "organ is thinner than 2 x %s voxels: lumen centres taken at its deepest voxels (%.1f)",
                    erosion,
                    deepest,
                )
                candidates = depth >= deepest
        if cavity == CAVITY_PROTRUDING:
            counts = _box_counts(organ, size_arr)
            crossing = np.zeros(shape, dtype=bool)
            if counts.size:
                sl = tuple(slice(h, h + n) for h, n in zip(half, counts.shape))
                crossing[sl] = counts < int(np.prod(size_arr))
            if (candidates & crossing).any():
                candidates &= crossing
        region[tuple(slice(a, b + 1) for a, b in zip(c_lo, c_hi))] = True
        return region & candidates
    counts = _box_counts(organ, size_arr)  # CAVITY_WITHIN: the whole box inside the organ
    if counts.size:
        sl = tuple(slice(h, h + n) for h, n in zip(half, counts.shape))
        region[sl] = counts == int(np.prod(size_arr))
    return region


def place_box(
    organ: np.ndarray,
    cavity: str,
    size: Sequence[int],
    rng: np.random.Generator,
    hollow: bool,
    avoid: Sequence[Box] = (),
    erosion: float = DEFAULT_EROSION,
) -> Box:
    """Place one lesion box by the organ-aware rules (see the module docstring).

    ``size`` is clipped to the organ's bounding box and the image; a *within* box that fits nowhere
    is shrunk until it fits. Boxes in ``avoid`` (already placed lesions) are never overlapped.
    Raises :class:`PlacementError` when no position satisfies the rules.
    """
    organ = np.asarray(organ, dtype=bool)
    if organ.ndim != 3:
        raise ValueError(f"organ mask must be 3D, got shape {organ.shape}")
    check_cavity(cavity, hollow)
    obox = bounding_box(organ)  # raises on an empty organ
    fitted = _fit_size(_fit_size(size, obox.size), organ.shape)
    if fitted != tuple(int(s) for s in size):
        logger.info("lesion size %s clipped to the organ's box %s -> %s", tuple(size), obox.size, fitted)

    # the rule regions all lie within the organ's box grown by the lesion's size: work on that crop
    margin = np.array(fitted)
    lo = np.maximum(np.array(obox.lo) - margin, 0)
    hi = np.minimum(np.array(obox.hi) + margin, organ.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = organ[crop]

    current = fitted
    while True:
        # the crop's edges limit a box only where they are the image's: elsewhere the organ (and any
        # box centred by the rules) stays at least one lesion size away from them
        region = centre_region(sub, cavity, current, hollow, erosion)
        region &= ~_forbidden(region.shape, lo, current, avoid)
        if region.any():
            break
        if cavity != CAVITY_WITHIN or max(current) == 1:
            if avoid:
                raise PlacementError(
                    f"no room for another {cavity!r} lesion box of size {current} without overlapping the {len(avoid)} already placed"
                )
            raise PlacementError(f"no position satisfies {cavity!r} for a lesion box of size {current}")
        current = tuple(max(1, int(s * _SHRINK)) for s in current)  # type: ignore[assignment]
    if current != fitted:
        logger.warning("a %s box fits inside the organ nowhere; shrunk to %s", fitted, current)
    flat = np.flatnonzero(region)
    pick = np.unravel_index(flat[rng.integers(flat.size)], region.shape)
    return Box(tuple(int(p) + int(o) for p, o in zip(pick, lo)), current)  # type: ignore[arg-type]


def _forbidden(shape: Sequence[int], offset: Sequence[int], size: Sequence[int], avoid: Sequence[Box]) -> np.ndarray:
    """Centres (crop coordinates) whose box of ``size`` would overlap one of ``avoid``."""
    bad = np.zeros(tuple(shape), dtype=bool)
    half = [s // 2 for s in size]
    for other in avoid:
        # overlap on an axis iff c - h < hi and c - h + s > lo, i.e. lo - s + h < c < hi + h
        sl = []
        for a, b, s, h, o, n in zip(other.lo, other.hi, size, half, offset, shape):
            first, last = a - s + h + 1 - o, b + h - 1 - o
            sl.append(slice(max(0, first), max(0, min(n, last + 1))))
        bad[tuple(sl)] = True
    return bad


def place_boxes(
    organ: np.ndarray,
    cavities: Sequence[str],
    sizes: Sequence[Sequence[int]],
    rng: np.random.Generator,
    hollow: bool,
    erosion: float = DEFAULT_EROSION,
) -> list[Box]:
    """Place one box per (cavity, size), in order, none overlapping another."""
    boxes: list[Box] = []
    for cavity, size in zip(cavities, sizes, strict=True):
        boxes.append(place_box(organ, cavity, size, rng, hollow, avoid=boxes, erosion=erosion))
    return boxes


def allowed_region(organ: np.ndarray, cavity: str, box: Box, hollow: bool | None = None) -> np.ndarray:
    """Where a lesion mask in ``box`` may lie: the box within the organ; for protruding lesions the box.

    ``organ`` is the boolean organ mask of the whole image; the result has its shape.
    """
    if hollow is not None:
        check_cavity(cavity, hollow)
    elif cavity not in CAVITY_CLASSES:
        raise PlacementError(f"unknown cavity {cavity!r}; use one of: {', '.join(CAVITY_CLASSES)}")
    region = box_mask(np.shape(organ), box)
    if cavity == CAVITY_PROTRUDING:
        return region
    return region & np.asarray(organ, dtype=bool)
