"""Report generation: the offline provider proposes every report field for a request, and
:func:`complete_report` merges a provider's proposal with the request, the organ and the scan.

The user's fields win, the cavity is made consistent with the organ, the size is bounded by the organ's
box, and the CT value sits against the organ measured in the scan as its density class says
(:func:`lesiondiffusion.attributes.report_conflicts` names what disagrees).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import (
    DECREASED_AREAS,
    DENSITY_ABSOLUTE_HU,
    DENSITY_OFFSET_HU,
    ENHANCED,
    FLUID_HU,
    FLUID_LIKE,
    FLUID_MARGIN_HU,
    FLUID_MAX_HU,
    GENERATED_MIN_GAP_HU,
    GROUND_GLASS,
    HOLLOW_TUMOUR_DENSITY,
    HYPERDENSE,
    HYPODENSE,
    INCREASED_AREAS,
    ISO_GENERATED_HU,
    ISODENSE,
    LESION_TYPE,
    MAX_ORGAN_FRACTION,
    MIXED_DENSITY,
    RING_ENHANCEMENT,
    SOLID_MASS,
    STONE_HU,
    LesionKind,
    ScanContext,
    allowed_cavities,
    bound_size,
    density_conflict,
    density_for_value,
    density_reference_hu,
    is_hollow_name,
    lesion_kind,
    margin_text,
    organ_group,
    parse_cavity,
    parse_lesion_size,
    read_hu,
    report_conflicts,
    typical_organ_hu,
)
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import (
    DEFAULT_VERSION,
    label_table,
)
from lesiondiffusion.report import (
    LesionReport,
    format_ct_value,
    format_size,
    parse_ct_value,
    to_report_axes,
)

logger = logging.getLogger(__name__)


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
                    {GROUND_GLASS: 0.5, SOLID_MASS: 0.5}
                    if kind.name in ("tumour", "nodule", "generic")
                    else kind.density
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
            hetero = density[0] == MIXED_DENSITY or rng.random() < kind.heterogeneous
            variations = ["heterogeneous" if hetero and density[0] != FLUID_LIKE else "homogeneous"]
        out[V.DENSITY_VARIATIONS] = V.format_classes(variations)

        features = _given_classes(request, V.SPECIFIC)
        if not features and _given(request, V.SPECIFIC) is None:
            for feature, p in kind.features.items():
                if rng.random() < p:
                    features.append(feature)
            if variations == ["heterogeneous"] and not any(f in (INCREASED_AREAS, DECREASED_AREAS) for f in features):
                features += [DECREASED_AREAS] if rng.random() < 0.5 else [INCREASED_AREAS, DECREASED_AREAS]
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
        key = HYPODENSE if name in (RING_ENHANCEMENT, HYPERDENSE) else name
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
    if density == FLUID_LIKE:
        lo, hi = FLUID_HU
        hi = max(lo, min(hi, reference_hu - GENERATED_MIN_GAP_HU))  # below the organ too, where it can be
        return round(float(rng.uniform(lo, hi)))
    if density in DENSITY_ABSOLUTE_HU:
        lo, hi = DENSITY_ABSOLUTE_HU[density]
        return round(float(rng.uniform(lo, hi)))
    lo, hi = (reference_hu + d for d in DENSITY_OFFSET_HU.get(density, DENSITY_OFFSET_HU[HYPODENSE]))
    if density == HYPODENSE and hi >= FLUID_MAX_HU + FLUID_MARGIN_HU:  # darker than the organ, not as dark as fluid
        lo = max(lo, FLUID_MAX_HU + FLUID_MARGIN_HU)
    return round(float(rng.uniform(lo, hi)))


def _density_band(density: str, reference_hu: float) -> tuple[float, float]:
    """The HU interval a generated lesion of class ``density`` lies in (unbounded where the class is)."""
    gap, iso = GENERATED_MIN_GAP_HU, ISO_GENERATED_HU
    if density in (HYPODENSE, RING_ENHANCEMENT):
        return -np.inf, reference_hu - gap
    if density == FLUID_LIKE:
        return FLUID_HU[0], min(FLUID_HU[1], reference_hu - gap)
    if density == ISODENSE:
        return reference_hu - iso, reference_hu + iso
    if density == HYPERDENSE:
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
            else _sample_ct_value(HYPODENSE, False, typical_organ_hu(organ_name), rng)
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
