"""Lesion reports: generated for a synthesis request (offline), or extracted from a labelled CT.

Two directions, one vocabulary (:mod:`lesiondiffusion.vocabulary`):

- **Generation** (preprocess inference). A request holds at least ``organ type`` and ``lesion type``
  (``{"organ type": "liver", "lesion type": "cyst"}``) plus any report field the user wants fixed. A
  provider proposes every field (:class:`OfflineReportProvider` here; an OpenAI-compatible one lives in
  ``lesiondiffusion.reports.providers``), then :func:`complete_report` merges: the user's fields
  win, the cavity is made consistent with the organ, and the size is bounded by the organ's box. Both
  work against the scan the lesion goes into: :func:`measure_scan` measures the host organ's HU and the
  contrast phase (aorta, portal vein) into a :class:`ScanContext`, so the CT value sits against the
  organ as its density class says and the enhancement status is the scan's
  (:func:`report_conflicts` names what disagrees).
- **Extraction** (preprocess train, and the evaluation of synthetic lesions). :func:`extract_report`
  measures a lesion in a CT (HU), its label map (0/1/2) and organ map: arrays in, report out. Every
  threshold is a named constant below, with the reason for its value.

Sizes are in voxels of the standardised 1 mm grid unless a ``spacing`` is given.

Axis order. Arrays, ``organ_box_size`` and :class:`LesionMeasurements` use the array (NIfTI voxel)
axes. A report's box (``LesionReport.centre``/``size``, element 3 of ``type.json``) and its ``size``
text follow the original's files, which list the axes in SimpleITK order, i.e. reversed
(see :mod:`lesiondiffusion.report`: ``LesionReport.array_box`` / ``with_array_box`` and
``to_report_axes`` / ``from_report_axes`` convert).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import (
    DEFAULT_VERSION,
    HOLLOW_ORGANS,
    LabelTable,
    UnknownOrganError,
    label_ids,
    label_table,
    mask_bounds,
)
from lesiondiffusion.report import (
    LesionReport,
    format_ct_value,
    format_size,
    from_report_axes,
    parse_ct_value,
    to_report_axes,
)

logger = logging.getLogger(__name__)

# Request keys that are not report fields.
ORGAN_TYPE = "organ type"
LESION_TYPE = "lesion type"
# Extra attribute written by extract_report (free text, not read by the networks).
SIZE_MM = "size in mm"

ENHANCED = "enhanced CT,"
NON_CONTRAST = "non-contrast CT,"

# ---- extraction thresholds -------------------------------------------------------------------------
# Density: the lesion's core HU (median after smoothing inside the lesion, so partial volume at its
# rim does not count) against the organ's parenchyma (median HU of the organ away from its rim and
# from the lesion). Within +-ISO_HU the lesion is isodense: differences under ~10 HU are not
# visible at abdominal window settings and are within real CT's noise of a small region.
ISO_HU = 10.0
# A hypodense lesion this dark or darker (water is 0 HU, simple cysts 0-20 HU) and homogeneous is
# fluid-like; below FLUID_MIN_HU (water less noise and partial volume) it is fat, not fluid.
FLUID_MAX_HU = 20.0
FLUID_MIN_HU = -20.0
# Mixed density: at least this fraction of the (smoothed) lesion is darker than the organ by more than
# ISO_HU and at least this fraction brighter by more than ISO_HU.
MIXED_MIN_FRACTION = 0.25
# Hollow organs have no parenchyma and variable contents (urine, bile, gas, food); their lesions are
# described against the wall, i.e. enhanced soft tissue. The wall is too thin to measure reliably at
# 1 mm, so a typical value is used.
HOLLOW_REFERENCE_HU = 40.0
# Lung lesions are described against soft tissue: a solid mass is above this, ground glass between
# GROUND_GLASS_MIN_HU and it.
LUNG_SOLID_MIN_HU = -100.0
GROUND_GLASS_MIN_HU = -800.0
# Calcific density (stones, calculi) starts well above any enhanced soft tissue.
CALCIFIC_MIN_HU = 300.0
# The organ reference excludes its outer rim (partial volume with fat) and a margin around the lesion.
ORGAN_RIM_MM = 2.0
LESION_MARGIN_MM = 3.0
MIN_REFERENCE_VOXELS = 50
# Homogeneity: standard deviation of the lesion's HU after a light smoothing inside the lesion (so
# voxel noise, ~10-20 HU in real CT, does not count as structure). Real homogeneous lesions (cysts)
# stay under ~10 HU after smoothing; necrotic or mixed tumours exceed 15-20 HU.
# On coarse grids the smoothing reaches at least ``SMOOTH_MIN_VOXELS`` voxels: a 1 mm Gaussian on a 3 mm
# grid hardly smooths, and the scan's voxel noise alone then read every lesion as heterogeneous.
SMOOTH_SIGMA_MM = 1.0
SMOOTH_MIN_VOXELS = 0.8
HOMOGENEOUS_MAX_STD_HU = 12.0
# "presence of increased/decreased density areas": this fraction of the smoothed lesion lies more than
# AREA_DELTA_HU above/below the lesion's median. Smoothed voxel noise almost never gets that far (well
# under 1%), while a lesion with +-25 HU blobs has 8-20% on each side.
AREA_DELTA_HU = 20.0
AREA_MIN_FRACTION = 0.05
# Shape. Digital solidity (voxels / voxel centres inside the convex hull: 1 for any convex shape) and
# elongation (longest / shortest principal axis). Lobulated or infiltrative lesions have solidity well
# under 0.9 (two touching balls: 0.87; the demo liver tumour: 0.85, the demo bladder tumour: 0.97); an
# ovoid up to about 2:1 still reads as round-like.
ROUND_MIN_SOLIDITY = 0.9
ROUND_MAX_ELONGATION = 2.2
PUNCTATE_MAX_MM = 10.0  # equivalent-sphere diameter of a punctate / nodular lesion
# Cavity. Hollow organ: the lesion's box centre deeper than HOLLOW_WALL_MM inside the organ (lesion
# included) is in the lumen, else in the wall: the rule the placement uses (~5 voxels of erosion).
# Solid organ: the lesion is within the organ when this fraction of its one-voxel outer shell is organ.
HOLLOW_WALL_MM = 5.0
WITHIN_MIN_SHELL_FRACTION = 0.90
# Relationship: "close relationship with adjacent organs" when this fraction of the lesion's outer
# shell (ADJACENT_SHELL_MM thick) is another organ of the map.
ADJACENT_SHELL_MM = 2.0
ADJACENT_MIN_FRACTION = 0.05
# Surface: the HU step from the lesion (2-4 mm inside) to the organ around it (2-4 mm outside). With
# a step smaller than MARGIN_MIN_CONTRAST_HU the boundary cannot be seen (ill-defined). Otherwise the
# margin is well-defined when at least SHARP_MIN_FRACTION of the step lies between the two voxel layers
# that touch the boundary. On a 1 mm grid an ideal edge blurred by a Gaussian of sigma 0.6 / 1.0 / 1.5 /
# 2 mm gives ~0.54 / 0.32 / 0.24 / 0.20, so 0.3 accepts edges blurred up to ~1.1 mm (a CT's own
# resolution) and calls wider transition zones ill-defined.
MARGIN_MIN_CONTRAST_HU = 10.0
SHARP_MIN_FRACTION = 0.3
PROFILE_FAR_MM = (2.0, 4.0)
# Enhancement: blood in the aorta is ~40-50 HU without contrast and >150 HU in arterial/portal phases.
ENHANCED_MIN_AORTA_HU = 120.0

# ---- the scan: organ HU and contrast phase, measured where a lesion will be written -----------------
# Unenhanced blood is 35-55 HU (up to ~65 with a high haematocrit): an aorta below this is a plain scan.
NON_CONTRAST_MAX_AORTA_HU = 70.0
# Arterial phase: the aorta peaks (200-400 HU) while the portal vein is still filling, well behind it.
ARTERIAL_MIN_AORTA_HU = 200.0
ARTERIAL_MIN_AORTA_PORTAL_GAP_HU = 60.0
# Portal venous phase: the portal vein is enhanced (150-200 HU), about as bright as the aorta.
PORTAL_VENOUS_MIN_PORTAL_HU = 130.0
# A vessel with fewer voxels than this (a stray label) tells nothing about the phase.
MIN_VESSEL_VOXELS = 10
# The vessel's HU is taken this far inside it, away from partial volume with its wall.
VESSEL_CORE_MM = 1.5
AORTA, PORTAL_VEIN = "aorta", "portal_vein_and_splenic_vein"
PHASE_NON_CONTRAST, PHASE_ARTERIAL, PHASE_PORTAL_VENOUS, PHASE_UNKNOWN = (
    "non-contrast",
    "arterial",
    "portal venous",
    "unknown",
)

# ---- generation: typical organ HU and lesion kinds -------------------------------------------------
# Typical mean HU of each organ in a contrast-enhanced (portal venous) CT: the reference the offline
# provider places a lesion's CT value against when the scan's own organ HU is not given.
TYPICAL_ORGAN_HU: dict[str, float] = {
    "liver": 100.0,
    "spleen": 110.0,
    "kidney": 160.0,
    "pancreas": 90.0,
    "adrenal gland": 50.0,
    "lung": -850.0,
    "prostate": 45.0,
    "thyroid gland": 110.0,
}
DEFAULT_ORGAN_HU = 60.0
# A generated lesion is at most this fraction of the organ's box along each axis.
MAX_ORGAN_FRACTION = 0.6
# A generated hypo- or hyperdense lesion is at least this far from the organ's HU, an isodense one
# within ISO_GENERATED_HU: the extractor's +-ISO_HU boundary then lies well inside the gap, so what
# is written reads back as its class after partial volume and noise, and is visible at all.
GENERATED_MIN_GAP_HU = 15.0
ISO_GENERATED_HU = 6.0
# Lesions whose own tissue sets their CT value, whatever the organ or the contrast phase: simple
# fluid (water, 0-20 HU), fat (-120..-30 HU), clotted blood (50-80 HU; it does not enhance) and
# calcium (stones, calcifications: well above any enhanced soft tissue).
FAT_HU = (-120.0, -30.0)
# Generated fluid keeps this distance from the fluid threshold, so that what is written reads back as
# its class after partial volume and noise.
FLUID_MARGIN_HU = 5.0
FLUID_HU = (0.0, FLUID_MAX_HU - FLUID_MARGIN_HU)
BLOOD_HU = (50.0, 80.0)
STONE_HU = (350.0, 800.0)


@dataclass(frozen=True)
class LesionKind:
    """Priors for one kind of lesion: weighted classes per field, CT-value offsets and size (mm)."""

    name: str
    keywords: tuple[str, ...]
    density: Mapping[str, float]
    heterogeneous: float  # probability of "heterogeneous"
    round_like: float  # probability of a round-like (vs irregular) shape
    well_defined: float  # probability of a well-defined margin
    close_relationship: float
    lumen: float  # hollow organs: probability of "within the lumen" (vs wall thickening)
    within: float  # solid organs: probability of "within the parenchymal organ" (vs protruding)
    size_mm: tuple[float, float]
    features: Mapping[str, float] = field(default_factory=dict)
    tissue_hu: tuple[float, float] | None = None  # the CT value its own tissue sets (HU), if any


_HYPO, _ISO, _HYPER = "hypodense lesion", "isodense lesion", "hyperdense lesion"
_MIXED, _FLUID = "mixed-density lesion", "hypoattenuating fluid-like lesion"
HYPO_CLASS, FLUID_CLASS = _HYPO, _FLUID  # fluid-like is the hypodense class of water-density, homogeneous lesions
_RING = "ring enhancement"
_GGO, _SOLID_MASS = "low-density ground-glass opacity", "isodense soft tissue mass"
_INC, _DEC = "presence of increased density areas", "presence of decreased density areas"

# The first kind with a keyword in the lesion type wins: a "haemorrhagic cyst" is blood, a "cystic
# teratoma" fat-containing.
LESION_KINDS: tuple[LesionKind, ...] = (
    LesionKind(
        "haemorrhage",
        ("hemorrhag", "haemorrhag", "hematoma", "haematoma", "bleed"),
        {_HYPER: 0.6, _ISO: 0.4},
        0.3,
        0.6,
        0.6,
        0.2,
        0.5,
        0.8,
        (15, 50),
        tissue_hu=BLOOD_HU,
    ),
    LesionKind(
        "fat-containing",
        ("lipoma", "teratoma", "dermoid", "fat"),
        {_HYPO: 1.0},
        0.2,
        0.8,
        0.9,
        0.0,
        0.5,
        0.7,
        (10, 50),
        tissue_hu=FAT_HU,
    ),
    LesionKind(
        "cyst",
        ("cyst", "cystic", "pseudocyst"),
        {_FLUID: 1.0},
        0.0,
        0.9,
        1.0,
        0.0,
        0.8,
        0.7,
        (8, 40),
        tissue_hu=FLUID_HU,
    ),
    LesionKind(
        "stone",
        ("stone", "calculus", "calculi", "lith", "calcification", "calcified"),
        {_HYPER: 1.0},
        0.0,
        0.8,
        1.0,
        0.0,
        1.0,
        0.9,
        (3, 12),
        {"stone": 1.0},
        STONE_HU,
    ),
    LesionKind("polyp", ("polyp", "papilloma"), {_ISO: 0.7, _HYPER: 0.3}, 0.1, 0.8, 0.8, 0.0, 1.0, 0.6, (5, 20)),
    LesionKind(
        "hemangioma",
        ("hemangioma", "haemangioma", "angioma"),
        {_HYPER: 0.6, _HYPO: 0.4},
        0.3,
        0.8,
        0.9,
        0.0,
        0.5,
        0.8,
        (10, 40),
    ),
    LesionKind(
        "abscess",
        ("abscess", "infection", "collection"),
        {_RING: 0.5, _HYPO: 0.5},
        0.7,
        0.5,
        0.3,
        0.3,
        0.5,
        0.7,
        (20, 60),
        {_DEC: 0.5},
    ),
    LesionKind(
        "nodule",
        ("nodule", "nodular", "granuloma"),
        {_ISO: 0.5, _HYPO: 0.3, _HYPER: 0.2},
        0.1,
        0.8,
        0.7,
        0.1,
        0.5,
        0.8,
        (5, 15),
    ),
    LesionKind(
        "tumour",
        (
            "cancer",
            "carcinoma",
            "tumor",
            "tumour",
            "malignan",
            "neoplasm",
            "mass",
            "metasta",
            "lymphoma",
            "sarcoma",
            "hcc",
            "adenoma",
        ),
        {_HYPO: 0.55, _ISO: 0.2, _MIXED: 0.15, _HYPER: 0.1},
        0.6,
        0.35,
        0.35,
        0.3,
        0.4,
        0.6,
        (15, 60),
        {_INC: 0.2, _DEC: 0.4, "spiculated margins": 0.1},
    ),
)
HOLLOW_TUMOUR_DENSITY = {_ISO: 0.6, _HYPO: 0.2, _HYPER: 0.2}
GENERIC_KIND = LesionKind("generic", (), {_HYPO: 0.5, _ISO: 0.3, _HYPER: 0.2}, 0.4, 0.5, 0.5, 0.2, 0.5, 0.7, (10, 40))

# CT value relative to the organ reference, per density class: (low, high) offsets in HU.
DENSITY_OFFSET_HU: dict[str, tuple[float, float]] = {
    _HYPO: (-50.0, -20.0),
    _ISO: (-ISO_GENERATED_HU, ISO_GENERATED_HU),
    _HYPER: (20.0, 60.0),
    _MIXED: (-15.0, 5.0),
    _RING: (-40.0, -20.0),
}
# Absolute CT values (HU) for classes defined by their own attenuation.
DENSITY_ABSOLUTE_HU: dict[str, tuple[float, float]] = {
    _FLUID: FLUID_HU,
    _GGO: (-700.0, -400.0),
    _SOLID_MASS: (20.0, 50.0),
    "stone": STONE_HU,
}


def lesion_kind(lesion_type: str) -> LesionKind:
    """The :class:`LesionKind` whose keyword occurs in ``lesion_type`` (generic when none does)."""
    text = " ".join(re.split(r"[\s_\-,]+", str(lesion_type).lower()))
    for kind in LESION_KINDS:
        if any(k in text for k in kind.keywords):
            return kind
    return GENERIC_KIND


def organ_group(organ_name: str) -> str:
    """The group word an organ belongs to for reporting ("kidney left" -> "kidney")."""
    name = organ_name.lower()
    for group in ("kidney", "lung", "adrenal gland"):
        if group in name:
            return group
    return name


def is_hollow_name(organ_name: str) -> bool:
    """True for organs with a lumen (design 4.1 hollow-organ rules)."""
    return organ_name.lower() in HOLLOW_ORGANS


_CAVITY_WORDS = (
    ("lumen", V.CAVITY_LUMEN),
    ("wall", V.CAVITY_WALL),
    ("protrud", V.CAVITY_PROTRUDING),
    ("exophytic", V.CAVITY_PROTRUDING),
    ("within", V.CAVITY_WITHIN),
    ("parenchym", V.CAVITY_WITHIN),
    ("intra", V.CAVITY_WITHIN),
)


def parse_cavity(text: str) -> str | None:
    """The cavity class of a free text: a vocabulary class, else by key word ("lumen", "wall",
    "protruding", "within"); None when nothing matches."""
    found = V.parse_classes(V.CAVITY, text or "")[0]
    if found:
        return found[0]
    low = str(text or "").lower()
    return next((cls for word, cls in _CAVITY_WORDS if word in low), None)


def allowed_cavities(organ_name: str) -> tuple[str, str]:
    """The two cavity classes an organ admits: lumen/wall for hollow organs, within/protruding else."""
    return (V.CAVITY_LUMEN, V.CAVITY_WALL) if is_hollow_name(organ_name) else (V.CAVITY_WITHIN, V.CAVITY_PROTRUDING)


def typical_organ_hu(organ_name: str) -> float:
    """Reference HU of an organ for generation: wall soft tissue for hollow organs, else a typical value."""
    if is_hollow_name(organ_name):
        return HOLLOW_REFERENCE_HU
    return TYPICAL_ORGAN_HU.get(organ_group(organ_name), DEFAULT_ORGAN_HU)


def density_reference_hu(organ_name: str, measured_hu: float | None = None) -> float:
    """The HU a lesion's density class is judged against: the organ's measured parenchyma when given,
    except for hollow organs, whose contents are no reference (:data:`HOLLOW_REFERENCE_HU`)."""
    if is_hollow_name(organ_name) or measured_hu is None:
        return typical_organ_hu(organ_name)
    return float(measured_hu)


WELL_DEFINED, ILL_DEFINED = "well-defined", "ill-defined"
# A lesion's edge by margin class: the sigma (mm) of the normal-CDF profile across its border (0.5 on the
# border). Well-defined: a step the scan's own blur softens; ill-defined: a transition a few mm wide.
MARGIN_SIGMA_MM = {WELL_DEFINED: (0.3, 0.3), ILL_DEFINED: (2.0, 4.0)}
_ILL_WORDS = ("ill", "unclear", "poor", "irregular", "blur", "indistinct")
_WELL_WORDS = ("well", "clear", "sharp", "smooth", "distinct")


def margin_class(text: str | None) -> str | None:
    """:data:`WELL_DEFINED` / :data:`ILL_DEFINED` from a report's surface text ("unclear boundary ..." is
    ill-defined); None when it names neither."""
    low = str(text or "").lower()
    if any(w in low for w in _ILL_WORDS):
        return ILL_DEFINED
    return WELL_DEFINED if any(w in low for w in _WELL_WORDS) else None


def margin_sigma_mm(text: str | None) -> float | None:
    """The edge sigma (mm, the middle of :data:`MARGIN_SIGMA_MM`) for a report's surface text; None when
    the text names no margin class."""
    cls = margin_class(text)
    return None if cls is None else float(np.mean(MARGIN_SIGMA_MM[cls]))


def margin_text(organ_name: str, well_defined: bool) -> str:
    """The surface class for a well-/ill-defined margin in the organ's own words."""
    group = organ_group(organ_name)
    if group == "kidney":
        return (
            "clear boundary with the renal parenchyma" if well_defined else "unclear boundary with the renal parenchyma"
        )
    if group == "esophagus" and not well_defined:
        return "poorly defined boundary with normal esophageal tissue"
    if is_hollow_name(organ_name) and group != "gallbladder":
        return "clear serosal surface" if well_defined else "serosal surface irregularity"
    return "well-defined margin" if well_defined else "ill-defined margin"


