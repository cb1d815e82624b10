"""Measuring synthesis outputs against their requests (``lesiondiffusion evaluate``).

Input: a synthesis output folder (``<pred>/<case>/{image,label,organ_seg}.nii.gz, report.json,
provenance.json``, see :mod:`lesiondiffusion_tools.synthesize`) and the requests file that produced it
(:mod:`lesiondiffusion.requests`). Per case, on the input CT's own grid:

- **mask**: the fraction of lesion voxels (label 2) inside the allowed region (the requested organ in
  ``organ_seg.nii.gz``; for a lesion whose report cavity is *protruding*, the organ dilated by the
  lesion's requested radius, i.e. half its largest requested extent); the number of 6-connected
  (face-connected) components against the number of lesions (diagonal contact does not join pieces:
  under 26-connectivity a checkerboard speckle is "one" lesion; the 26-connected count is kept too);
  the label-2 volume (mm^3) against the ellipsoid of the report's ``size`` (``[[a b c]] pixel`` on the standardised 1 mm grid, i.e. mm), as a relative error
  (the "size error"; also given as the equivalent diameter's relative error). With several lesions in a
  case the volumes are summed and the protruding allowance is the largest lesion's;
- **appearance**: the lesion measured as a report would be (:func:`lesiondiffusion.reports.extraction.measure_lesion`):
  core HU minus the organ's parenchyma (sign and magnitude), the density class that gives
  (:func:`~lesiondiffusion.reports.extraction.density_class`) against the requested one, and homogeneity
  (smoothed spread) against the requested one;
- **realism** (:mod:`lesiondiffusion.lesion_metrics`, :mod:`lesiondiffusion.realism`): fill ratio,
  interior fraction, solidity, sphericity; lesion-minus-organ median HU against the report's CT value;
  interior high-pass noise against the host organ's; edge width. With a reference dataset
  (``reference``: ground-truth lesions, e.g. ``make-dataset``'s), each beside the matched real lesions'
  values, and a radiomics-style realism distance to them, with a flat-fill and a copy-paste baseline;
- **preservation**: every voxel at least ``margin_mm`` (the run's ``parameters.margin_mm``) from the
  lesion must hold the input CT's stored value bit for bit; the blend zone (within the margin, outside
  the lesion) is scored by its PSNR in HU against the input.

Across cases: rates and accuracies, per-class density accuracy, median volume error, and *density
ordering*: requests that share image and seed and whose attributes differ only in ``density`` form a
group, and each pair of them with different classes among hypo-, iso- and hyperdense must have its
measured mean lesion HU in that order.

A requested case without a folder (failed synthesis) is listed as missing; a folder whose files are
absent, unreadable or off the input's grid is listed as invalid with a one-line reason. Problems with
what the user gives (the requests file, an input CT) are :class:`~lesiondiffusion.errors.InputError`.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi
from tqdm import tqdm

from lesiondiffusion import attributes as A
from lesiondiffusion import lesion_metrics as L
from lesiondiffusion import realism as R
from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import (
    PathLike,
    StoredImage,
    atomic_path,
    read_json,
    read_stored,
    user_path,
    write_json,
    write_text,
)
from lesiondiffusion.labels import label_ids, label_table
from lesiondiffusion.preview import LUNG_WINDOW, SOFT_TISSUE_WINDOW, before_after, caption_band, request_caption
from lesiondiffusion.report import LesionReport, Report
from lesiondiffusion.reports import extraction
from lesiondiffusion.requests import SynthesisRequest, read_requests

logger = logging.getLogger(__name__)

CASE_FILES = ("image.nii.gz", "label.nii.gz", "organ_seg.nii.gz", "report.json", "provenance.json")
REPORT_FILES = ("evaluation.json", "evaluation.md", "contact_sheet.png")
# The synthesis default, used when a provenance file does not record its margin.
DEFAULT_MARGIN_MM = 3.0
# PSNR peak: the HU range the networks see ([-1000, 1000] HU, the intensity map's ends), so that scores
# compare across scans whatever their own range.
PSNR_RANGE_HU = 2000.0
# Density classes in the order their mean HU must follow (density ordering).
ORDERED_DENSITIES = ("hypodense lesion", "isodense lesion", "hyperdense lesion")
# Expected sign of (lesion core HU - organ reference) beyond +-ISO_HU, per requested class.
_DIRECTION = {
    "hypodense lesion": -1,
    "hypoattenuating fluid-like lesion": -1,
    "ring enhancement": -1,
    "isodense lesion": 0,
    "hyperdense lesion": 1,
}
# Short words users write that the vocabulary's synonym table does not list ("hypodense").
_DENSITY_WORDS = (("fluid", "hypoattenuating fluid-like lesion"), ("mixed", "mixed-density lesion"),
                  ("hypo", "hypodense lesion"), ("low", "hypodense lesion"), ("iso", "isodense lesion"),
                  ("hyper", "hyperdense lesion"), ("high", "hyperdense lesion"))  # fmt: skip
# What the shipped weights must reach on held-out requests: (summary key, comparison, threshold).
TARGETS: dict[str, tuple[str, str, float]] = {
    "masks inside the allowed region": ("inside_rate", ">=", 1.0),
    "voxels beyond the margin unchanged": ("preserved_rate", ">=", 1.0),
    "density-class accuracy": ("density_accuracy", ">=", 0.9),
    "median size error": ("median_volume_error", "<=", 0.3),
    "density ordering": ("density_ordering", ">=", 0.9),
}
MAX_LISTED_VOXELS = 5


class CaseError(LesionDiffusionError):
    """A case folder that cannot be evaluated (file missing, unreadable, off the input's grid)."""


# ---- reading ------------------------------------------------------------------------------------------
def _labels(volume: StoredImage) -> np.ndarray:
    arr = volume.values()
    return label_ids(arr)


def read_case_reports(path: PathLike) -> list[LesionReport]:
    """The lesion reports of ``report.json``: one ``type.json`` dict, or a list of them (several lesions)."""
    obj = read_json(path)
    items = obj if isinstance(obj, list) else [obj]
    if not items:
        raise InputError(path, "empty list of reports")
    return [lesion for item in items for lesion in Report.from_json(item, path).lesions]


def _case_file(reader: Any, path: Path) -> Any:
    """``reader(path)`` for a file of a case folder: its problems make the case invalid, not the run."""
    try:
        return reader(path)
    except InputError as e:
        raise CaseError(str(e)) from None


# ---- requested values ---------------------------------------------------------------------------------
def density_of(text: str | None) -> str | None:
    """The density class a text names: a vocabulary class, else by key word ("hypodense" -> hypodense lesion)."""
    if not text or not str(text).strip():
        return None
    found = V.parse_classes(V.DENSITY, text)[0]
    if found:
        return found[0]
    low = str(text).lower()
    return next((cls for word, cls in _DENSITY_WORDS if word in low), None)


def density_matches(requested: str, measured: str) -> bool:
    """Whether a measured density class fulfils a requested one. A homogeneous lesion at water density
    is read as fluid-like, a kind of hypodense lesion: it fulfils a hypodense request (not the reverse)."""
    return measured == requested or (requested == A.HYPO_CLASS and measured == A.FLUID_CLASS)


def homogeneity_of(text: str | None) -> str | None:
    """ "homogeneous" / "heterogeneous" from a density-variations text, None when it names neither."""
    found = V.parse_classes(V.DENSITY_VARIATIONS, text or "")[0]
    if found:
        return found[0]
    low = str(text or "").lower()
    if "hetero" in low or "inhomo" in low:
        return "heterogeneous"
    return "homogeneous" if "homo" in low else None


def requested_size_mm(report: LesionReport) -> tuple[float, float, float] | None:
    """The report's lesion extent in mm per array axis (its ``size`` is in voxels of the 1 mm grid)."""
    try:
        return tuple(float(v) for v in A.parse_lesion_size(report.attributes.get(V.SIZE, "")))  # type: ignore[return-value]
    except LesionDiffusionError:
        size = report.size
        return None if size is None else tuple(float(v) for v in A.from_report_axes(size))  # type: ignore[return-value]


def ellipsoid_volume_mm3(size_mm: Sequence[float]) -> float:
    """Volume of the ellipsoid with these three diameters."""
    return math.pi / 6.0 * float(np.prod([float(s) for s in size_mm]))


# ---- measurements -------------------------------------------------------------------------------------
def _grow(mask: np.ndarray, spacing: Sequence[float], mm: float) -> tuple[slice, ...]:
    """``mask``'s bounding box grown by ``mm`` (+1 voxel), clipped to the array."""
    box = []
    for axis, sp in enumerate(spacing):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        grow = int(math.ceil(mm / float(sp))) + 1
        box.append(slice(max(int(hit[0]) - grow, 0), min(int(hit[-1]) + grow + 1, mask.shape[axis])))
    return tuple(box)


def inside_fraction(lesion: np.ndarray, organ: np.ndarray, spacing: Sequence[float], dilate_mm: float = 0.0) -> float:
    """Fraction of ``lesion`` voxels within ``dilate_mm`` of ``organ`` (0: inside the organ itself)."""
    n = int(np.count_nonzero(lesion))
    if n == 0:
        return 0.0
    if dilate_mm <= 0:
        return float(np.count_nonzero(lesion & organ)) / n
    # only distances from lesion voxels are needed; an organ voxel within reach lies in this crop
    box = _grow(lesion, spacing, dilate_mm)
    sub_organ = organ[box]
    if not sub_organ.any():
        return 0.0
    dist = ndi.distance_transform_edt(~sub_organ, sampling=[float(s) for s in spacing])
    return float(np.count_nonzero(dist[lesion[box]] <= dilate_mm + 1e-6)) / n


def _bitwise_changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """True where two arrays' stored values differ (bit patterns when the dtypes agree)."""
    if a.dtype == b.dtype and a.dtype.kind in "fc":
        view = np.dtype(f"u{a.dtype.itemsize}")
        return a.view(view) != b.view(view)
    return a != b


@dataclass
class Preservation:
    """Voxels beyond the margin (count, changed, examples) and the blend zone's agreement with the input."""

    margin_mm: float
    far_voxels: int
    far_changed: int
    examples: list[list[int]]
    zone_voxels: int
    zone_rmse_hu: float | None
    zone_psnr_db: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "margin_mm": self.margin_mm,
            "far_voxels": self.far_voxels,
            "far_changed": self.far_changed,
            "preserved_fraction": 1.0 - self.far_changed / self.far_voxels if self.far_voxels else 1.0,
            "preserved": self.far_changed == 0,
            "changed_far_voxels": self.examples,
            "blend_zone_voxels": self.zone_voxels,
            "blend_zone_rmse_hu": self.zone_rmse_hu,
            "blend_zone_psnr_db": self.zone_psnr_db,
        }


