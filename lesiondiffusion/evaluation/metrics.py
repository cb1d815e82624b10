"""Per-case measures of a synthesis output against its request: mask, appearance, realism, preservation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from lesiondiffusion import attributes as A
from lesiondiffusion import lesion_metrics as L
from lesiondiffusion import realism as R
from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.evaluation.rendering import case_tile
from lesiondiffusion.io import (
    PathLike,
    StoredImage,
    read_json,
    read_stored,
)
from lesiondiffusion.labels import LESION_LABEL, label_ids, label_table
from lesiondiffusion.preview import LUNG_WINDOW, SOFT_TISSUE_WINDOW, request_caption
from lesiondiffusion.report import LesionReport, Report
from lesiondiffusion.reports import extraction
from lesiondiffusion.requests import SynthesisRequest

CASE_FILES = ("image.nii.gz", "label.nii.gz", "organ_seg.nii.gz", "report.json", "provenance.json")
# The synthesis default, used when a provenance file does not record its margin.
DEFAULT_MARGIN_MM = 3.0
# PSNR peak: the HU range the networks see ([-1000, 1000] HU, the intensity map's ends), so that scores
# compare across scans whatever their own range.
PSNR_RANGE_HU = 2000.0
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

    lesion = label == LESION_LABEL
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