# ---- the scan -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanContext:
    """What a scan says about the lesions to be written into it (see :func:`measure_scan`).

    ``organ_hu``: median HU of the host organ's parenchyma (None when it has too few voxels);
    ``phase``: one of ``PHASE_*`` from the aorta and portal vein; ``aorta_hu`` / ``portal_vein_hu``:
    their median HU, None when the organ map lacks them.
    """

    organ: str
    organ_hu: float | None
    phase: str
    aorta_hu: float | None = None
    portal_vein_hu: float | None = None

    @property
    def contrast(self) -> bool | None:
        """True for a contrast-enhanced scan, False for a plain one, None when it cannot be told."""
        if self.phase in (PHASE_ARTERIAL, PHASE_PORTAL_VENOUS):
            return True
        if self.phase == PHASE_NON_CONTRAST:
            return False
        # a delayed or odd phase: the aorta still shows contrast, though the phase has no name
        return True if self.aorta_hu is not None and self.aorta_hu >= ENHANCED_MIN_AORTA_HU else None

    @property
    def enhancement(self) -> str:
        """The report's enhancement status for this scan ("" when the contrast cannot be told)."""
        return {True: ENHANCED, False: NON_CONTRAST}.get(self.contrast, "")  # type: ignore[arg-type]

    @property
    def reference_hu(self) -> float:
        """The HU a lesion's density class is judged against here (:func:`density_reference_hu`)."""
        return density_reference_hu(self.organ, self.organ_hu)

    def describe(self) -> str:
        """One line for logs and provenance: ``liver 48 HU, non-contrast (aorta 41 HU, portal vein 37 HU)``."""
        organ = f"{self.organ} {self.organ_hu:.0f} HU" if self.organ_hu is not None else f"{self.organ} HU not measured"
        phase = (
            self.phase
            if self.phase != PHASE_UNKNOWN
            else ("contrast-enhanced, phase unknown" if self.contrast else "contrast phase unknown")
        )
        vessels = [
            f"{name} {hu:.0f} HU"
            for name, hu in (("aorta", self.aorta_hu), ("portal vein", self.portal_vein_hu))
            if hu is not None
        ]
        return f"{organ}, {phase}" + (
            f" ({', '.join(vessels)})" if vessels else " (no aorta or portal vein in the organ map)"
        )

    def to_json(self) -> dict[str, object]:
        """The measurement as plain JSON values (HU rounded to 0.1), with :meth:`describe`'s line."""

        def hu(v: float | None) -> float | None:
            return None if v is None else round(float(v), 1)

        return {
            "organ": self.organ, "organ_hu": hu(self.organ_hu), "phase": self.phase, "contrast": self.contrast,
            "aorta_hu": hu(self.aorta_hu), "portal_vein_hu": hu(self.portal_vein_hu), "summary": self.describe(),
        }  # fmt: skip


