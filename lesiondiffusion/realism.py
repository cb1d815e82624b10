"""Synthetic lesions beside ground-truth lesions of the same kind (``lesiondiffusion evaluate --reference``).

The reference is a labelled dataset in the datalist format ``make-dataset`` writes (a ``datalist.json``
or a folder holding one; every split counts): per case a CT, a 0/1/2 label map, a ``type.json`` report
and optionally an organ map. Each case with lesion voxels is one reference lesion (all its label-2
voxels, as a synthetic case's are measured), described by its report's organ, density class and
margin class, and measured by :func:`lesiondiffusion.lesion_metrics.lesion_measures`.

Per synthetic case (:func:`compare_cases`) the matched reference lesions are those of the same organ
(:func:`lesiondiffusion.attributes.organ_group`) and density class, else of the organ alone, else all
(``reference.match`` says which); for the interior fraction, the reference lesions of the same size
(:func:`same_size`: equivalent diameter in voxels, any organ, since the interior share of a digital
shape depends on its size in voxels, not on the organ). Checks, following the design targets:

- ``solid``: fill ratio >= :data:`MIN_FILL_RATIO`;
- ``interior_ok``: interior fraction within :data:`INTERIOR_TOLERANCE` of the matched real lesions' median;
- ``delta_ok``: lesion-minus-organ median HU of the report's sign and within :data:`DELTA_TOLERANCE_HU` of
  the report's CT value minus the organ reference (a report within +-ISO_HU of the organ accepts either sign);
- ``delta_in_reference_range``: that delta within the matched real lesions' 10th-90th percentiles,
  widened by ISO_HU;
- ``noise_ok``: lesion / organ high-pass noise std within :data:`NOISE_RATIO_RANGE`;
- ``not_cuboid``: the lesion fills at most :data:`MAX_BOX_FILL` of its bounding box (a box cut flat by the
  network's window, or saturated, fills 70-100%); lesions under :data:`BOXY_MIN_VOXELS` along an axis are
  not judged: a voxelised ball 8-11 voxels across fills up to 70% of its box (a 30 mm lesion on a 3 mm CT),
  one of 12 or more at most 63%.

The realism distance (:func:`lesiondiffusion.lesion_metrics.frechet_distance`) compares the synthetic
lesions' features with the matched reference lesions', and so do two baselines built in the same run
from the same masks: FLAT (each mask filled with one value, the report's CT value, or the synthetic
lesion's mean HU when the report has none) and COPY-PASTE (the HU offsets from its organ of the matched
reference lesion closest in size, laid into the mask by nearest physical position from the centroid,
on the synthetic organ's reference HU).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from tqdm import tqdm

from lesiondiffusion import attributes as A
from lesiondiffusion import lesion_metrics as L
from lesiondiffusion import vocabulary as V
from lesiondiffusion.dataset import datalist_version, load_cases
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import PathLike, read_nifti_array, user_path, voxel_spacing
from lesiondiffusion.labels import LESION_LABEL, label_table, to_v1_map
from lesiondiffusion.report import read_report
from lesiondiffusion.reports import extraction

logger = logging.getLogger(__name__)

MIN_FILL_RATIO = 0.95
INTERIOR_TOLERANCE = 0.15
DELTA_TOLERANCE_HU = 15.0
NOISE_RATIO_RANGE = (0.7, 1.5)
MAX_BOX_FILL = 0.66
BOXY_MIN_VOXELS = 12
# "Same size" for the interior fraction: equivalent diameters (voxels) within this ratio, else the
# SAME_SIZE_MIN nearest.
SAME_SIZE_RATIO = 1.2
SAME_SIZE_MIN = 3
MEASURES = (
    "fill_ratio",
    "interior_fraction",
    "solidity",
    "sphericity",
    "box_fill",
    "median_delta_hu",
    "noise_std_ratio",
    "edge_width_mm",
)


def same_size(pool: Sequence[ReferenceLesion], diameter_voxels: float) -> list[ReferenceLesion]:
    """The lesions of ``pool`` whose equivalent diameter in voxels is within :data:`SAME_SIZE_RATIO` of
    ``diameter_voxels``, or the :data:`SAME_SIZE_MIN` nearest (by ratio) when fewer are."""

    def ratio(r: ReferenceLesion) -> float:
        d = max(float(r.measures["equivalent_diameter_voxels"] or 0.0), 1e-6)
        return max(d, diameter_voxels) / max(min(d, diameter_voxels), 1e-6)

    ranked = sorted(pool, key=ratio)
    within = [r for r in ranked if ratio(r) <= SAME_SIZE_RATIO]
    return within if len(within) >= SAME_SIZE_MIN else ranked[:SAME_SIZE_MIN]


@dataclass
class ReferenceLesion:
    """A ground-truth lesion: where it came from, its kind, its crop and its measures."""

    source: str
    organ: str
    density: str | None
    margin: str | None
    crop: L.LesionCrop
    measures: dict[str, Any]


def _datalist(path: Path) -> Path:
    if path.is_dir():
        found = path / "datalist.json"
        if not found.is_file():
            raise InputError(
                path, "reference folder holds no datalist.json (give the datalist or the folder make-dataset wrote)"
            )
        return found
    if not path.is_file():
        raise InputError(path, "reference dataset not found")
    return path


def load_reference(path: PathLike) -> list[ReferenceLesion]:
    """Every lesion of a labelled dataset (see the module notes); a case's missing file is an :class:`InputError`."""
    from lesiondiffusion.evaluation import density_of  # the requested-class reader, one place

    datalist = _datalist(user_path(path))
    cases = load_cases(datalist=datalist)
    version = datalist_version(datalist) or "v1"  # make-dataset writes v1 maps and says so
    table = label_table()
    out: list[ReferenceLesion] = []
    for case in tqdm(cases, desc="reference lesions", unit="case"):
        where = case.source or str(case.image)
        if case.label is None or case.report is None:
            raise InputError(datalist, f"{where}: a reference case needs 'label' and 'report'")
        image, img = read_nifti_array(case.image, np.float32)
        label = np.rint(read_nifti_array(case.label)[0]).astype(np.int16)
        if label.shape != image.shape:
            raise InputError(case.label, f"shape {label.shape} differs from the image's {image.shape}")
        lesion = label == LESION_LABEL
        if not lesion.any():
            logger.info("%s: no lesion voxels; not a reference lesion", where)
            continue
        report = read_report(case.report).lesions[0]
        try:
            organ_name = table.name(report.organ_id)
        except LesionDiffusionError as e:
            raise InputError(case.report, str(e)) from None
        organ = label == 1
        if case.organ_seg is not None:
            seg = np.rint(read_nifti_array(case.organ_seg)[0]).astype(np.int32)
            if version == "v2":  # reports name v1 ids
                seg = to_v1_map(seg, version).astype(np.int32)
            if seg.shape == label.shape:
                organ |= seg == report.organ_id
        organ &= ~lesion
        spacing = tuple(float(s) for s in voxel_spacing(img.affine))
        measured = (
            None
            if A.is_hollow_name(organ_name)
            else extraction.organ_reference_hu(image, organ, spacing, exclude=lesion)
        )
        reference_hu = A.density_reference_hu(organ_name, measured)
        crop = L.crop_around(image, lesion, organ, spacing, reference_hu)
        out.append(ReferenceLesion(
            where, organ_name, density_of(report.attributes.get(V.DENSITY)),
            A.margin_class(report.attributes.get(V.SURFACE)), crop, L.lesion_measures(crop),
        ))  # fmt: skip
    if not out:
        raise InputError(datalist, "no reference case has lesion voxels (label 2)")
    logger.info("%d reference lesion(s) from %s", len(out), datalist)
    return out


