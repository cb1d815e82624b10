"""Report extraction: a lesion measured in its CT (HU), label map (0/1/2) and organ map, and the scan the
lesion is written into (the organ's parenchyma HU, the contrast phase from the aorta and portal vein).

Arrays in, report out: :func:`extract_report` (preprocess train, the real-CT dataset and the evaluation
of synthetic lesions), :func:`measure_lesion` and :func:`measure_scan`. Every threshold is a named
constant of :mod:`lesiondiffusion.attributes`, with the reason for its value.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import (
    ADJACENT_MIN_FRACTION,
    ADJACENT_SHELL_MM,
    AORTA,
    AREA_DELTA_HU,
    AREA_MIN_FRACTION,
    CALCIFIC_MIN_HU,
    DECREASED_AREAS,
    ENHANCED,
    ENHANCED_MIN_AORTA_HU,
    HOLLOW_WALL_MM,
    HOMOGENEOUS_MAX_STD_HU,
    INCREASED_AREAS,
    ISO_HU,
    LESION_MARGIN_MM,
    MARGIN_MIN_CONTRAST_HU,
    MIN_REFERENCE_VOXELS,
    MIN_VESSEL_VOXELS,
    MIXED_DENSITY,
    MIXED_MIN_FRACTION,
    NON_CONTRAST,
    ORGAN_RIM_MM,
    PORTAL_VEIN,
    PROFILE_FAR_MM,
    PUNCTATE_MAX_MM,
    ROUND_MAX_ELONGATION,
    ROUND_MIN_SOLIDITY,
    SHARP_MIN_FRACTION,
    SIZE_MM,
    SMOOTH_MIN_VOXELS,
    SMOOTH_SIGMA_MM,
    VESSEL_CORE_MM,
    WITHIN_MIN_SHELL_FRACTION,
    ScanContext,
    _has,
    contrast_phase,
    density_for_value,
    density_reference_hu,
    margin_text,
    organ_group,
)
from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.labels import (
    DEFAULT_VERSION,
    HOLLOW_ORGANS,
    LESION_LABEL,
    label_ids,
    label_table,
    mask_bounds,
)
from lesiondiffusion.report import (
    LesionReport,
    format_ct_value,
    format_size,
    to_report_axes,
)

logger = logging.getLogger(__name__)


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
    lesion = lab == LESION_LABEL
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
    # distances are only needed around the organ: work in its bounding box (small even for a whole CT); one
    # voxel of outside around it gives the organ's own distances exactly, the excluded region's need more
    margin = 1 if exclude is None else int(np.ceil(LESION_MARGIN_MM / min(float(s) for s in spacing))) + 1
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
    lesion_full = lab == LESION_LABEL
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
        return MIXED_DENSITY
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
        features.append(INCREASED_AREAS)
    if m.decreased_fraction >= AREA_MIN_FRACTION:
        features.append(DECREASED_AREAS)
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