def contrast_phase(aorta_hu: float | None, portal_vein_hu: float | None) -> str:
    """The contrast phase (``PHASE_*``) from the aorta's and portal vein's HU (None: not in the map).

    A dark aorta is a plain scan; a bright aorta with a portal vein well behind it is arterial; an
    enhanced portal vein is portal venous (with or without the aorta: unenhanced blood never gets that
    bright). Anything else is unknown (a dark portal vein alone may be an early arterial phase).
    """
    if aorta_hu is not None and aorta_hu < NON_CONTRAST_MAX_AORTA_HU:
        return PHASE_NON_CONTRAST
    if portal_vein_hu is None:
        return PHASE_UNKNOWN
    if (
        aorta_hu is not None
        and aorta_hu >= ARTERIAL_MIN_AORTA_HU
        and portal_vein_hu <= aorta_hu - ARTERIAL_MIN_AORTA_PORTAL_GAP_HU
    ):
        return PHASE_ARTERIAL
    if portal_vein_hu >= PORTAL_VENOUS_MIN_PORTAL_HU:
        return PHASE_PORTAL_VENOUS
    return PHASE_UNKNOWN


def vessel_hu(image_hu: np.ndarray, vessel: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> float | None:
    """Median HU of a vessel's lumen (its core, away from the wall); None for fewer than MIN_VESSEL_VOXELS."""
    vessel = np.asarray(vessel, dtype=bool)
    if np.count_nonzero(vessel) < MIN_VESSEL_VOXELS:
        return None
    box = _crop_box(vessel, 1, vessel.shape)
    inside, values = vessel[box], np.asarray(image_hu)[box]
    core = inside & (_edt(inside, spacing) > VESSEL_CORE_MM)
    return float(np.median(values[core if core.any() else inside]))


def measure_scan(
    image_hu: np.ndarray,
    organ_seg: np.ndarray,
    organ_id: int,
    version: str = DEFAULT_VERSION,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> ScanContext:
    """The host organ's HU and the contrast phase of a scan, measured in it.

    ``image_hu`` (HU) and ``organ_seg`` (TotalSegmentator ``version`` ids) share one grid of voxel size
    ``spacing`` (mm). The organ's HU is the median of its voxels away from its rim
    (:func:`organ_reference_hu`); the phase comes from the aorta and the portal vein
    (:func:`contrast_phase`), and is unknown when the map lacks them.
    """
    image, seg = np.asarray(image_hu), label_ids(organ_seg)
    if image.shape != seg.shape or image.ndim != 3:
        raise LesionDiffusionError(f"image {image.shape} and organ map {seg.shape} must be 3D arrays of one shape")
    table = label_table(version)
    spacing = tuple(float(v) for v in spacing)
    organ_name = table.name(organ_id)
    organ_hu = organ_reference_hu(image, seg == int(organ_id), spacing)
    vessels = [
        vessel_hu(image, seg == table.id(name), spacing) if _has(table, name) else None for name in (AORTA, PORTAL_VEIN)
    ]
    return ScanContext(organ_name, organ_hu, contrast_phase(*vessels), *vessels)


def _has(table: LabelTable, name: str) -> bool:
    try:
        table.id(name)
        return True
    except UnknownOrganError:
        return False


def density_for_value(hu: float, reference_hu: float, organ_name: str, homogeneous: bool = True) -> str:
    """The density class a lesion of mean ``hu`` has against its organ's ``reference_hu`` (extraction's rule)."""
    if organ_group(organ_name) == "lung":
        if hu >= LUNG_SOLID_MIN_HU:
            return _SOLID_MASS
        return _GGO if hu >= GROUND_GLASS_MIN_HU else _ISO
    delta = hu - reference_hu
    if delta < -ISO_HU:
        return _FLUID if FLUID_MIN_HU <= hu <= FLUID_MAX_HU and homogeneous else _HYPO
    return _HYPER if delta > ISO_HU else _ISO


def density_conflict(density: str, hu: float, reference_hu: float, organ_name: str) -> str | None:
    """Why a lesion of class ``density`` cannot have mean ``hu`` next to an organ at ``reference_hu``; None if it can.

    Below / above mean more than :data:`ISO_HU` from the organ, as the extractor reads it back.
    """
    delta = hu - reference_hu
    at = f"{density!r} at {hu:.0f} HU"
    organ = f"the {organ_name}'s {reference_hu:.0f} HU"
    if density in (_HYPO, _FLUID, _RING) and delta >= -ISO_HU:
        return f"{at} is not below {organ} by more than {ISO_HU:g} HU"
    if density == _FLUID and not FLUID_MIN_HU <= hu <= FLUID_MAX_HU:
        return f"{at} is not fluid ({FLUID_MIN_HU:g} to {FLUID_MAX_HU:g} HU)"
    if density == _ISO and abs(delta) > ISO_HU and organ_group(organ_name) != "lung":
        return f"{at} is not within {ISO_HU:g} HU of {organ}"
    if density == _HYPER and delta <= ISO_HU:
        return f"{at} is not above {organ} by more than {ISO_HU:g} HU"
    if density == _SOLID_MASS and hu < LUNG_SOLID_MIN_HU:
        return f"{at} is below soft tissue ({LUNG_SOLID_MIN_HU:g} HU)"
    if density == _GGO and not GROUND_GLASS_MIN_HU <= hu < LUNG_SOLID_MIN_HU:
        return f"{at} is outside ground glass ({GROUND_GLASS_MIN_HU:g} to {LUNG_SOLID_MIN_HU:g} HU)"
    return None


def read_hu(text: str | None) -> float | None:
    """A CT value given as the report's sentence, ``"40 HU"`` or a plain number; None when unreadable."""
    text = str(text or "")
    return parse_ct_value(text) if "HU" in text.upper() else _plain_number(text)


def report_conflicts(
    attributes: Mapping[str, str],
    organ_name: str,
    scan: ScanContext | None = None,
    *,
    reference_hu: float | None = None,
    fixed: Sequence[str] = (),
) -> list[str]:
    """What in a report's strings contradicts the scan (empty when nothing does).

    Checked: each density class against the CT value and the organ's HU (``scan``'s, else
    ``reference_hu``, else a typical value); the enhancement status against the scan's contrast; ring
    enhancement on a plain scan. A check made only of ``fixed`` fields (the user's own) is skipped.
    """
    reference = scan.reference_hu if scan is not None else density_reference_hu(organ_name, reference_hu)
    problems = []
    densities = V.parse_classes(V.DENSITY, attributes.get(V.DENSITY) or "")[0]
    hu = read_hu(attributes.get(V.CT_VALUE))
    if hu is not None and not (V.DENSITY in fixed and V.CT_VALUE in fixed):
        problems += [p for p in (density_conflict(d, hu, reference, organ_name) for d in densities) if p]
    contrast = None if scan is None else scan.contrast
    if contrast is False and _RING in densities and V.DENSITY not in fixed:
        problems.append(f"{_RING!r} needs contrast, and this is a plain scan ({scan.describe()})")  # type: ignore[union-attr]
    status = V.parse_classes(V.ENHANCEMENT, attributes.get(V.ENHANCEMENT) or "")[0]
    if contrast is not None and status and V.ENHANCEMENT not in fixed:
        said = status[0] == ENHANCED.rstrip(",").lower()
        if said != contrast:
            problems.append(f"enhancement status {status[0]!r} contradicts the scan ({scan.describe()})")  # type: ignore[union-attr]
    return problems


# ---- sizes -------------------------------------------------------------------------------------------
# function forms of the report's box accessors (the axis convention itself lives in report.py)
array_box = LesionReport.array_box
with_array_box = LesionReport.with_array_box

_NUM = r"\d+(?:\.\d+)?"
_PIXEL_RE = re.compile(rf"^\[\[\s*({_NUM})[\s,]+({_NUM})[\s,]+({_NUM})\s*\]\]\s*(?:pixels?|voxels?)?\s*,?$", re.I)
_METRIC_RE = re.compile(
    rf"^({_NUM})(?:\s*(?:mm|cm))?(?:\s*[x×*,]\s*({_NUM})(?:\s*(?:mm|cm))?\s*[x×*,]\s*({_NUM}))?\s*(mm|cm)\s*,?$", re.I
)


def parse_lesion_size(text: str, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    """A size given as ``"[[a b c]] pixel"``, ``"25 mm"``, ``"25x20x18 mm"`` or in cm -> voxels, array axes.

    ``[[a b c]] pixel`` is the report's own form, in the report's axis order (reversed array axes);
    ``a x b x c mm`` lists the array axes (x, y, z on the standardised RAS grid) and is converted with
    ``spacing`` (mm per array axis). Anything else is a one-line :class:`LesionDiffusionError`.
    """
    s = " ".join(str(text).split()).strip()
    m = _PIXEL_RE.match(s)
    if m:
        in_report_order = [float(v) for v in m.groups()]
        size = from_report_axes(in_report_order)
    else:
        m = _METRIC_RE.match(s)
        if not m:
            raise LesionDiffusionError(
                f"cannot read the lesion size {text!r}: use '[[a b c]] pixel', '25 mm' or '25x20x18 mm'"
            )
        a, b, c, unit = m.groups()
        mm = [float(a)] * 3 if b is None else [float(a), float(b), float(c)]
        scale = 10.0 if unit.lower() == "cm" else 1.0
        size = tuple(v * scale / float(sp) for v, sp in zip(mm, spacing))
    if any(v <= 0 for v in size):
        raise LesionDiffusionError(f"lesion size {text!r} must be positive along every axis")
    return tuple(max(1, int(round(v))) for v in size)  # type: ignore[return-value]


def bound_size(size: Sequence[int], organ_box_size: Sequence[int]) -> tuple[int, int, int]:
    """``size`` clipped to the organ's box along each axis (never below one voxel)."""
    return tuple(int(max(1, min(int(s), int(o)))) for s, o in zip(size, organ_box_size))  # type: ignore[return-value]


# ---- generation --------------------------------------------------------------------------------------
def _choice(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _given(request: Mapping[str, str], name: str) -> str | None:
    value = request.get(name)
    return value if isinstance(value, str) and value.strip() else None


def _given_classes(request: Mapping[str, str], name: str) -> list[str]:
    value = _given(request, name)
    return V.parse_classes(name, value)[0] if value else []


class OfflineReportProvider:
    """Proposes every report field from the vocabulary, consistent with the organ and lesion type.

    No network and no model: a table of lesion kinds (:data:`LESION_KINDS`: haemorrhage,
    fat-containing, cyst, stone, polyp, hemangioma, abscess, nodule, tumour, generic) gives weighted
    classes per field; fields the request already has condition the rest (a user-given density sets
    the CT value and a CT value the density, a cavity sets the shape). With a measured
    :class:`ScanContext` the CT value is placed against the organ's HU in this scan and the enhancement
    status follows its contrast phase; kinds whose tissue sets their value (fluid, fat, blood,
    calcium) get it whatever the organ, with the density class it then has.
    """

    name = "offline"

    def propose(
        self,
        request: Mapping[str, str],
        organ_name: str,
        rng: np.random.Generator,
        *,
        organ_box_size: Sequence[int] | None = None,
        organ_reference_hu: float | None = None,
        scan: ScanContext | None = None,
    ) -> dict[str, str]:
        """Every report field (the request's own values included) as the original's strings.

        ``organ_box_size`` (voxels, 1 mm grid) bounds the size; ``scan`` (:func:`measure_scan`) anchors
        the CT value and sets the enhancement status; without it ``organ_reference_hu`` (the organ's
        HU, see :func:`organ_reference_hu`), else a typical contrast-enhanced value, anchors the CT
        value and the status is "enhanced CT".
        """
        organ = str(organ_name).lower()
        ref = scan.reference_hu if scan is not None else density_reference_hu(organ, organ_reference_hu)
        plain = scan is not None and scan.contrast is False
        kind = lesion_kind(request.get(LESION_TYPE, ""))
        hollow = is_hollow_name(organ)
        group = organ_group(organ)
        out: dict[str, str] = {}

        # cavity first: the shape depends on it
        lumen, wall = V.CAVITY_LUMEN, V.CAVITY_WALL
        cav = parse_cavity(_given(request, V.CAVITY) or "")
        if cav in allowed_cavities(organ):
            cavity = cav
        elif hollow:
            cavity = lumen if rng.random() < kind.lumen else wall
        else:
            cavity = V.CAVITY_WITHIN if rng.random() < kind.within else V.CAVITY_PROTRUDING
        out[V.CAVITY] = cavity

        round_like = rng.random() < kind.round_like
        if cavity == wall:
            shape = ["irregular wall thickening"] + (
                ["luminal narrowing"] if group in ("esophagus", "colon") and rng.random() < 0.5 else []
            )
        elif cavity == lumen:
            shape = ["round-like" if round_like else "irregular", "protrusion into the lumen"]
        elif kind.name == "cyst" and rng.random() < 0.3:
            shape = ["cystic"]
        elif kind.name in ("nodule", "stone") and rng.random() < 0.5:
            shape = ["punctate"]
        else:
            shape = ["round-like" if round_like else "irregular"]
        out[V.SHAPE] = V.format_classes(shape)

        user_density = _given_classes(request, V.DENSITY)
        user_hu = read_hu(_given(request, V.CT_VALUE))
        density = user_density
        if not density:
            if group == "lung":
                weights = (
                    {_GGO: 0.5, _SOLID_MASS: 0.5} if kind.name in ("tumour", "nodule", "generic") else kind.density
                )
            elif hollow and kind.name in ("tumour", "generic"):
                weights = HOLLOW_TUMOUR_DENSITY  # wall tumours enhance about like the wall
            else:
                weights = kind.density
            if plain:  # without contrast nothing enhances: no ring, and soft tissue is not brighter than the organ
                weights = _without_enhancement(weights)
            density = [_choice(rng, weights)]

        variations = _given_classes(request, V.DENSITY_VARIATIONS)
        if not variations:
            hetero = density[0] == _MIXED or rng.random() < kind.heterogeneous
            variations = ["heterogeneous" if hetero and density[0] != _FLUID else "homogeneous"]
        out[V.DENSITY_VARIATIONS] = V.format_classes(variations)

        features = _given_classes(request, V.SPECIFIC)
        if not features and _given(request, V.SPECIFIC) is None:
            for feature, p in kind.features.items():
                if rng.random() < p:
                    features.append(feature)
            if variations == ["heterogeneous"] and not any(f in (_INC, _DEC) for f in features):
                features += [_DEC] if rng.random() < 0.5 else [_INC, _DEC]
            if group == "pancreas" and kind.name == "cyst" and rng.random() < 0.5:
                features.append("retention of pancreatic fluid")
        out[V.SPECIFIC] = V.format_classes(features)

        tissue = STONE_HU if "stone" in features else kind.tissue_hu
        hu = user_hu
        if hu is None and tissue is not None:
            hu = _sample_tissue_hu(tissue, ref, rng, user_density[0] if user_density else None, prefer=density[0])
        if hu is None:
            hu = _sample_ct_value(density[0], False, ref, rng)
        homogeneous = variations != ["heterogeneous"]
        if not user_density and (tissue is not None or density_conflict(density[0], hu, ref, organ)):
            # the value is the tissue's (or the user's): the class is what it reads as here
            density = [density_for_value(hu, ref, organ, homogeneous)]
        out[V.DENSITY] = V.format_classes(density)
        out[V.CT_VALUE] = format_ct_value(hu)

        well = rng.random() < kind.well_defined
        out[V.SURFACE] = margin_text(organ, well) + ","
        close = rng.random() < kind.close_relationship
        out[V.RELATIONSHIP] = (
            "close relationship with adjacent organs," if close else "no close relationship with surrounding organs,"
        )
        out[V.ENHANCEMENT] = scan.enhancement if scan is not None else ENHANCED
        out[V.SIZE] = format_size(to_report_axes(_sample_size(kind, round_like, organ_box_size, rng)))
        # the request's own values are the proposal for the fields it has
        for name in V.REPORT_FIELDS + V.OPTIONAL_FIELDS:
            if _given(request, name) is not None and name not in (V.SIZE, V.CT_VALUE):
                out[name] = request[name]
        return out


def _without_enhancement(weights: Mapping[str, float]) -> dict[str, float]:
    """Density weights for a plain scan: ring enhancement and enhancement-bright classes become hypodense."""
    out: dict[str, float] = {}
    for name, w in weights.items():
        key = _HYPO if name in (_RING, _HYPER) else name
        out[key] = out.get(key, 0.0) + w
    return out


def _sample_ct_value(density: str, stone: bool, reference_hu: float, rng: np.random.Generator) -> float:
    """A CT value (HU) a lesion of class ``density`` has next to an organ at ``reference_hu``.

    Hypo- and hyperdense values keep at least :data:`GENERATED_MIN_GAP_HU` from the organ; a hypodense
    one stays above fluid where the organ leaves room for that.
    """
    if stone:
        lo, hi = STONE_HU
        return round(float(rng.uniform(lo, hi)))
    if density == _FLUID:
        lo, hi = FLUID_HU
        hi = max(lo, min(hi, reference_hu - GENERATED_MIN_GAP_HU))  # below the organ too, where it can be
        return round(float(rng.uniform(lo, hi)))
    if density in DENSITY_ABSOLUTE_HU:
        lo, hi = DENSITY_ABSOLUTE_HU[density]
        return round(float(rng.uniform(lo, hi)))
    lo, hi = (reference_hu + d for d in DENSITY_OFFSET_HU.get(density, DENSITY_OFFSET_HU[_HYPO]))
    if density == _HYPO and hi >= FLUID_MAX_HU + FLUID_MARGIN_HU:  # darker than the organ, not as dark as fluid
        lo = max(lo, FLUID_MAX_HU + FLUID_MARGIN_HU)
    return round(float(rng.uniform(lo, hi)))


def _density_band(density: str, reference_hu: float) -> tuple[float, float]:
    """The HU interval a generated lesion of class ``density`` lies in (unbounded where the class is)."""
    gap, iso = GENERATED_MIN_GAP_HU, ISO_GENERATED_HU
    if density in (_HYPO, _RING):
        return -np.inf, reference_hu - gap
    if density == _FLUID:
        return FLUID_HU[0], min(FLUID_HU[1], reference_hu - gap)
    if density == _ISO:
        return reference_hu - iso, reference_hu + iso
    if density == _HYPER:
        return reference_hu + gap, np.inf
    return -np.inf, np.inf


def _sample_tissue_hu(
    tissue: tuple[float, float],
    reference_hu: float,
    rng: np.random.Generator,
    density: str | None = None,
    prefer: str | None = None,
) -> float | None:
    """A value in the tissue's own range (HU) that reads clearly as one density class next to the organ.

    The bands where it would be neither clearly iso- nor clearly hypo/hyperdense are left out. With
    ``density`` (the user's) only its band is kept, and None is returned when nothing is left; else
    the band of ``prefer`` (the kind's likely class) is kept when the range reaches it.
    """
    gap, iso = GENERATED_MIN_GAP_HU, ISO_GENERATED_HU
    pieces = [tissue]
    holes = [(reference_hu - gap, reference_hu - iso), (reference_hu + iso, reference_hu + gap)]
    for a, b in holes:
        pieces = [p for lo, hi in pieces for p in ((lo, min(hi, a)), (max(lo, b), hi)) if p[0] <= p[1]]

    def within(band: str) -> list[tuple[float, float]]:
        lo_d, hi_d = _density_band(band, reference_hu)
        return [(max(lo, lo_d), min(hi, hi_d)) for lo, hi in pieces if max(lo, lo_d) <= min(hi, hi_d)]

    if density is not None:
        pieces = within(density)
        if not pieces:
            return None
    elif prefer is not None and within(prefer):
        pieces = within(prefer)
    if not pieces:  # the whole range sits in a band: take it as it is
        pieces = [tissue]
    lengths = np.asarray([hi - lo for lo, hi in pieces], dtype=np.float64)
    p = lengths / lengths.sum() if lengths.sum() > 0 else np.full(len(pieces), 1.0 / len(pieces))
    lo, hi = pieces[int(rng.choice(len(pieces), p=p))]
    return round(float(rng.uniform(lo, hi)))


def _sample_size(
    kind: LesionKind, round_like: bool, organ_box_size: Sequence[int] | None, rng: np.random.Generator
) -> tuple[int, int, int]:
    lo, hi = kind.size_mm
    if organ_box_size is not None:
        cap = max(1.0, MAX_ORGAN_FRACTION * float(min(organ_box_size)))
        hi = min(hi, cap)
        lo = min(lo, hi)
    diameter = float(rng.uniform(lo, hi))
    spread = 0.15 if round_like else 0.35
    size = [max(1, int(round(diameter * rng.uniform(1 - spread, 1 + spread)))) for _ in range(3)]
    if organ_box_size is not None:
        size = [min(s, max(1, int(MAX_ORGAN_FRACTION * o))) for s, o in zip(size, organ_box_size)]
    return tuple(size)  # type: ignore[return-value]


def complete_report(
    request: Mapping[str, str],
    organ_id: int,
    organ_box_size: Sequence[int],
    proposed: Mapping[str, str],
    rng: np.random.Generator,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    version: str = DEFAULT_VERSION,
    scan: ScanContext | None = None,
) -> LesionReport:
    """The full report of one requested lesion: the user's fields win over the proposed ones.

    Every field is filled (a field the proposal lacks is sampled offline), ``lesion location`` is the
    organ id, the cavity is one the organ admits (a user-given cavity the organ does not admit is an
    error), and the size is in voxels (a user size may be in mm, see :func:`parse_lesion_size`) and
    never exceeds ``organ_box_size`` (array axes, like ``spacing``). The returned report has the box
    size (report axis order: use ``LesionReport.array_box`` / ``with_array_box``) but no centre yet.

    The density class, CT value and enhancement status agree with each other and with ``scan``
    (:func:`measure_scan`; without it, a typical contrast-enhanced organ HU): what was not given is
    made to agree with what was (the user's, then the proposal's own CT value); a contradiction
    between the user's own fields is kept as given and logged as a warning.
    """
    organ_name = label_table(version).name(organ_id)
    fields = [n for n in V.REPORT_FIELDS + V.OPTIONAL_FIELDS if n != V.LOCATION]
    missing = [n for n in fields if not isinstance(proposed.get(n), str) and _given(request, n) is None]
    fallback: Mapping[str, str] = {}
    if missing:
        logger.info("proposal lacks %s; sampling them offline", ", ".join(missing))
        fallback = OfflineReportProvider().propose(request, organ_name, rng, organ_box_size=organ_box_size, scan=scan)

    def pick(name: str) -> str:
        value = _given(request, name)
        if value is not None:
            return value.strip()
        value = proposed.get(name)
        return value.strip() if isinstance(value, str) else fallback[name]

    attrs = {name: str(int(organ_id)) if name == V.LOCATION else pick(name) for name in V.REPORT_FIELDS}

    allowed = allowed_cavities(organ_name)
    user_cavity = _given(request, V.CAVITY)
    if user_cavity is not None:
        cavity = parse_cavity(user_cavity)  # type: ignore[assignment]
        if cavity not in allowed:
            raise LesionDiffusionError(
                f"cavity {user_cavity!r} does not fit the {organ_name} (organ {organ_id}); use one of: {', '.join(allowed)}"
            )
    else:
        proposed_cavity = parse_cavity(pick(V.CAVITY))
        cavity = proposed_cavity if proposed_cavity in allowed else allowed[int(rng.integers(2))]
    attrs[V.CAVITY] = cavity

    size_text = attrs[V.SIZE]
    try:
        size = parse_lesion_size(size_text, spacing)
    except LesionDiffusionError:
        if _given(request, V.SIZE) is not None:
            raise
        logger.warning("proposed size %r is unreadable; sampling one", size_text)
        size = _sample_size(lesion_kind(request.get(LESION_TYPE, "")), True, organ_box_size, rng)
    bounded = bound_size(size, organ_box_size)
    if bounded != tuple(size):
        logger.warning(
            "lesion size %s exceeds the %s box %s; using %s", tuple(size), organ_name, tuple(organ_box_size), bounded
        )
    attrs[V.SIZE] = format_size(to_report_axes(bounded))

    hu = read_hu(attrs[V.CT_VALUE])
    hu_from_proposal = hu is not None and _given(request, V.CT_VALUE) is None and V.CT_VALUE not in missing
    if hu is None:
        if _given(request, V.CT_VALUE) is not None:
            raise LesionDiffusionError(
                f"cannot read the CT value {attrs[V.CT_VALUE]!r}: give a number of HU, e.g. '40 HU'"
            )
        hu = (
            parse_ct_value(fallback[V.CT_VALUE])
            if fallback
            else _sample_ct_value(_HYPO, False, typical_organ_hu(organ_name), rng)
        )
    attrs[V.CT_VALUE] = format_ct_value(hu)
    _agree_with_scan(attrs, request, organ_name, scan, rng, density_from_value=hu_from_proposal)

    note = str(request.get(LESION_TYPE, "")).strip()
    return LesionReport(int(organ_id), attrs, None, to_report_axes(bounded), summary=attrs[V.SHAPE], note=note)


def _agree_with_scan(
    attrs: dict[str, str],
    request: Mapping[str, str],
    organ_name: str,
    scan: ScanContext | None,
    rng: np.random.Generator,
    density_from_value: bool,
) -> None:
    """Make density, CT value and enhancement status of ``attrs`` agree with each other and the scan (in place).

    The user's fields stay; of the others, the density follows a CT value the user gave (or, with
    ``density_from_value``, one the proposal made itself), else the CT value follows the density;
    the enhancement status follows the scan's contrast. What still disagrees is the user's and is
    logged as a warning.
    """
    user = {n for n in (V.DENSITY, V.CT_VALUE, V.ENHANCEMENT) if _given(request, n) is not None}
    reference = scan.reference_hu if scan is not None else typical_organ_hu(organ_name)
    densities = V.parse_classes(V.DENSITY, attrs[V.DENSITY])[0]
    hu = read_hu(attrs[V.CT_VALUE])
    conflict = (
        None
        if hu is None
        else next((c for c in (density_conflict(d, hu, reference, organ_name) for d in densities) if c), None)
    )
    if conflict and not {V.DENSITY, V.CT_VALUE} <= user:
        if V.CT_VALUE in user or (V.DENSITY not in user and density_from_value):
            homogeneous = "heterogeneous" not in V.parse_classes(V.DENSITY_VARIATIONS, attrs[V.DENSITY_VARIATIONS])[0]
            attrs[V.DENSITY] = V.format_classes([density_for_value(hu, reference, organ_name, homogeneous)])  # type: ignore[arg-type]
            logger.info("%s; density set to %s", conflict, attrs[V.DENSITY])
        else:
            stone = "stone" in V.parse_classes(V.SPECIFIC, attrs.get(V.SPECIFIC, ""))[0]
            attrs[V.CT_VALUE] = format_ct_value(_sample_ct_value(densities[0], stone, reference, rng))
            logger.info("%s; CT value set to %s", conflict, attrs[V.CT_VALUE])
    if scan is not None and V.ENHANCEMENT not in user and scan.contrast is not None:
        if report_conflicts({V.ENHANCEMENT: attrs[V.ENHANCEMENT]}, organ_name, scan):
            logger.info(
                "enhancement status %r replaced by %r (%s)", attrs[V.ENHANCEMENT], scan.enhancement, scan.describe()
            )
            attrs[V.ENHANCEMENT] = scan.enhancement
    for problem in report_conflicts(attrs, organ_name, scan, reference_hu=reference):
        logger.warning("the request's own fields disagree with the scan: %s (kept as given)", problem)


def _plain_number(text: str) -> float | None:
    m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?)\s*,?\s*", text or "")
    return float(m.group(1)) if m else None


# ---- extraction --------------------------------------------------------------------------------------
def _edt(mask: np.ndarray, spacing: Sequence[float], border_outside: bool = True) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it (0 outside).

    ``border_outside``: the image border counts as outside (an organ cut by it is no deeper there);
    else only real outside voxels count (for distances to a region such as the lesion).
    """
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    if not border_outside:
        if mask.all():
            return np.full(mask.shape, np.inf, np.float32)
        return ndi.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    padded = np.pad(mask, 1)
    return ndi.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1].astype(np.float32)


def _crop_box(mask: np.ndarray, margin: int, shape: Sequence[int]) -> tuple[slice, ...]:
    first, last = mask_bounds(mask)
    lo = np.maximum(first - margin, 0)
    hi = np.minimum(last + 1 + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def infer_organ_id(label: np.ndarray, organ_seg: np.ndarray) -> int:
    """The organ a lesion lies in: the organ-map label most common under label 1, else under the lesion
    or right around it."""
    seg, lab = label_ids(organ_seg), label_ids(label)

    def most_common(ids: np.ndarray) -> int | None:
        ids = ids[ids > 0].astype(np.int64)
        return int(np.bincount(ids).argmax()) if ids.size else None

    found = most_common(seg[lab == 1])
    lesion = lab == 2
    if found is None and lesion.any():
        # the lesion and its 2-voxel dilation both lie inside this box: no whole-volume dilation
        box = _crop_box(lesion, 3, lesion.shape)
        found = most_common(seg[box][lesion[box]])
        if found is None:
            found = most_common(seg[box][ndi.binary_dilation(lesion[box], iterations=2)])
    if found is None:
        raise LesionDiffusionError(
            "cannot tell the lesion's organ: the organ map has no label under the label map's organ or lesion"
        )
    return found


def organ_reference_hu(
    image_hu: np.ndarray, organ: np.ndarray, spacing: Sequence[float], exclude: np.ndarray | None = None
) -> float | None:
    """Median HU of an organ's parenchyma: away from its rim and from ``exclude`` (e.g. the lesion).

    Falls back to the whole organ (minus ``exclude``) when the organ is too thin for that; None when
    the organ has no voxels left at all.
    """
    organ = np.asarray(organ, dtype=bool)
    if not organ.any():
        return None
    # distances are only needed around the organ: work in its bounding box (small even for a whole CT)
    margin = int(np.ceil(LESION_MARGIN_MM / min(float(s) for s in spacing))) + 1
    box = _crop_box(organ, margin, organ.shape)
    organ, image = organ[box], np.asarray(image_hu)[box]
    excluded = np.zeros_like(organ) if exclude is None else np.asarray(exclude, dtype=bool)[box]
    free = organ & ~excluded
    if excluded.any():  # distances to the excluded region, computed only around it
        near_box = _crop_box(excluded, margin, excluded.shape)
        near = np.zeros_like(excluded)
        near[near_box] = _edt(~excluded[near_box], spacing, border_outside=False) <= LESION_MARGIN_MM
        free &= ~near
    core = free & (_edt(organ, spacing) > ORGAN_RIM_MM)
    for region in (core, free, organ & ~excluded):
        if np.count_nonzero(region) >= MIN_REFERENCE_VOXELS:
            return float(np.median(image[region]))
    region = organ & ~excluded
    return float(np.median(image[region])) if region.any() else None


def _smoothed_inside(image_hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Gaussian smoothing restricted to ``mask`` (normalised convolution); values at ``mask`` voxels."""
    sigma = [max(SMOOTH_SIGMA_MM / float(s), SMOOTH_MIN_VOXELS) for s in spacing]
    m = mask.astype(np.float32)
    num = ndi.gaussian_filter(image_hu.astype(np.float32) * m, sigma, truncate=3.0)
    den = ndi.gaussian_filter(m, sigma, truncate=3.0)
    return (num[mask] / np.maximum(den[mask], 1e-6)).astype(np.float64)


@dataclass(frozen=True)
class LesionMeasurements:
    """The numbers behind an extracted report (HU, mm or fractions; ``centre``/``size`` in array axes)."""

    organ_id: int
    centre: tuple[int, int, int]
    size: tuple[int, int, int]
    size_mm: tuple[float, float, float]
    volume_mm3: float
    mean_hu: float
    core_hu: float
    reference_hu: float | None
    smoothed_std_hu: float
    increased_fraction: float
    decreased_fraction: float
    below_organ_fraction: float
    above_organ_fraction: float
    solidity: float
    elongation: float
    equivalent_diameter_mm: float
    centre_depth_mm: float
    organ_shell_fraction: float
    adjacent_fraction: float
    edge_contrast_hu: float
    edge_sharpness: float
    aorta_hu: float | None


def _shape_metrics(lesion: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(solidity, elongation) of a binary mask in physical space.

    Solidity is digital: the lesion's voxel count over the count of voxel centres inside the convex
    hull of its voxel centres (1 for any convex shape, whatever its size). Elongation is the ratio of
    the longest to the shortest principal axis.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    pts = np.argwhere(lesion).astype(np.float64) * sp
    if len(pts) < 4:
        return 1.0, 1.0
    eig = np.sort(np.clip(np.linalg.eigvalsh(np.cov(pts.T)), 1e-9, None))
    elongation = float(np.sqrt(eig[-1] / eig[0]))
    surface = np.argwhere(lesion & ~ndi.binary_erosion(lesion)).astype(np.float64) * sp
    try:
        hull = ConvexHull(surface)
    except QhullError:  # flat lesions (one voxel thick) are their own hull
        return 1.0, elongation
    normals, offsets = hull.equations[:, :3], hull.equations[:, 3]
    grid = np.argwhere(np.ones(lesion.shape, bool)).astype(np.float64) * sp
    inside = 0
    for start in range(0, len(grid), 16384):  # half-space test in chunks: bounded memory
        block = grid[start : start + 16384]
        inside += int(np.count_nonzero(np.all(block @ normals.T + offsets <= 1e-6, axis=1)))
    return min(1.0, float(len(pts)) / max(inside, 1)), elongation


def _edge_profile(
    image_hu: np.ndarray, lesion: np.ndarray, organ: np.ndarray, spacing: Sequence[float]
) -> tuple[float, float]:
    """(contrast, sharpness): the HU step from the lesion to the organ around it, and its share within +-1 mm.

    The outside profile is taken in the organ (the margin is the lesion-parenchyma interface); where
    the lesion has too little organ around it (it protrudes), all outside voxels count.
    """
    inside = _edt(lesion, spacing, border_outside=False)  # >0 in the lesion
    outside = _edt(~lesion, spacing, border_outside=False)  # >0 outside
    near, far = 1.0, PROFILE_FAR_MM
    around = organ if np.count_nonzero(organ & (outside <= far[1])) >= MIN_REFERENCE_VOXELS else ~lesion
    # inside the lesion, only the part facing that tissue (not the part facing fat or another organ)
    facing = _edt(~around, spacing, border_outside=False)
    inner_far = lesion & (inside > far[0]) & (inside <= far[1]) & (facing <= far[1] + near)
    outer_far = around & (outside > far[0]) & (outside <= far[1])
    inner_near = lesion & (inside <= near) & (facing <= 2 * near)
    outer_near = around & (outside <= near)
    if not (inner_near.any() and outer_near.any() and outer_far.any()):
        return 0.0, 0.0
    if not inner_far.any():  # a lesion thinner than 4 mm: its deepest voxels stand for the inside
        inner_far = lesion & (inside >= inside[lesion].max())
    a, b = float(image_hu[inner_far].mean()), float(image_hu[outer_far].mean())
    c, d = float(image_hu[inner_near].mean()), float(image_hu[outer_near].mean())
    contrast = a - b
    if abs(contrast) < 1e-6:
        return 0.0, 0.0
    return contrast, float(np.clip((c - d) / contrast, 0.0, 1.0))


def measure_lesion(
    image_hu: np.ndarray,
    label: np.ndarray,
    organ_seg: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    organ_id: int | None = None,
    version: str = DEFAULT_VERSION,
) -> LesionMeasurements:
    """Measure the lesion (label 2) of a case; arrays must share one grid with voxel size ``spacing``."""
    # whole-volume arrays stay as given (a 512 x 512 x 300 CT is large); float copies only of crops
    image = np.asarray(image_hu)
    lab, seg = label_ids(label), label_ids(organ_seg)
    if not (image.shape == lab.shape == seg.shape) or image.ndim != 3:
        raise LesionDiffusionError(
            f"image {image.shape}, label {lab.shape} and organ map {seg.shape} must be 3D arrays of one shape"
        )
    spacing = tuple(float(s) for s in spacing)
    lesion_full = lab == 2
    if not lesion_full.any():
        raise LesionDiffusionError("the label map has no lesion voxels (label 2)")
    if organ_id is None:
        organ_id = infer_organ_id(lab, seg)
    table = label_table(version)
    table.name(organ_id)  # unknown ids are an error naming the table

    # box in voxels: centre = min corner + size // 2, so [centre - size // 2, +size) is the bounding box
    lo, hi = mask_bounds(lesion_full)
    size = tuple(int(v) for v in hi - lo + 1)
    centre = tuple(int(v) for v in lo + np.asarray(size) // 2)

    # work on a crop around the lesion: everything measured lies within a few cm of it
    margin = int(np.ceil(max(20.0, HOLLOW_WALL_MM * 4) / min(spacing)))
    crop = _crop_box(lesion_full, margin, lab.shape)
    img, les, sg, lb = image[crop].astype(np.float32), lesion_full[crop], seg[crop], lab[crop]
    organ_with = (sg == organ_id) | (lb >= 1)
    organ = organ_with & ~les

    mean_hu = float(img[les].mean(dtype=np.float64))
    organ_name = table.name(organ_id)
    hollow = organ_name in HOLLOW_ORGANS
    # the parenchyma reference comes from the whole organ, not just the crop
    whole_organ = ((seg == organ_id) | (lab == 1)) & ~lesion_full
    measured = None if hollow else organ_reference_hu(image, whole_organ, spacing, exclude=lesion_full)
    reference = density_reference_hu(organ_name, measured)  # a typical value when the organ has no voxel left

    smooth = _smoothed_inside(img, les, spacing)
    median = float(np.median(smooth))
    ref = reference if reference is not None else median
    n_vox = float(les.sum())
    volume = n_vox * float(np.prod(spacing))
    solidity, elongation = _shape_metrics(les[_crop_box(les, 1, les.shape)], spacing)
    depth = _edt(organ_with | les, spacing)
    c_local = tuple(int(c - s.start) for c, s in zip(centre, crop))
    shell = ndi.binary_dilation(les) & ~les
    adj_shell = (_edt(~les, spacing, border_outside=False) <= ADJACENT_SHELL_MM) & ~les
    others = (sg > 0) & (sg != organ_id) & ~(lb >= 1)
    contrast, sharpness = _edge_profile(img, les, organ, spacing)
    aorta_hu = vessel_hu(image, seg == table.id(AORTA), spacing) if _has(table, AORTA) else None
    return LesionMeasurements(
        organ_id=int(organ_id),
        centre=centre,  # type: ignore[arg-type]
        size=size,  # type: ignore[arg-type]
        size_mm=tuple(round(s * sp, 1) for s, sp in zip(size, spacing)),  # type: ignore[arg-type]
        volume_mm3=volume,
        mean_hu=mean_hu,
        core_hu=median,
        reference_hu=reference,
        smoothed_std_hu=float(smooth.std()),
        increased_fraction=float(np.mean(smooth > median + AREA_DELTA_HU)),
        decreased_fraction=float(np.mean(smooth < median - AREA_DELTA_HU)),
        below_organ_fraction=float(np.mean(smooth < ref - ISO_HU)),
        above_organ_fraction=float(np.mean(smooth > ref + ISO_HU)),
        solidity=solidity,
        elongation=elongation,
        equivalent_diameter_mm=float((6.0 * volume / np.pi) ** (1.0 / 3.0)),
        centre_depth_mm=float(depth[c_local]),
        organ_shell_fraction=float(organ_with[shell].mean()) if shell.any() else 1.0,
        adjacent_fraction=float(others[adj_shell].mean()) if adj_shell.any() else 0.0,
        edge_contrast_hu=contrast,
        edge_sharpness=sharpness,
        aorta_hu=aorta_hu,
    )


def density_class(m: LesionMeasurements, organ_name: str, homogeneous: bool) -> str:
    """The density class of measured lesion ``m`` relative to its organ (thresholds above)."""
    # the median of the smoothed lesion: partial volume at the rim does not pull it toward the organ
    ref = m.reference_hu if m.reference_hu is not None else m.core_hu
    mixed = m.below_organ_fraction >= MIXED_MIN_FRACTION and m.above_organ_fraction >= MIXED_MIN_FRACTION
    if mixed and organ_group(organ_name) != "lung":  # lung classes are absolute
        return _MIXED
    return density_for_value(m.core_hu, ref, organ_name, homogeneous)


def report_from_measurements(m: LesionMeasurements, version: str = DEFAULT_VERSION) -> LesionReport:
    """The report of a measured lesion, in the original's wording."""
    organ_name = label_table(version).name(m.organ_id)
    hollow = organ_name in HOLLOW_ORGANS
    homogeneous = m.smoothed_std_hu <= HOMOGENEOUS_MAX_STD_HU

    if hollow:
        cavity = V.CAVITY_LUMEN if m.centre_depth_mm > HOLLOW_WALL_MM else V.CAVITY_WALL
    else:
        cavity = V.CAVITY_WITHIN if m.organ_shell_fraction >= WITHIN_MIN_SHELL_FRACTION else V.CAVITY_PROTRUDING
    round_like = m.solidity >= ROUND_MIN_SOLIDITY and m.elongation <= ROUND_MAX_ELONGATION
    if cavity == V.CAVITY_WALL:
        shape = ["irregular wall thickening"]
    elif m.equivalent_diameter_mm <= PUNCTATE_MAX_MM:
        shape = ["punctate"]
    else:
        shape = ["round-like" if round_like else "irregular"]
    if cavity == V.CAVITY_LUMEN:
        shape.append("protrusion into the lumen")

    features = []
    if m.increased_fraction >= AREA_MIN_FRACTION:
        features.append(_INC)
    if m.decreased_fraction >= AREA_MIN_FRACTION:
        features.append(_DEC)
    if m.core_hu >= CALCIFIC_MIN_HU:
        features.append("stone")

    visible = abs(m.edge_contrast_hu) >= MARGIN_MIN_CONTRAST_HU
    well_defined = visible and m.edge_sharpness >= SHARP_MIN_FRACTION
    if m.aorta_hu is None:
        enhancement = ""  # no aorta in the map: the phase cannot be told
    else:
        enhancement = ENHANCED if m.aorta_hu >= ENHANCED_MIN_AORTA_HU else NON_CONTRAST

    attrs = {
        V.ENHANCEMENT: enhancement,
        V.LOCATION: str(m.organ_id),
        V.SHAPE: V.format_classes(shape),
        V.SIZE: format_size(to_report_axes(m.size)),
        V.DENSITY: V.format_classes([density_class(m, organ_name, homogeneous)]),
        V.DENSITY_VARIATIONS: "homogeneous," if homogeneous else "heterogeneous,",
        V.CT_VALUE: format_ct_value(m.mean_hu),
        V.SURFACE: margin_text(organ_name, well_defined) + ",",
        V.RELATIONSHIP: "close relationship with adjacent organs,"
        if m.adjacent_fraction >= ADJACENT_MIN_FRACTION
        else "no close relationship with surrounding organs,",
        V.SPECIFIC: V.format_classes(features),
        V.CAVITY: cavity,
        SIZE_MM: " x ".join(f"{v:g}" for v in to_report_axes(m.size_mm)) + " mm",
    }
    box = to_report_axes(m.centre), to_report_axes(m.size)
    return LesionReport(m.organ_id, attrs, *box, summary=attrs[V.SHAPE], note="")


def extract_report(
    image_hu: np.ndarray,
    label: np.ndarray,
    organ_seg: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    organ_id: int | None = None,
    *,
    version: str = DEFAULT_VERSION,
) -> LesionReport:
    """The report a labelled case would have had, measured from its CT (design 4.1, train side).

    ``image_hu`` (HU), ``label`` (0 background, 1 organ, 2 lesion) and ``organ_seg`` (TotalSegmentator
    ``version`` numbering) share one grid of voxel size ``spacing`` (mm). ``organ_id`` defaults to the
    organ-map label under the label's organ. Size: the lesion's bounding box in voxels (and
    ``size in mm``), in the report's axis order like the box (see the module notes); CT value: mean HU; density: against the organ's parenchyma; homogeneity: spread of
    the smoothed HU; shape: solidity and elongation; cavity: the hollow/solid placement rules;
    relationship: contact with other organs; surface: sharpness of the HU step at the boundary;
    enhancement: aortic HU (empty when the map has no aorta). Pure: arrays in, report out.
    """
    m = measure_lesion(image_hu, label, organ_seg, spacing, organ_id, version)
    return report_from_measurements(m, version)