def preservation(before: StoredImage, after: StoredImage, lesion: np.ndarray, margin_mm: float) -> Preservation:
    """Compare ``after`` with ``before`` (same shape) beyond ``margin_mm`` of ``lesion`` and in the blend zone.

    Far: Euclidean distance (mm, voxel centres) to the nearest lesion voxel >= ``margin_mm``, where the
    paste-back's weight is exactly 0. Blend zone: closer than that, outside the lesion.
    """
    changed = _bitwise_changed(before.raw, after.raw)
    total = changed.size
    if not lesion.any():
        near = np.zeros((0,), bool)
        zone_voxels, rmse, psnr = 0, None, None
    else:
        box = _grow(lesion, before.spacing, margin_mm)
        dist = ndi.distance_transform_edt(~lesion[box], sampling=list(before.spacing))
        near = dist < margin_mm
        zone = near & ~lesion[box]
        zone_voxels = int(np.count_nonzero(zone))
        rmse = psnr = None
        if zone_voxels:
            diff = after.to_hu(box)[zone] - before.to_hu(box)[zone]
            rmse = float(np.sqrt(np.mean(diff**2)))
            psnr = None if rmse == 0 else float(20.0 * np.log10(PSNR_RANGE_HU / rmse))
        changed[box] &= ~near  # what is left is changed beyond the margin
    far_changed = int(np.count_nonzero(changed))
    examples: list[list[int]] = []
    if far_changed:
        for i in range(changed.shape[0]):  # slice by slice: never a coordinate list of the whole scan
            if changed[i].any():
                examples += [[i, *map(int, jk)] for jk in np.argwhere(changed[i])[: MAX_LISTED_VOXELS - len(examples)]]
                if len(examples) >= MAX_LISTED_VOXELS:
                    break
    return Preservation(
        float(margin_mm), int(total - np.count_nonzero(near)), far_changed, examples, zone_voxels, rmse, psnr
    )