def match(pool: Sequence[ReferenceLesion], organ: str, density: str | None) -> tuple[list[ReferenceLesion], str]:
    """Reference lesions of the same organ and density class, else the same organ, else all (and which)."""
    same = [r for r in pool if A.organ_group(r.organ) == A.organ_group(organ)]
    both = [r for r in same if density is not None and r.density == density]
    if both:
        return both, "organ+density"
    return (same, "organ") if same else (list(pool), "all")


# ---- baselines ----------------------------------------------------------------------------------------
def flat_crop(crop: L.LesionCrop, value_hu: float) -> L.LesionCrop:
    """``crop`` with its lesion filled with one value."""
    image = crop.image.copy()
    image[crop.lesion] = value_hu
    return L.LesionCrop(image, crop.lesion, crop.organ, crop.spacing, crop.reference_hu)


def _centred_points(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    pts = np.argwhere(mask).astype(np.float64) * np.asarray(spacing, np.float64)
    return pts - pts.mean(axis=0)


def copy_paste_crop(crop: L.LesionCrop, source: ReferenceLesion) -> L.LesionCrop:
    """``crop`` with ``source``'s HU offsets from its organ reference laid into its lesion: each voxel takes
    the source voxel nearest in mm from the centroid (the source's largest 6-connected piece)."""
    src = source.crop
    labels, n = ndi.label(src.lesion, structure=ndi.generate_binary_structure(3, 1))
    piece = labels == (int(np.bincount(labels.ravel())[1:].argmax()) + 1) if n > 1 else src.lesion
    offsets = src.image[piece].astype(np.float64) - float(src.reference_hu or 0.0)
    _, nearest = cKDTree(_centred_points(piece, src.spacing)).query(_centred_points(crop.lesion, crop.spacing))
    image = crop.image.copy()
    image[crop.lesion] = float(crop.reference_hu or 0.0) + offsets[nearest]
    return L.LesionCrop(image, crop.lesion, crop.organ, crop.spacing, crop.reference_hu)


# ---- per case -----------------------------------------------------------------------------------------
def _median(values: Iterable[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return statistics.median(known) if known else None


def _sign(v: float) -> int:
    return 1 if v > A.ISO_HU else -1 if v < -A.ISO_HU else 0


def not_cuboid(measures: Mapping[str, Any]) -> bool | None:
    """The ``not_cuboid`` check of :func:`lesiondiffusion.lesion_metrics.mask_measures`' output (see the module
    notes); None for an empty mask or one too small to tell."""
    if measures.get("box_fill") is None or min(measures["box_voxels"]) < BOXY_MIN_VOXELS:
        return None
    return bool(measures["box_fill"] <= MAX_BOX_FILL)


def case_measures(crop: L.LesionCrop, report_ct_value: float | None, surface: str | None) -> dict[str, Any]:
    """A synthetic lesion's measures and the checks that need no reference (see the module notes)."""
    m = L.lesion_measures(crop)
    delta = m["median_delta_hu"]
    want = None if report_ct_value is None or crop.reference_hu is None else report_ct_value - crop.reference_hu
    m["report_delta_hu"] = want
    m["delta_error_hu"] = None if delta is None or want is None else delta - want
    m["delta_sign_ok"] = None if delta is None or want is None else (_sign(want) == 0 or delta * want > 0)
    m["delta_ok"] = (
        None
        if m["delta_error_hu"] is None
        else bool(m["delta_sign_ok"] and abs(m["delta_error_hu"]) <= DELTA_TOLERANCE_HU)
    )
    ratio = m["noise_std_ratio"]
    m["noise_ok"] = None if ratio is None else NOISE_RATIO_RANGE[0] <= ratio <= NOISE_RATIO_RANGE[1]
    m["solid"] = None if m["fill_ratio"] is None else m["fill_ratio"] >= MIN_FILL_RATIO
    m["not_cuboid"] = not_cuboid(m)
    m["margin_class"] = A.margin_class(surface)
    flat_value = report_ct_value if report_ct_value is not None else float(crop.image[crop.lesion].mean())
    m["flat_features"] = L.features(flat_crop(crop, flat_value), m)
    return m


def compare_case(
    measures: dict[str, Any], crop: L.LesionCrop, organ: str, density: str | None, pool: Sequence[ReferenceLesion]
) -> dict[str, Any]:
    """The matched reference lesions' values beside the case's, the reference checks, and the copy-paste
    baseline's features (added to ``measures``, which is returned)."""
    matched, how = match(pool, organ, density)
    sized = same_size(pool, float(measures["equivalent_diameter_voxels"]))
    same_margin = [r for r in matched if r.margin == measures["margin_class"]] or matched
    deltas = [r.measures["median_delta_hu"] for r in matched if r.measures["median_delta_hu"] is not None]
    ref: dict[str, Any] = {
        "match": how,
        "lesions": len(matched),
        "sources": [r.source for r in matched][:10],
        "fill_ratio": _median(r.measures["fill_ratio"] for r in matched),
        "interior_fraction": _median(r.measures["interior_fraction"] for r in sized),
        "interior_same_size_lesions": len(sized),
        "solidity": _median(r.measures["solidity"] for r in matched),
        "sphericity": _median(r.measures["sphericity"] for r in matched),
        "median_delta_hu": _median(deltas),
        "delta_p10_hu": float(np.percentile(deltas, 10)) if deltas else None,
        "delta_p90_hu": float(np.percentile(deltas, 90)) if deltas else None,
        "noise_std_ratio": _median(r.measures["noise_std_ratio"] for r in matched),
        "edge_width_mm": _median(r.measures["edge_width_mm"] for r in same_margin),
    }
    measures["reference"] = ref
    mine, theirs = measures["interior_fraction"], ref["interior_fraction"]
    measures["interior_ok"] = None if mine is None or theirs is None else abs(mine - theirs) <= INTERIOR_TOLERANCE
    delta = measures["median_delta_hu"]
    measures["delta_in_reference_range"] = (
        None
        if delta is None or not deltas
        else ref["delta_p10_hu"] - A.ISO_HU <= delta <= ref["delta_p90_hu"] + A.ISO_HU
    )
    # copy-paste: the matched real lesion closest in size, its texture and contrast in this mask
    with_features = [r for r in matched if r.measures["features"] is not None]
    if with_features and crop.reference_hu is not None:
        size = measures["equivalent_diameter_voxels"] * float(np.prod(crop.spacing)) ** (1 / 3)
        source = min(
            with_features,
            key=lambda r: abs(
                r.measures["equivalent_diameter_voxels"] * float(np.prod(r.crop.spacing)) ** (1 / 3) - size
            ),
        )
        measures["copy_paste_source"] = source.source
        measures["copy_paste_features"] = L.features(copy_paste_crop(crop, source), measures)
    else:
        measures["copy_paste_source"] = measures["copy_paste_features"] = None
    return measures


# ---- across cases -------------------------------------------------------------------------------------
def _rate(values: Iterable[bool | None]) -> float | None:
    known = [bool(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _rows(items: Iterable[Mapping[str, float] | None]) -> np.ndarray:
    return L.feature_matrix([f for f in items if f is not None])


def _by_class(
    cases: Sequence[dict[str, Any]],
    refs: Sequence[Any],
    case_key: str,
    ref_attr: str,
    measure: str,
    classes: Sequence[Any],
) -> dict[str, dict[str, Any]]:
    """Per class (margin or density): the median ``measure`` of the synthetic cases and of the reference lesions."""
    out = {}
    for cls in classes:
        if cls is None:
            continue
        mine = [c.get(measure) for c in cases if c.get(case_key) == cls]
        theirs = [r.measures[measure] for r in refs if getattr(r, ref_attr) == cls]
        out[cls] = {"synthetic": _median(mine), "ground_truth": _median(theirs), "cases": len(mine),
                    "reference_lesions": len(theirs)}  # fmt: skip
    return out


def realism_totals(
    cases: Sequence[Mapping[str, Any]], pool: Sequence[ReferenceLesion] | None = None, reference: str | None = None
) -> dict[str, Any]:
    """Rates of the checks, medians beside the matched reference lesions', edge width by margin class,
    lesion-minus-organ HU by density class, and the realism distance with its two baselines.

    ``cases``: each evaluated case's realism record with its ``organ``, requested ``density`` and number
    of reported ``lesions``; ``pool``: the reference lesions (None: no reference comparison).
    """
    one_piece = [c["components_6"] == c.get("lesions", 1) for c in cases if c.get("components_6") is not None]
    out: dict[str, Any] = {
        "reference": reference,
        "reference_lesions": len(pool) if pool is not None else 0,
        "cases": len(cases),
        "one_piece_rate": sum(one_piece) / len(one_piece) if one_piece else None,
        "solid_rate": _rate(c.get("solid") for c in cases),
        "interior_ok_rate": _rate(c.get("interior_ok") for c in cases),
        "delta_ok_rate": _rate(c.get("delta_ok") for c in cases),
        "delta_in_reference_range_rate": _rate(c.get("delta_in_reference_range") for c in cases),
        "noise_ok_rate": _rate(c.get("noise_ok") for c in cases),
        "not_cuboid_rate": _rate(c.get("not_cuboid") for c in cases),
    }
    matched: dict[int, ReferenceLesion] = {}
    for c in cases:
        if pool:
            for r in match(pool, c["organ"], c.get("density"))[0]:
                matched[id(r)] = r
    refs = list(matched.values())
    out["matched_reference_lesions"] = len(refs)
    out["synthetic"] = {k: _median(c.get(k) for c in cases) for k in MEASURES}
    out["ground_truth"] = {k: _median(r.measures[k] for r in refs) for k in MEASURES} if refs else None
    margins = sorted({c.get("margin_class") for c in cases} | {r.margin for r in refs}, key=str)
    out["edge_width_by_margin"] = _by_class(cases, refs, "margin_class", "margin", "edge_width_mm", margins)
    densities = sorted({c.get("density") for c in cases if c.get("density")})
    out["delta_by_density"] = _by_class(cases, refs, "density", "density", "median_delta_hu", densities)
    truth = _rows(r.measures["features"] for r in refs)
    sets = {name: _rows(c.get(key) for c in cases) for name, key in
            (("synthetic", "features"), ("flat", "flat_features"), ("copy_paste", "copy_paste_features"))}  # fmt: skip
    scale = L.feature_scale(truth) if len(truth) else None
    fd = {name: (None if scale is None else L.frechet_distance(rows, truth, scale)) for name, rows in sets.items()}
    out["realism_distance"] = {
        **fd,
        "features": list(L.FEATURES),
        "cases_with_features": {name: len(rows) for name, rows in sets.items()},
        "reference_lesions": len(truth),
        "beats_flat": None if fd["synthetic"] is None or fd["flat"] is None else fd["synthetic"] < fd["flat"],
        "beats_copy_paste": None
        if fd["synthetic"] is None or fd["copy_paste"] is None
        else fd["synthetic"] < fd["copy_paste"],
    }
    return out
