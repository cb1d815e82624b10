"""Lesion attributes: the pieces report generation and report extraction share.

- The lesion kinds and their priors (:class:`LesionKind`, :func:`lesion_kind`), organ groups and cavities,
  typical organ HU and the density classes against an organ (:func:`density_for_value`,
  :func:`density_reference_hu`), margins and their edge widths, sizes (:func:`parse_lesion_size`).
- The scan a lesion is written into (:class:`ScanContext`, :func:`contrast_phase`) and what in a report
  disagrees with it (:func:`report_conflicts`).
- Every extraction threshold, a named constant with the reason for its value.

**Generation** (:mod:`lesiondiffusion.reports.generation`): a request holds at least ``organ type`` and
``lesion type`` plus any report field the user wants fixed; a provider proposes every field and
``complete_report`` merges. **Extraction** (:mod:`lesiondiffusion.reports.extraction`): a lesion measured
in a CT (HU), its label map (0/1/2) and organ map, arrays in, report out; and the scan measured
(``measure_scan``: the host organ's HU, the contrast phase from the aorta and portal vein).

Sizes are in voxels of the standardised 1 mm grid unless a ``spacing`` is given.

Axis order. Arrays, ``organ_box_size`` and ``LesionMeasurements`` use the array (NIfTI voxel)
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

from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import (
    HOLLOW_ORGANS,
    LabelTable,
    UnknownOrganError,
)
from lesiondiffusion.report import (
    LesionReport,
    from_report_axes,
    parse_ct_value,
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


HYPODENSE, ISODENSE, HYPERDENSE = "hypodense lesion", "isodense lesion", "hyperdense lesion"
MIXED_DENSITY, FLUID_LIKE = "mixed-density lesion", "hypoattenuating fluid-like lesion"
HYPO_CLASS, FLUID_CLASS = (
    HYPODENSE,
    FLUID_LIKE,
)  # fluid-like is the hypodense class of water-density, homogeneous lesions
RING_ENHANCEMENT = "ring enhancement"
GROUND_GLASS, SOLID_MASS = "low-density ground-glass opacity", "isodense soft tissue mass"
INCREASED_AREAS, DECREASED_AREAS = "presence of increased density areas", "presence of decreased density areas"

# The first kind with a keyword in the lesion type wins: a "haemorrhagic cyst" is blood, a "cystic
# teratoma" fat-containing.
LESION_KINDS: tuple[LesionKind, ...] = (
    LesionKind(
        "haemorrhage",
        ("hemorrhag", "haemorrhag", "hematoma", "haematoma", "bleed"),
        {HYPERDENSE: 0.6, ISODENSE: 0.4},
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
        {HYPODENSE: 1.0},
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
        {FLUID_LIKE: 1.0},
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
        {HYPERDENSE: 1.0},
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
    LesionKind(
        "polyp", ("polyp", "papilloma"), {ISODENSE: 0.7, HYPERDENSE: 0.3}, 0.1, 0.8, 0.8, 0.0, 1.0, 0.6, (5, 20)
    ),
    LesionKind(
        "hemangioma",
        ("hemangioma", "haemangioma", "angioma"),
        {HYPERDENSE: 0.6, HYPODENSE: 0.4},
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
        {RING_ENHANCEMENT: 0.5, HYPODENSE: 0.5},
        0.7,
        0.5,
        0.3,
        0.3,
        0.5,
        0.7,
        (20, 60),
        {DECREASED_AREAS: 0.5},
    ),
    LesionKind(
        "nodule",
        ("nodule", "nodular", "granuloma"),
        {ISODENSE: 0.5, HYPODENSE: 0.3, HYPERDENSE: 0.2},
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
        {HYPODENSE: 0.55, ISODENSE: 0.2, MIXED_DENSITY: 0.15, HYPERDENSE: 0.1},
        0.6,
        0.35,
        0.35,
        0.3,
        0.4,
        0.6,
        (15, 60),
        {INCREASED_AREAS: 0.2, DECREASED_AREAS: 0.4, "spiculated margins": 0.1},
    ),
)
HOLLOW_TUMOUR_DENSITY = {ISODENSE: 0.6, HYPODENSE: 0.2, HYPERDENSE: 0.2}
GENERIC_KIND = LesionKind(
    "generic", (), {HYPODENSE: 0.5, ISODENSE: 0.3, HYPERDENSE: 0.2}, 0.4, 0.5, 0.5, 0.2, 0.5, 0.7, (10, 40)
)

# CT value relative to the organ reference, per density class: (low, high) offsets in HU.
DENSITY_OFFSET_HU: dict[str, tuple[float, float]] = {
    HYPODENSE: (-50.0, -20.0),
    ISODENSE: (-ISO_GENERATED_HU, ISO_GENERATED_HU),
    HYPERDENSE: (20.0, 60.0),
    MIXED_DENSITY: (-15.0, 5.0),
    RING_ENHANCEMENT: (-40.0, -20.0),
}
# Absolute CT values (HU) for classes defined by their own attenuation.
DENSITY_ABSOLUTE_HU: dict[str, tuple[float, float]] = {
    FLUID_LIKE: FLUID_HU,
    GROUND_GLASS: (-700.0, -400.0),
    SOLID_MASS: (20.0, 50.0),
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
            return SOLID_MASS
        return GROUND_GLASS if hu >= GROUND_GLASS_MIN_HU else ISODENSE
    delta = hu - reference_hu
    if delta < -ISO_HU:
        return FLUID_LIKE if FLUID_MIN_HU <= hu <= FLUID_MAX_HU and homogeneous else HYPODENSE
    return HYPERDENSE if delta > ISO_HU else ISODENSE


def density_conflict(density: str, hu: float, reference_hu: float, organ_name: str) -> str | None:
    """Why a lesion of class ``density`` cannot have mean ``hu`` next to an organ at ``reference_hu``; None if it can.

    Below / above mean more than :data:`ISO_HU` from the organ, as the extractor reads it back.
    """
    delta = hu - reference_hu
    at = f"{density!r} at {hu:.0f} HU"
    organ = f"the {organ_name}'s {reference_hu:.0f} HU"
    if density in (HYPODENSE, FLUID_LIKE, RING_ENHANCEMENT) and delta >= -ISO_HU:
        return f"{at} is not below {organ} by more than {ISO_HU:g} HU"
    if density == FLUID_LIKE and not FLUID_MIN_HU <= hu <= FLUID_MAX_HU:
        return f"{at} is not fluid ({FLUID_MIN_HU:g} to {FLUID_MAX_HU:g} HU)"
    if density == ISODENSE and abs(delta) > ISO_HU and organ_group(organ_name) != "lung":
        return f"{at} is not within {ISO_HU:g} HU of {organ}"
    if density == HYPERDENSE and delta <= ISO_HU:
        return f"{at} is not above {organ} by more than {ISO_HU:g} HU"
    if density == SOLID_MASS and hu < LUNG_SOLID_MIN_HU:
        return f"{at} is below soft tissue ({LUNG_SOLID_MIN_HU:g} HU)"
    if density == GROUND_GLASS and not GROUND_GLASS_MIN_HU <= hu < LUNG_SOLID_MIN_HU:
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
    if contrast is False and RING_ENHANCEMENT in densities and V.DENSITY not in fixed:
        problems.append(f"{RING_ENHANCEMENT!r} needs contrast, and this is a plain scan ({scan.describe()})")  # type: ignore[union-attr]
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


def _plain_number(text: str) -> float | None:
    m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?)\s*,?\s*", text or "")
    return float(m.group(1)) if m else None