# ---- one case -----------------------------------------------------------------------------------------
def _check_grid(path: Path, vol: StoredImage, ref: StoredImage, problems: list[str], stored: bool) -> bool:
    """Shape must match the input CT's (else the case is invalid); affine, dtype and scaling differences
    are listed in ``problems``. True when there were none."""
    name, before = path.name, len(problems)
    if vol.raw.shape != ref.raw.shape:
        raise CaseError(f"{path}: shape {tuple(vol.raw.shape)} differs from the input CT's {tuple(ref.raw.shape)}")
    if not np.allclose(vol.affine, ref.affine, atol=1e-4):
        problems.append(f"{name}: affine differs from the input CT's")
    if stored and vol.raw.dtype != ref.raw.dtype:
        problems.append(f"{name}: stored dtype {vol.raw.dtype} differs from the input CT's {ref.raw.dtype}")
    if stored and not np.allclose((vol.slope, vol.inter), (ref.slope, ref.inter)):
        problems.append(
            f"{name}: scaling {vol.slope:g}/{vol.inter:g} differs from the input CT's {ref.slope:g}/{ref.inter:g}"
        )
    return len(problems) == before


def _margin(provenance: dict[str, Any], override: float | None, problems: list[str]) -> float:
    if override is not None:
        return float(override)
    value = (provenance.get("parameters") or {}).get("margin_mm")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    problems.append(f"provenance.json records no margin_mm; {DEFAULT_MARGIN_MM:g} mm assumed")
    return DEFAULT_MARGIN_MM


def _appearance(
    volume: StoredImage,
    label: np.ndarray,
    seg: np.ndarray,
    organ_id: int,
    request: SynthesisRequest,
    report: LesionReport,
    problems: list[str],
) -> dict[str, Any]:
    requested = density_of(request.attributes.get(V.DENSITY))
    source = "request" if requested else "report"
    requested = requested or density_of(report.attributes.get(V.DENSITY))
    wanted_homogeneity = homogeneity_of(request.attributes.get(V.DENSITY_VARIATIONS)) or homogeneity_of(
        report.attributes.get(V.DENSITY_VARIATIONS)
    )
    try:
        m = extraction.measure_lesion(volume.values(), label, seg, volume.spacing, organ_id)
    except LesionDiffusionError as e:
        problems.append(f"lesion not measurable: {e}")
        return {"requested_density": requested, "density_source": source, "requested_homogeneity": wanted_homogeneity}
    organ_name = label_table().name(organ_id)
    homogeneous = m.smoothed_std_hu <= A.HOMOGENEOUS_MAX_STD_HU
    measured = extraction.density_class(m, organ_name, homogeneous)
    delta = None if m.reference_hu is None else m.core_hu - m.reference_hu
    expected = _DIRECTION.get(requested or "")
    direction = None if delta is None else (1 if delta > A.ISO_HU else -1 if delta < -A.ISO_HU else 0)
    ct_value = report.mean_hu
    homogeneity = "homogeneous" if homogeneous else "heterogeneous"
    return {
        "requested_density": requested,
        "density_source": source,
        "measured_density": measured,
        "density_match": None if requested is None else density_matches(requested, measured),
        "direction_match": None if expected is None or direction is None else direction == expected,
        "lesion_mean_hu": m.mean_hu,
        "lesion_core_hu": m.core_hu,
        "organ_reference_hu": m.reference_hu,
        "delta_hu": delta,
        "requested_ct_value_hu": ct_value,
        "ct_value_error_hu": None if ct_value is None else m.mean_hu - ct_value,
        "requested_homogeneity": wanted_homogeneity,
        "measured_homogeneity": homogeneity,
        "smoothed_std_hu": m.smoothed_std_hu,
        "homogeneity_match": None if wanted_homogeneity is None else homogeneity == wanted_homogeneity,
    }


def evaluate_case(
    request: SynthesisRequest,
    folder: Path,
    margin_mm: float | None = None,
    tile: int = 160,
    crops: dict[str, L.LesionCrop] | None = None,
) -> tuple[dict[str, Any], Image.Image | None]:
    """Measure one case folder against its request; returns its record and its contact-sheet tile.

    ``crops``: when given, receives the lesion's crop under the case name (for the reference comparison).
    Raises :class:`CaseError` when the folder cannot be evaluated and :class:`InputError` when the
    request's own CT cannot be read.
    """
    for name in CASE_FILES:
        if not (folder / name).is_file():
            raise CaseError(f"{folder / name}: file not found")
    problems: list[str] = []
    provenance = _case_file(read_json, folder / "provenance.json")
    if not isinstance(provenance, dict):
        raise CaseError(f"{folder / 'provenance.json'}: not a JSON object")
    reports = _case_file(read_case_reports, folder / "report.json")
    before = read_stored(request.image)  # the user's own input: a problem here stops the run
    after = _case_file(read_stored, folder / "image.nii.gz")
    grid_ok = _check_grid(folder / "image.nii.gz", after, before, problems, stored=True)
    label_vol, seg_vol = (
        _case_file(read_stored, folder / "label.nii.gz"),
        _case_file(read_stored, folder / "organ_seg.nii.gz"),
    )
    _check_grid(folder / "label.nii.gz", label_vol, before, problems, stored=False)
    _check_grid(folder / "organ_seg.nii.gz", seg_vol, before, problems, stored=False)
    label, seg = _labels(label_vol), _labels(seg_vol)
    recorded = (provenance.get("request") or {}).get("image")
    if recorded and Path(recorded).resolve() != request.image.resolve():
        problems.append(f"provenance.json names another input CT ({recorded})")
    spacing = before.spacing
    voxel_mm3 = float(np.prod(spacing))

    table = label_table()
    organ_text = request.attributes[A.ORGAN_TYPE]
    try:
        organ_ids = table.ids(organ_text)
    except LesionDiffusionError as e:
        raise CaseError(f"organ type {organ_text!r}: {e}") from None
    organ_id = reports[0].organ_id
    if organ_id not in organ_ids:
        problems.append(
            f"report.json places the lesion in organ {organ_id}, not the requested {organ_text!r} {list(organ_ids)}"
        )
        organ_id = organ_ids[0]

    lesion = label == 2
    n_lesion = int(np.count_nonzero(lesion))
    cavities = [A.parse_cavity(r.attributes.get(V.CAVITY, "")) for r in reports]
    sizes = [requested_size_mm(r) for r in reports]
    protruding = [max(s) / 2.0 for c, s in zip(cavities, sizes) if c == V.CAVITY_PROTRUDING and s]
    dilate = max(protruding, default=0.0)
    organ = np.isin(seg, organ_ids)
    requested_volume = sum(ellipsoid_volume_mm3(s) for s in sizes if s) if all(sizes) else None
    volume = n_lesion * voxel_mm3
    components = L.components(lesion)  # face-connected: diagonal speckle is not one lesion
    if not n_lesion:
        problems.append("label.nii.gz has no lesion voxels (label 2)")
    mask = {
        "lesion_voxels": n_lesion,
        "volume_mm3": volume,
        "allowed_region": f"organ dilated by {dilate:g} mm (protruding)" if dilate else "organ",
        "inside_fraction": inside_fraction(lesion, organ, spacing, dilate) if n_lesion else None,
        "lesions": len(reports),
        "components": components,
        "components_26": int(ndi.label(lesion, structure=np.ones((3, 3, 3), bool))[1]) if n_lesion else 0,
        "connected": n_lesion > 0 and components == len(reports),
        "cavity": cavities,
        "requested_size_mm": [list(s) if s else None for s in sizes],
        "requested_volume_mm3": requested_volume,
        "volume_error": None
        if not requested_volume or not n_lesion
        else (volume - requested_volume) / requested_volume,
    }
    # the same error as a diameter: a sphere 10% too wide is 33% too large in volume
    mask["diameter_error"] = None if mask["volume_error"] is None else (1.0 + mask["volume_error"]) ** (1.0 / 3.0) - 1.0
    appearance = _appearance(after, label, seg, organ_id, request, reports[0], problems) if n_lesion else {}
    realism: dict[str, Any] = {}
    if n_lesion:
        crop = L.crop_around(after.values(), lesion, organ, spacing, appearance.get("organ_reference_hu"))
        realism = R.case_measures(crop, reports[0].mean_hu, reports[0].attributes.get(V.SURFACE))
        realism.update(organ=table.name(organ_id), density=appearance.get("requested_density"), lesions=len(reports))
        if crops is not None:
            crops[request.case] = crop
    kept = preservation(before, after, lesion, _margin(provenance, margin_mm, problems)).to_json()
    # stored values can only be bit-identical in the input's own dtype, scaling and grid
    kept["grid_matches"] = grid_ok
    kept["preserved"] = kept["preserved"] and grid_ok
    seed = (provenance.get("parameters") or {}).get("seed")
    record = {
        "case": request.case,
        "status": "ok",
        "organ": table.name(organ_id),
        "organ_id": int(organ_id),
        "seed": seed,
        "mask": mask,
        "appearance": appearance,
        "realism": realism,
        "preservation": kept,
        "problems": problems,
    }
    window = LUNG_WINDOW if A.organ_group(table.name(organ_id)) == "lung" else SOFT_TISSUE_WINDOW
    return record, case_tile(
        before, after, lesion, window, tile, caption=request_caption(request.attributes, request.text)
    )


# ---- across cases -------------------------------------------------------------------------------------
def density_ordering(requests: Sequence[SynthesisRequest], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Groups of requests that share image and seed and differ only in density; pairs in HU order.

    Only cases whose request itself names hypo-, iso- or hyperdense and that were measured take part. A
    pair of different classes is ordered when the darker class has the lower measured mean lesion HU.
    """
    groups: dict[tuple, list[tuple[int, str, float]]] = {}
    for r in requests:
        rec = records.get(r.case)
        density = density_of(r.attributes.get(V.DENSITY))
        hu = (rec or {}).get("appearance", {}).get("lesion_mean_hu")
        if rec is None or density not in ORDERED_DENSITIES or hu is None:
            continue
        rest = tuple(sorted((k, v) for k, v in r.attributes.items() if k != V.DENSITY))
        key = (str(r.image.resolve()), str(rec.get("seed")), rest)
        groups.setdefault(key, []).append((ORDERED_DENSITIES.index(density), r.case, float(hu)))
    details, pairs, ordered = [], 0, 0
    for members in groups.values():
        group_pairs = group_ordered = 0
        for i, (rank_a, _, hu_a) in enumerate(members):
            for rank_b, _, hu_b in members[i + 1 :]:
                if rank_a == rank_b:
                    continue
                group_pairs += 1
                group_ordered += (hu_a < hu_b) == (rank_a < rank_b) and hu_a != hu_b
        if group_pairs:
            details.append({
                "cases": {case: {"density": ORDERED_DENSITIES[rank], "mean_hu": hu} for rank, case, hu in members},
                "pairs": group_pairs,
                "ordered_pairs": group_ordered,
            })  # fmt: skip
            pairs += group_pairs
            ordered += group_ordered
    return {
        "groups": len(details),
        "pairs": pairs,
        "ordered_pairs": ordered,
        "fraction": ordered / pairs if pairs else None,
        "details": details,
    }


def _rate(values: Iterable[bool | None]) -> tuple[float | None, int]:
    known = [bool(v) for v in values if v is not None]
    return (sum(known) / len(known) if known else None), len(known)


def _median(values: Iterable[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return statistics.median(known) if known else None


def totals(
    records: Sequence[dict[str, Any]],
    missing: list[dict],
    invalid: list[dict],
    ordering: dict[str, Any],
    pool: Sequence[R.ReferenceLesion] | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Rates, accuracies and medians over the evaluated cases (see the module notes); ``realism`` holds
    :func:`lesiondiffusion.realism.realism_totals` (beside ``pool``, the reference lesions, when given)."""
    masks = [r["mask"] for r in records]
    looks = [r["appearance"] for r in records]
    kept = [r["preservation"] for r in records]
    inside = [m["inside_fraction"] for m in masks]
    per_class: dict[str, dict[str, Any]] = {}
    for a in looks:
        if a.get("density_match") is None:
            continue
        c = per_class.setdefault(a["requested_density"], {"cases": 0, "correct": 0})
        c["cases"] += 1
        c["correct"] += int(a["density_match"])
    for c in per_class.values():
        c["accuracy"] = c["correct"] / c["cases"]
    density_accuracy, density_cases = _rate(a.get("density_match") for a in looks)
    direction_accuracy, _ = _rate(a.get("direction_match") for a in looks)
    homogeneity_accuracy, homogeneity_cases = _rate(a.get("homogeneity_match") for a in looks)
    n = len(records)
    out = {
        "requested": n + len(missing) + len(invalid),
        "evaluated": n,
        "missing": len(missing),
        "invalid": len(invalid),
        "inside_rate": sum(1 for v in inside if v is not None and v >= 1.0) / n if n else None,
        "mean_inside_fraction": statistics.fmean(v or 0.0 for v in inside) if n else None,
        "min_inside_fraction": min((v or 0.0 for v in inside), default=None),
        "connected_rate": sum(bool(m["connected"]) for m in masks) / n if n else None,
        "median_volume_error": _median(None if m["volume_error"] is None else abs(m["volume_error"]) for m in masks),
        "median_diameter_error": _median(
            None if m["diameter_error"] is None else abs(m["diameter_error"]) for m in masks
        ),
        "density_accuracy": density_accuracy,
        "density_cases": density_cases,
        "density_per_class": dict(sorted(per_class.items())),
        "direction_accuracy": direction_accuracy,
        "homogeneity_accuracy": homogeneity_accuracy,
        "homogeneity_cases": homogeneity_cases,
        "median_abs_ct_value_error_hu": _median(
            None if a.get("ct_value_error_hu") is None else abs(a["ct_value_error_hu"]) for a in looks
        ),
        "preserved_rate": sum(bool(k["preserved"]) for k in kept) / n if n else None,
        "far_voxels_changed": sum(k["far_changed"] for k in kept),
        "grid_match_rate": sum(bool(k["grid_matches"]) for k in kept) / n if n else None,
        "min_preserved_fraction": min((k["preserved_fraction"] for k in kept), default=None),
        "median_blend_zone_psnr_db": _median(k["blend_zone_psnr_db"] for k in kept),
        "density_ordering": ordering["fraction"],
        "density_ordering_pairs": ordering["pairs"],
        "realism": R.realism_totals([r["realism"] for r in records if r.get("realism")], pool, reference),
    }
    out["targets"] = {}
    for name, (key, op, threshold) in TARGETS.items():
        value = out[key]
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out["targets"][name] = {"value": value, "target": f"{op} {threshold:g}", "met": met}
    return out


# ---- the report ---------------------------------------------------------------------------------------
def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100.0 * v:.{digits}f}%"


def _num(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _short(density: str | None) -> str:
    return "-" if not density else density.replace(" lesion", "").replace("hypoattenuating ", "")


def _yes(v: bool | None) -> str:
    return "-" if v is None else "yes" if v else "**no**"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a row per case, totals, targets, missing/invalid cases, density groups."""
    t = report["totals"]
    lines = [
        "# Synthesis evaluation", "",
        f"Outputs: `{report['pred']}`  ", f"Requests: `{report['requests']}`", "",
        "## Cases", "",
        "| case | organ | inside | components | volume error | density requested -> measured (lesion - organ HU) | density ok "
        "| homogeneity requested -> measured | far voxels changed | preserved | blend-zone PSNR (dB) | problems |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for c in report["cases"]:
        if c["status"] != "ok":
            lines.append(f"| {c['case']} | {c['status']}: {c.get('error', '')} |" + " |" * 10)
            continue
        m, a, p = c["mask"], c["appearance"], c["preservation"]
        psnr = "inf" if p["blend_zone_rmse_hu"] == 0 else _num(p["blend_zone_psnr_db"])
        error = "-" if m["volume_error"] is None else f"{100 * m['volume_error']:+.1f}%"
        lines.append(
            f"| {c['case']} | {c['organ']} | {_pct(m['inside_fraction'])} | {m['components']}/{m['lesions']} "
            f"| {error} "
            f"| {_short(a.get('requested_density'))} -> {_short(a.get('measured_density'))} ({_num(a.get('delta_hu'), '+.1f')}) "
            f"| {_yes(a.get('density_match'))} | {a.get('requested_homogeneity') or '-'} -> {a.get('measured_homogeneity') or '-'} "
            f"| {p['far_changed']} of {p['far_voxels']} | {_pct(p['preserved_fraction'], 4)} | {psnr} | {'; '.join(c['problems'])} |"
        )
    lines += [
        "", "## Totals", "", "| measure | value |", "| --- | --- |",
        f"| cases requested / evaluated / missing / invalid | {t['requested']} / {t['evaluated']} / {t['missing']} / {t['invalid']} |",
        f"| masks fully inside the allowed region | {_pct(t['inside_rate'])} (mean fraction {_pct(t['mean_inside_fraction'])}, min {_pct(t['min_inside_fraction'])}) |",
        f"| one 6-connected component per lesion | {_pct(t['connected_rate'])} |",
        f"| median size error: volume (equivalent diameter) | {_pct(t['median_volume_error'])} ({_pct(t['median_diameter_error'])}) |",
        f"| density-class accuracy | {_pct(t['density_accuracy'])} of {t['density_cases']} |",
        f"| density direction (sign beyond +-{A.ISO_HU:g} HU) accuracy | {_pct(t['direction_accuracy'])} |",
        f"| homogeneity accuracy | {_pct(t['homogeneity_accuracy'])} of {t['homogeneity_cases']} |",
        f"| median CT-value error | {_num(t['median_abs_ct_value_error_hu'])} HU |",
        f"| cases with every voxel beyond the margin unchanged | {_pct(t['preserved_rate'])} ({t['far_voxels_changed']} voxel(s) changed in all) |",
        f"| synthetic CT on the input's grid, dtype and scaling | {_pct(t['grid_match_rate'])} |",
        f"| median blend-zone PSNR (peak {PSNR_RANGE_HU:g} HU) | {_num(t['median_blend_zone_psnr_db'])} dB |",
        f"| density ordering (hypo < iso < hyper mean HU) | {_pct(t['density_ordering'])} of {t['density_ordering_pairs']} pairs |",
        "", "### Density accuracy per requested class", "", "| class | cases | correct | accuracy |", "| --- | --- | --- | --- |",
    ]  # fmt: skip
    for cls, c in t["density_per_class"].items():
        lines.append(f"| {cls} | {c['cases']} | {c['correct']} | {_pct(c['accuracy'])} |")
    lines += ["", "### Targets", "", "| target | value | required | met |", "| --- | --- | --- | --- |"]
    for name, g in t["targets"].items():
        op, threshold = TARGETS[name][1:]
        lines.append(f"| {name} | {_pct(g['value'])} | {op} {_pct(threshold, 0)} | {_yes(g['met'])} |")
    lines += realism_markdown(report)
    unmeasured = [c for c in report["cases"] if c["status"] != "ok"]
    if unmeasured:
        lines += ["", "## Cases not evaluated", ""]
        lines += [f"- `{c['case']}` ({c['status']}): {c.get('error', '')}" for c in unmeasured]
    ordering = report["density_ordering"]
    if ordering["details"]:
        lines += ["", "## Density groups (same image, seed and attributes but density)", ""]
        for g in ordering["details"]:
            members = ", ".join(
                f"{case} {_short(v['density'])} {v['mean_hu']:.1f} HU" for case, v in g["cases"].items()
            )
            lines.append(f"- {members}: {g['ordered_pairs']} of {g['pairs']} pairs ordered")
    return "\n".join(lines) + "\n"


def _beside(value: float | None, truth: float | None, fmt: str = ".2f") -> str:
    """``value (ground truth)``, the ground truth left out when there is none."""
    return _num(value, fmt) if truth is None else f"{_num(value, fmt)} ({_num(truth, fmt)})"


def realism_markdown(report: dict[str, Any]) -> list[str]:
    """The realism sections: a row per case beside the matched ground-truth lesions, totals, the distance."""
    t = report["totals"]["realism"]
    has_ref = report.get("reference") is not None
    note = (
        "ground-truth lesions of the same organ and density class in brackets"
        if has_ref
        else "no reference dataset given"
    )
    lines = [
        "", "## Realism", "", f"Reference: `{report.get('reference') or '-'}` ({note}).", "",
        "| case | fill ratio | interior fraction | solidity | sphericity | pieces (6 / 26-conn.) "
        "| lesion - organ HU: measured / report | noise std ratio | edge width (mm) | matched by | checks failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    checks = (("solid", "fill"), ("interior_ok", "interior"), ("delta_ok", "HU vs report"),
              ("delta_in_reference_range", "HU vs real"), ("noise_ok", "noise"))  # fmt: skip
    for c in report["cases"]:
        m = c.get("realism")
        if c["status"] != "ok" or not m:
            continue
        ref = m.get("reference") or {}
        failed = [name for key, name in checks if m.get(key) is False]
        lines.append(
            f"| {c['case']} | {_beside(m['fill_ratio'], ref.get('fill_ratio'))} "
            f"| {_beside(m['interior_fraction'], ref.get('interior_fraction'))} | {_beside(m['solidity'], ref.get('solidity'))} "
            f"| {_beside(m['sphericity'], ref.get('sphericity'))} | {m['components_6']} / {m['components_26']} "
            f"| {_num(m['median_delta_hu'], '+.1f')} / {_num(m['report_delta_hu'], '+.1f')}"
            f"{'' if ref.get('median_delta_hu') is None else ' (' + _num(ref['median_delta_hu'], '+.1f') + ')'} "
            f"| {_beside(m['noise_std_ratio'], ref.get('noise_std_ratio'))} "
            f"| {_beside(m['edge_width_mm'], ref.get('edge_width_mm'), '.1f')} {m.get('margin_class') or ''} "
            f"| {ref.get('match', '-')} ({ref.get('lesions', 0)}) | {', '.join(failed) or '-'} |"
        )
    syn, truth = t["synthetic"], t["ground_truth"] or {}
    lines += [
        "", "### Realism totals", "",
        f"Medians over {t['cases']} synthetic lesion(s) and {t['matched_reference_lesions']} matched ground-truth lesion(s) "
        f"(of {t['reference_lesions']}).", "",
        "| measure | synthetic | ground truth |", "| --- | --- | --- |",
    ]  # fmt: skip
    for key, name, fmt in (("fill_ratio", "fill ratio", ".3f"), ("interior_fraction", "interior fraction", ".3f"),
                           ("solidity", "solidity", ".3f"), ("sphericity", "sphericity", ".3f"),
                           ("median_delta_hu", "lesion - organ median HU", "+.1f"),
                           ("noise_std_ratio", "noise std ratio (lesion / organ)", ".2f"),
                           ("edge_width_mm", "edge width (mm)", ".2f")):  # fmt: skip
        lines.append(f"| {name} | {_num(syn.get(key), fmt)} | {_num(truth.get(key), fmt)} |")
    for cls, v in t["delta_by_density"].items():
        lines.append(f"| lesion - organ median HU, {_short(cls)} ({v['cases']} / {v['reference_lesions']}) "
                     f"| {_num(v['synthetic'], '+.1f')} | {_num(v['ground_truth'], '+.1f')} |")  # fmt: skip
    for cls, v in t["edge_width_by_margin"].items():
        lines.append(f"| edge width (mm), {cls} ({v['cases']} / {v['reference_lesions']}) "
                     f"| {_num(v['synthetic'], '.2f')} | {_num(v['ground_truth'], '.2f')} |")  # fmt: skip
    lines += [
        "", "| check | rate |", "| --- | --- |",
        f"| one 6-connected piece per lesion | {_pct(t['one_piece_rate'])} |",
        f"| solid: fill ratio >= {R.MIN_FILL_RATIO:g} | {_pct(t['solid_rate'])} |",
        f"| interior fraction within {R.INTERIOR_TOLERANCE:g} of real lesions of that size | {_pct(t['interior_ok_rate'])} |",
        f"| lesion - organ HU of the report's sign and within {R.DELTA_TOLERANCE_HU:g} HU of it | {_pct(t['delta_ok_rate'])} |",
        f"| lesion - organ HU within real lesions' 10th-90th percentiles +-{A.ISO_HU:g} HU | {_pct(t['delta_in_reference_range_rate'])} |",
        f"| noise std {R.NOISE_RATIO_RANGE[0]:g}-{R.NOISE_RATIO_RANGE[1]:g}x the host organ's | {_pct(t['noise_ok_rate'])} |",
    ]  # fmt: skip
    d = t["realism_distance"]
    n = d["cases_with_features"]
    lines += [
        "", "### Realism distance to the ground-truth lesions", "",
        f"Fréchet-style distance on {len(d['features'])} radiomics-style features (diagonal covariance, features scaled "
        f"by the ground truth's spread; in-house, not certified against IBSI/pyradiomics), {d['reference_lesions']} "
        "ground-truth lesion(s). Lower is closer. Baselines: the same masks filled flat at the report's CT value, and "
        "a ground-truth lesion's HU offsets copied into each mask.", "",
        "| lesions | distance | cases |", "| --- | --- | --- |",
        f"| synthetic | {_num(d['synthetic'], '.3f')} | {n['synthetic']} |",
        f"| flat fill (baseline) | {_num(d['flat'], '.3f')} | {n['flat']} |",
        f"| copy-paste (baseline) | {_num(d['copy_paste'], '.3f')} | {n['copy_paste']} |",
    ]  # fmt: skip
    return lines


def summary_line(report: dict[str, Any]) -> str:
    """One line: case counts and the headline figures."""
    t = report["totals"]
    r = t["realism"]
    d = r["realism_distance"]
    return (
        f"evaluated {t['evaluated']}/{t['requested']} case(s) ({t['missing']} missing, {t['invalid']} invalid): "
        f"inside {_pct(t['inside_rate'])}, connected {_pct(t['connected_rate'])}, preserved {_pct(t['preserved_rate'])}, "
        f"density {_pct(t['density_accuracy'])}, homogeneity {_pct(t['homogeneity_accuracy'])}, "
        f"median size error {_pct(t['median_volume_error'])}, density order {_pct(t['density_ordering'])} of "
        f"{t['density_ordering_pairs']} pair(s); realism: solid {_pct(r['solid_rate'])}, "
        f"fill {_num(r['synthetic']['fill_ratio'], '.2f')}, interior {_num(r['synthetic']['interior_fraction'], '.2f')}, "
        f"HU vs report {_pct(r['delta_ok_rate'])}, noise ratio {_num(r['synthetic']['noise_std_ratio'], '.2f')}"
        + (
            "" if d["synthetic"] is None
            else f", distance {d['synthetic']:.2f} (flat {_num(d['flat'], '.2f')}, copy-paste {_num(d['copy_paste'], '.2f')})"
        )
    )  # fmt: skip


# ---- contact sheet ------------------------------------------------------------------------------------
def case_tile(
    before: StoredImage,
    after: StoredImage,
    lesion: np.ndarray,
    window: Sequence[float],
    size: int = 160,
    caption: str | None = None,
) -> Image.Image:
    """The preview's axial row for one case: overview with the zoom box, zoomed before, after, and the
    lesion outline (radiological orientation, physical aspect), under a one-line ``caption``."""
    return before_after(
        before.raw, after.raw, lesion, before.affine, planes=("axial",), window=window, size=size,
        before_scaling=(before.slope, before.inter), after_scaling=(after.slope, after.inter), caption=caption, caption_lines=1,
    )  # fmt: skip


def contact_sheet(tiles: Sequence[tuple[str, str, Image.Image | None]], size: int = 160) -> Image.Image:
    """One row per case ``(case, caption, image)``: a ``case: caption`` line over its :func:`case_tile`;
    a case without an image gets a grey block."""
    heads = [caption_band(f"{case}: {caption}", 4 * size, size, max_lines=1) for case, caption, _ in tiles]
    row = max((h.height for h in heads if h is not None), default=0) + max(
        [size] + [im.height for _, _, im in tiles if im is not None]
    )
    sheet = Image.new("RGB", (4 * size, max(1, len(tiles)) * row), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, ((_, _, image), head) in enumerate(zip(tiles, heads)):
        y = i * row
        if head is not None:
            sheet.paste(head, (0, y))
        if image is None:
            draw.rectangle((1, y + row - size, 4 * size - 2, y + row - 2), fill=(70, 70, 70))
        else:
            sheet.paste(image, (0, y + row - image.height))  # panels at the bottom: rows line up
    return sheet


# ---- the whole run ------------------------------------------------------------------------------------
def _failure_reasons(pred: Path) -> dict[str, str]:
    """Why cases failed, from the synthesis run's ``summary.json`` when there is a readable one."""
    path = pred / "summary.json"
    if not path.is_file():
        return {}
    try:
        cases = read_json(path).get("cases", [])
        return {
            c["case"]: f"failed in {c.get('stage', '?')}: {c.get('error', '')}"
            for c in cases
            if c.get("status") == "error"
        }
    except (InputError, AttributeError, KeyError, TypeError):
        logger.warning("%s: not a synthesis summary; failure reasons are not shown", path)
        return {}


def _caption(record: dict[str, Any]) -> str:
    m, a, p = record["mask"], record["appearance"], record["preservation"]
    return (f"inside {_pct(m['inside_fraction'], 0)}, {_short(a.get('requested_density'))}->"
            f"{_short(a.get('measured_density'))}, far changed {p['far_changed']}")  # fmt: skip


def evaluate_outputs(
    pred: PathLike,
    requests: PathLike,
    out: PathLike | None = None,
    margin_mm: float | None = None,
    tile: int = 160,
    reference: PathLike | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate every requested case of ``pred``; write ``evaluation.json``, ``evaluation.md`` and
    ``contact_sheet.png`` into ``out`` (default: ``<pred>_evaluation`` beside ``pred``, never inside it).

    ``margin_mm`` overrides each run's recorded margin. ``reference``: a labelled dataset (datalist JSON
    or the folder holding ``datalist.json``) whose lesions the realism measures are set beside
    (:mod:`lesiondiffusion.realism`). Returns the report and the written paths.
    """
    pred = user_path(pred)
    requests_path = user_path(requests)
    wanted = read_requests(requests_path)
    if not pred.is_dir():
        raise InputError(pred, "synthesis output folder not found")
    if margin_mm is not None and float(margin_mm) < 0:
        raise LesionDiffusionError(f"--margin_mm must not be negative, not {margin_mm}")
    out_dir = user_path(out) if out else pred.parent / f"{pred.name}_evaluation"
    reasons = _failure_reasons(pred)

    records: dict[str, dict[str, Any]] = {}
    cases: list[dict[str, Any]] = []
    tiles: list[tuple[str, str, Image.Image | None]] = []
    crops: dict[str, L.LesionCrop] = {}
    # the reference first: a wrong path fails before the cases are measured
    pool = R.load_reference(reference) if reference is not None else None
    missing: list[dict] = []
    invalid: list[dict] = []
    for request in tqdm(wanted, desc="evaluate", unit="case"):
        folder = pred / request.case
        if not folder.is_dir():
            entry = {"case": request.case, "status": "missing", "error": reasons.get(request.case, "no output folder")}
            missing.append(entry)
            cases.append(entry)
            tiles.append((request.case, "missing", None))
            continue
        try:
            record, image = evaluate_case(request, folder, margin_mm, tile, crops)
        except CaseError as e:
            entry = {"case": request.case, "status": "invalid", "error": str(e)}
            invalid.append(entry)
            cases.append(entry)
            tiles.append((request.case, "invalid", None))
            logger.warning("%s: %s", request.case, e)
            continue
        records[request.case] = record
        cases.append(record)
        tiles.append((request.case, _caption(record), image))
    if pool is not None:
        for case, record in records.items():
            look = record["realism"]
            if look and case in crops:
                R.compare_case(look, crops[case], look["organ"], look["density"], pool)
    ordering = density_ordering(wanted, records)
    reference_path = None if reference is None else str(user_path(reference).resolve())
    report = {
        "pred": str(pred.resolve()),
        "requests": str(requests_path.resolve()),
        "reference": reference_path,
        "psnr_range_hu": PSNR_RANGE_HU,
        "cases": cases,
        "missing": missing,
        "invalid": invalid,
        "density_ordering": ordering,
        "totals": totals(list(records.values()), missing, invalid, ordering, pool, reference_path),
    }
    paths = {name: out_dir / name for name in REPORT_FILES}
    write_json(paths["evaluation.json"], report)
    write_text(paths["evaluation.md"], markdown(report))
    with atomic_path(paths["contact_sheet.png"]) as tmp:
        contact_sheet(tiles, tile).save(tmp, format="PNG")
    return report, paths
