"""A ground-truth training and evaluation set on REAL CT scans: lesions of known attributes written into
the scans of a corpus (``lesiondiffusion fetch-data``), plus the real lesions the corpus labels.

Input: a corpus folder with ``manifest.json`` (``{"version": 1, "scans": [{"id", "image", "organ_seg",
"organ_seg_version", "lesion", "contrast_phase", "region", ...}]}``, paths relative to the folder).

**Organ maps.** A scan's own map is used when it has one (its numbering, e.g. TotalSegmentator ``v2``,
is recorded); otherwise TotalSegmentator runs when it is installed with its weights (the preprocess
bundle's adapter), otherwise :func:`threshold_organ_map` labels the lungs by HU thresholds, an
approximation (below). Every map is written in TotalSegmentator **v1** numbering, which training
(``bundles/preprocess/configs/train.json``: ``organ_seg_version`` v1) and dataset validation (report
keys) read; v2 maps are converted with :func:`lesiondiffusion.labels.convert_ids` (the preprocess
bundle's ``to_v1``).

**Synthetic lesions** (scans without a real lesion; ``lesions_per_scan`` each, one lesion per case):

- *Organ*: a solid abdominal organ (:data:`ORGAN_WEIGHTS`) or a lung lobe of the scan's map.
- *Shape* (:data:`SHAPE_WEIGHTS`): ``round`` and ``oval`` ellipsoids (report class "round-like"),
  ``lobulated`` (three or four overlapping balls) and ``irregular`` (an ellipsoid with a smooth random
  boundary, :func:`lesiondiffusion.phantom_dataset.blob_shape`) (class "irregular"); lesions of at
  most 10 mm equivalent diameter are "punctate" (the extraction rule). Built on a fine isotropic grid and
  sampled onto the scan's grid as a signed distance (mm), so edges are sub-voxel.
- *Size*: equivalent-sphere diameter from :data:`DIAMETER_MM`, shrunk until the lesion fits.
- *Placement*: the box holding the lesion and its blurred margin is placed by
  :func:`lesiondiffusion.placement.place_box` ("within the parenchymal organ": the whole box inside
  the organ), so the lesion lies in :func:`~lesiondiffusion.placement.allowed_region`.
- *CT value* against the organ's parenchyma **measured in that scan**
  (:func:`lesiondiffusion.reports.extraction.organ_reference_hu`): hypodense = reference - 20..60 HU (kept
  above 25 HU, else it would read as fluid), cyst (fluid-like) = 0..15 HU, isodense = reference +-5,
  hyperdense = reference + 20..60, mixed = reference with +-30..40 HU blobs. Lung: solid nodule
  ("isodense soft tissue mass") 20..50 HU, ground glass -700..-400 HU. The lesion's exact mean over its
  label is the report's ``CT value``: the fill level is solved so that the mean after blending equals it.
- *Texture*: the scan's own noise is kept. A lesion is ``fill + R`` where ``R`` is the high-pass
  residual (image minus a 4 mm Gaussian low-pass within the region) copied from a window elsewhere in
  the same organ (for a solid lung nodule: from the scan's soft tissue); residual outliers (vessels,
  beyond 3 robust sigma) are replaced by residuals drawn from the rest. Across the margin the copied
  noise is weighted by ``sqrt(1 - (1 - w)^2)`` so the noise level stays that of the scan everywhere.
  Ground glass keeps the lung's own texture (vessels stay visible through it). Heterogeneous lesions
  add smooth blobs (std 15-25 HU; mixed 30-40 HU).
- *Margin*: blend weight ``w = Phi(-d / sigma)`` of the signed distance ``d`` (``Phi``: normal CDF),
  ``sigma`` combining the margin class (:data:`lesiondiffusion.attributes.MARGIN_SIGMA_MM`: well-defined 0.3 mm, ill-defined 2-4 mm)
  and the voxel's partial volume (0.3 voxel). The label is ``d <= 0`` (the 50% contour).

The report (``type.json``) states the TRUE attributes (organ, cavity, shape class, density class,
homogeneity, margin, enhancement from the manifest's contrast phase); size, box, CT value, relationship
and specific features are measured (:func:`lesiondiffusion.reports.extraction.measure_lesion`). What extraction
would read from each lesion is recorded beside the truth in ``dataset.json`` (``read``), with agreement
rates: at 3 mm voxels and real noise the extraction thresholds and the painted truth can differ.

**Real lesions** (a scan's ``lesion`` label): one case per scan with the report extracted from it
(:func:`lesiondiffusion.reports.extraction.extract_report`; enhancement from the manifest when extraction cannot
tell). The lesion is added to the organ it lies in (the one most of its surroundings belong to). No
synthetic lesions are written into such scans (their real lesion would be an unlabelled lesion).

**Splits.** Whole scans are held out (``val_scans``, else a fraction): every case of a held-out scan is
in the validation split, none of a training scan. For each held-out lesion-free scan,
``requests/requests.json`` asks for lesions in its organs (groups of hypo/iso/hyperdense requests that
differ only in density; lungs: a solid nodule and a ground-glass opacity), with the unchanged scan under
``requests/images/`` and its v1 organ map under ``requests/organ_segs/``.

**Threshold organ map (approximation).** Body: the largest connected region above -500 HU, holes filled
(3D and per axial slice). Lungs: air-density (< -400 HU) connected regions inside the body that do not
touch the image's in-plane border and hold at least a quarter of the largest one; voxels within
:data:`MIDLINE_BAND_MM` of the body's midline (trachea, main bronchi) are left out, the rest split into
left and right by that midline (RAS x), holes filled per axial slice (vessels, nodules). Fissures are not
found: each lung is cut at half its height into an "upper lobe" (above) and a "lower lobe" (below), no
middle lobe (:data:`THRESHOLD_LUNG_NAMES`), so a lesion's lobe is only roughly right; the four labels
also let a map's numbering be told from its anatomy (:func:`lesiondiffusion.labels.detect_version`).
Other organs are not labelled.

Every draw comes from ``numpy.random.default_rng([seed, scan index, case index])``: same corpus and
seed, same dataset.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtr
from tqdm import tqdm

from lesiondiffusion import attributes as A
from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import (
    DENSITY_ABSOLUTE_HU,
    ENHANCED,
    FLUID_LIKE,
    FLUID_MAX_HU,
    GROUND_GLASS,
    HYPERDENSE,
    HYPODENSE,
    ISODENSE,
    MIXED_DENSITY,
    NON_CONTRAST,
    PUNCTATE_MAX_MM,
    SOLID_MASS,
    margin_text,
    organ_group,
)
from lesiondiffusion.dataset import Case, holdout_indices, write_datalist, write_list_files
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import atomic_dir, read_json, read_nifti_array, save_nifti, write_json, write_text
from lesiondiffusion.labels import VERSIONS, label_table
from lesiondiffusion.phantom import axial_axis_of
from lesiondiffusion.phantom_dataset import CASE_FILES, blob_shape
from lesiondiffusion.placement import Box, allowed_region, bounding_box, centre_region
from lesiondiffusion.report import LesionReport, Report, write_report
from lesiondiffusion.reports.extraction import (
    extract_report,
    measure_lesion,
    organ_reference_hu,
    report_from_measurements,
)
from lesiondiffusion.requests import SynthesisRequest, write_requests

logger = logging.getLogger(__name__)

VERSION = "v1"  # the numbering written (what training and validation read)
MANIFEST_VERSION = 1

# ---- what is drawn ------------------------------------------------------------------------------------
ORGAN_WEIGHTS: dict[str, float] = {
    "liver": 0.3,
    "spleen": 0.15,
    "kidney right": 0.1,
    "kidney left": 0.1,
    "pancreas": 0.05,
    "lung": 0.3,
}
MIN_ORGAN_ML = 20.0  # an organ smaller than this in the scan holds no lesion
MIN_REFERENCE_HU = 20.0  # abdominal organs measured darker than this (fatty, partial volume) are skipped
SHAPE_WEIGHTS = {"round": 0.3, "oval": 0.25, "lobulated": 0.2, "irregular": 0.25}
SHAPE_CLASS = {"round": "round-like", "oval": "round-like", "lobulated": "irregular", "irregular": "irregular"}
DIAMETER_MM = {"abdomen": (12.0, 40.0), "lung": (6.0, 30.0)}
SHRINK, MAX_SHRINKS = 0.8, 6
MAX_ATTEMPTS = 8

DENSITY_WEIGHTS = {
    "abdomen": {FLUID_LIKE: 0.2, HYPODENSE: 0.35, ISODENSE: 0.1, HYPERDENSE: 0.25, MIXED_DENSITY: 0.1},
    "lung": {SOLID_MASS: 0.6, GROUND_GLASS: 0.4},
}
OFFSET_HU = {HYPODENSE: (-60.0, -20.0), ISODENSE: (-5.0, 5.0), HYPERDENSE: (20.0, 60.0), MIXED_DENSITY: (-3.0, 3.0)}
HYPO_MIN_HU = FLUID_MAX_HU + 5.0  # darker (and homogeneous) would read as fluid-like
ABSOLUTE_HU = {FLUID_LIKE: DENSITY_ABSOLUTE_HU[FLUID_LIKE], SOLID_MASS: (20.0, 50.0), GROUND_GLASS: (-700.0, -400.0)}
HETEROGENEOUS_P = {
    FLUID_LIKE: 0.0,
    HYPODENSE: 0.4,
    ISODENSE: 0.3,
    HYPERDENSE: 0.4,
    MIXED_DENSITY: 1.0,
    SOLID_MASS: 0.2,
    GROUND_GLASS: 1.0,
}
BLOB_STD_HU = {"default": (15.0, 25.0), MIXED_DENSITY: (30.0, 40.0)}
# isodense lesions and ground glass have no visible edge: always ill-defined
WELL_DEFINED_P = {
    FLUID_LIKE: 1.0,
    HYPODENSE: 0.5,
    ISODENSE: 0.0,
    HYPERDENSE: 0.6,
    MIXED_DENSITY: 0.3,
    SOLID_MASS: 0.6,
    GROUND_GLASS: 0.0,
}
PARTIAL_VOLUME = 0.3  # voxel fraction added (in quadrature) to the margin's sigma: the scan's own blur
HALO_SIGMAS = 2.0  # the margin reaches this many sigmas beyond the label (w < 2.3% further out)
LESION_TYPE = {
    FLUID_LIKE: "cyst",
    HYPODENSE: "tumor",
    ISODENSE: "tumor",
    HYPERDENSE: "tumor",
    MIXED_DENSITY: "tumor",
    SOLID_MASS: "nodule",
    GROUND_GLASS: "ground-glass opacity",
}

# ---- texture ---------------------------------------------------------------------------------------------
LOWPASS_MM = 4.0  # residual = image - Gaussian low-pass of this sigma within the region
OUTLIER_SIGMAS = 3.0  # residuals beyond this many robust sigmas (vessels, calcifications) are not copied
SOFT_TISSUE_HU = (-50.0, 150.0)  # where a solid lung nodule's noise is copied from
TEXTURE_CROP_MM = 60.0
DONOR_CANDIDATES = 30

# ---- threshold organ map ------------------------------------------------------------------------------
BODY_MIN_HU = -500.0
LUNG_MAX_HU = -400.0
LUNG_MIN_FRACTION = 0.25  # of the largest air region
LUNG_MIN_ML = 20.0
MIDLINE_BAND_MM = 12.0
THRESHOLD_LUNG_NAMES = {
    (side, part): f"lung {part} lobe {side}" for side in ("left", "right") for part in ("upper", "lower")
}

CASE_CROP_MM = 30.0  # a case is the organ's bounding box grown by this much
REQUEST_DENSITIES = {"abdomen": (HYPODENSE, ISODENSE, HYPERDENSE), "lung": (SOLID_MASS, GROUND_GLASS)}
REQUEST_DIAMETER_MM = {"abdomen": 20.0, "lung": 12.0}
REQUEST_SUFFIX = {HYPODENSE: "hypo", ISODENSE: "iso", HYPERDENSE: "hyper", SOLID_MASS: "solid", GROUND_GLASS: "ggo"}
# more groups than organs: each further round over the organs asks a smaller or larger size, margins alternating
REQUEST_SIZE_STEPS = (1.0, 0.6, 1.4, 0.8)


# ---- the corpus --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusScan:
    """One scan of a corpus manifest (absolute paths)."""

    id: str
    image: Path
    organ_seg: Path | None
    organ_seg_version: str | None
    lesion: Path | None
    contrast_phase: str = ""
    region: str = ""
    entry: Mapping[str, Any] = field(default_factory=dict, compare=False)


def read_corpus(corpus: Path) -> list[CorpusScan]:
    """The scans of ``corpus/manifest.json``; every problem is one :class:`InputError` naming the file."""
    path = Path(corpus) / "manifest.json"
    obj = read_json(path)
    if not isinstance(obj, dict) or obj.get("version") != MANIFEST_VERSION or not isinstance(obj.get("scans"), list):
        raise InputError(path, f'not a version {MANIFEST_VERSION} corpus manifest ({{"version": 1, "scans": [...]}})')
    scans, seen = [], set()
    for i, s in enumerate(obj["scans"]):
        if not isinstance(s, dict) or not isinstance(s.get("id"), str) or not isinstance(s.get("image"), str):
            raise InputError(path, f"scans[{i}] needs an 'id' and an 'image' path")
        if s["id"] in seen:
            raise InputError(path, f"scans[{i}]: scan id {s['id']!r} is used twice")
        seen.add(s["id"])
        files = {}
        for key in ("image", "organ_seg", "lesion"):
            rel = s.get(key)
            files[key] = None if rel in (None, "") else Path(corpus) / rel
            if files[key] is not None and not files[key].is_file():
                raise InputError(path, f"scans[{i}] ({s['id']}): {key} file {rel} not found")
        version = s.get("organ_seg_version") or ("v1" if files["organ_seg"] else None)
        if files["organ_seg"] is not None and version not in VERSIONS:
            raise InputError(
                path, f"scans[{i}] ({s['id']}): organ_seg_version must be one of {', '.join(VERSIONS)}, got {version!r}"
            )
        scans.append(CorpusScan(s["id"], files["image"], files["organ_seg"], version, files["lesion"],
                                str(s.get("contrast_phase") or ""), str(s.get("region") or ""), s))  # fmt: skip
    if not scans:
        raise InputError(path, "the corpus lists no scans")
    return scans


@lru_cache(maxsize=1)
def _segment_module() -> ModuleType:
    """The preprocess stage's organ segmentation (TotalSegmentator adapter, ``to_v1``), imported on first use."""
    from lesiondiffusion.pipelines import segment

    return segment


@dataclass
class Scan:
    """A loaded scan: HU image, v1 organ map, optional real lesion, and where the map came from."""

    meta: CorpusScan
    image: np.ndarray  # float32 HU
    affine: np.ndarray
    integer: bool  # stored as whole numbers: cases are written as int16
    seg: np.ndarray  # v1 ids, uint8
    seg_source: str
    lesion: np.ndarray | None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def load_scan(meta: CorpusScan, segmenter: str = "auto") -> Scan:
    """Read a corpus scan and give it a v1 organ map (its own, TotalSegmentator's or by thresholds)."""
    data, img = read_nifti_array(meta.image)  # NIfTI scaling applied
    image = np.asarray(data, dtype=np.float32)
    integer = bool(np.array_equal(image, np.round(image)))
    affine = img.affine.copy()

    def on_grid(path: Path) -> np.ndarray:
        arr, other = read_nifti_array(path)
        if arr.shape != image.shape or not np.allclose(other.affine, affine, atol=1e-3):
            raise InputError(path, f"not on the image's grid (shape {arr.shape} vs {image.shape})")
        return np.rint(np.asarray(arr, dtype=np.float32)).astype(np.int64)

    if meta.organ_seg is not None:
        seg = _segment_module().to_v1(on_grid(meta.organ_seg), meta.organ_seg_version, source=meta.organ_seg)
        source = f"corpus ({meta.organ_seg_version}" + (
            ", converted to v1)" if meta.organ_seg_version != VERSION else ")"
        )
    else:
        seg, source = segment_scan(image, affine, segmenter)
    lesion = None
    if meta.lesion is not None:
        lesion = on_grid(meta.lesion) > 0
        if not lesion.any():
            raise InputError(meta.lesion, "the lesion label is empty")
    return Scan(meta, image, affine, integer, seg.astype(np.uint8), source, lesion)


def segment_scan(image: np.ndarray, affine: np.ndarray, segmenter: str = "auto") -> tuple[np.ndarray, str]:
    """A v1 organ map for a scan without one: TotalSegmentator when ``segmenter`` is "auto" and it can run
    offline, else :func:`threshold_organ_map`; returns the map and its source."""
    if segmenter not in ("auto", "threshold", "totalsegmentator"):
        raise LesionDiffusionError(f"segmenter must be auto, threshold or totalsegmentator, not {segmenter!r}")
    if segmenter != "threshold":
        adapter = _segment_module().TotalSegmentatorAdapter(task="total")
        reason = adapter.unavailable_reason()
        if reason is None:
            return adapter(nib.Nifti1Image(image, affine)), "totalsegmentator"
        if segmenter == "totalsegmentator":
            raise LesionDiffusionError(reason)
        logger.info("%s: organ map by HU thresholds (lungs only)", reason)
    return threshold_organ_map(image, affine, VERSION), "threshold (lungs only; approximation)"


# ---- threshold organ map --------------------------------------------------------------------------------------
def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    return lab == int(np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    out = np.moveaxis(mask.copy(), axis, 0)
    for k in range(out.shape[0]):
        out[k] = ndi.binary_fill_holes(out[k])
    return np.moveaxis(out, 0, axis)


def body_mask(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The body: the largest connected region above -500 HU, holes filled (3D, then per axial slice)."""
    body = _largest(image > BODY_MIN_HU)
    return _fill_slices(ndi.binary_fill_holes(body), axial_axis_of(affine))


def threshold_organ_map(image: np.ndarray, affine: np.ndarray, version: str = VERSION) -> np.ndarray:
    """Lungs labelled by HU thresholds (see the module notes: an approximation); ``version`` ids, uint8."""
    image = np.asarray(image, dtype=np.float32)
    axial = axial_axis_of(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    body = body_mask(image, affine)
    air = (image < LUNG_MAX_HU) & body
    lab, n = ndi.label(air)
    out = np.zeros(image.shape, np.uint8)
    if n == 0:
        return out
    in_plane = [a for a in range(3) if a != axial]
    border = set()
    for a in in_plane:
        for idx in (0, image.shape[a] - 1):
            border |= set(np.unique(np.take(lab, idx, axis=a)).tolist())
    sizes = np.bincount(lab.ravel())
    keep = [i for i in range(1, n + 1) if i not in border]
    if not keep:
        return out
    voxel_ml = float(np.prod(spacing)) / 1000.0
    biggest = max(sizes[i] for i in keep)
    keep = [i for i in keep if sizes[i] >= LUNG_MIN_FRACTION * biggest and sizes[i] * voxel_ml >= LUNG_MIN_ML]
    lungs = np.isin(lab, keep)
    # midline per axial slice: the body's mean world x (RAS: +x is the patient's right)
    grid = np.ogrid[tuple(slice(0, n) for n in image.shape)]

    def world(row: int) -> np.ndarray:
        return (
            sum(np.float32(affine[row, a]) * grid[a].astype(np.float32) for a in range(3)) + np.float32(affine[row, 3])
        ).astype(np.float32)

    world_x, world_z = world(0), world(2)
    moved_body = np.moveaxis(body, axial, 0)
    moved_x = np.moveaxis(world_x, axial, 0)
    midline = np.array(
        [moved_x[k][moved_body[k]].mean() if moved_body[k].any() else 0.0 for k in range(moved_body.shape[0])]
    )
    shape = [1, 1, 1]
    shape[axial] = -1
    offset = world_x - midline.reshape(shape)
    table = label_table(version)
    for side, sign in (("left", -1.0), ("right", 1.0)):
        part = lungs & (sign * offset > MIDLINE_BAND_MM)
        if part.sum() * voxel_ml < LUNG_MIN_ML:
            continue
        part = _fill_slices(part, axial) & body
        z = world_z[part]
        middle = 0.5 * (float(z.min()) + float(z.max()))
        upper = part & (world_z >= middle)
        out[part] = table.id(THRESHOLD_LUNG_NAMES[side, "lower"])
        out[upper] = table.id(THRESHOLD_LUNG_NAMES[side, "upper"])
    return out


# ---- shapes -------------------------------------------------------------------------------------------------
def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def shape_mask(kind: str, diameter_mm: float, fine: float, rng: np.random.Generator) -> np.ndarray:
    """A lesion shape of equivalent diameter ``diameter_mm`` on an isotropic grid of ``fine`` mm."""
    if kind in ("round", "irregular"):
        return blob_shape(diameter_mm, fine, rng, irregular=kind == "irregular")
    radius = diameter_mm / 2.0
    if kind == "oval":
        e = rng.uniform(1.4, 1.9)
        axes = radius * np.array([e ** (2 / 3), e ** (-1 / 3), e ** (-1 / 3)])
        centres, radii = np.zeros((1, 3)), axes[None]
    elif kind == "lobulated":
        k = int(rng.integers(3, 5))
        dirs = rng.standard_normal((k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        centres = dirs * rng.uniform(0.45, 0.65, (k, 1))
        radii = np.repeat(rng.uniform(0.55, 0.75, (k, 1)), 3, axis=1)
        # scale so that the union has the asked volume (estimated on a coarse grid)
        g = np.stack(np.meshgrid(*[np.linspace(-1.5, 1.5, 41)] * 3, indexing="ij"), -1)
        inside = np.zeros(g.shape[:3], bool)
        for c, r in zip(centres, radii):
            inside |= np.sum(((g - c) / r) ** 2, -1) <= 1.0
        vol = inside.sum() * (3.0 / 40) ** 3
        scale = radius * (4.0 / 3.0 * np.pi / vol) ** (1 / 3)
        centres, radii = centres * scale, radii * scale
    else:
        raise LesionDiffusionError(f"unknown shape kind {kind!r}; use one of {', '.join(SHAPE_WEIGHTS)}")
    rot = _rotation(rng)
    reach = float(np.max(np.linalg.norm(centres, axis=1) + radii.max(axis=1)))
    half = int(np.ceil(reach / fine)) + 2
    ax = (np.arange(2 * half + 1) - half) * fine
    x = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1) @ rot  # rotated coordinates
    mask = np.zeros(x.shape[:3], bool)
    for c, r in zip(centres, radii):
        mask |= np.sum(((x - c) / r) ** 2, -1) <= 1.0
    return _largest(mask)


def signed_distance(mask: np.ndarray, fine: float) -> np.ndarray:
    """Signed distance (mm) to the boundary of a fine-grid mask: negative inside, voxel-centred."""
    m = np.pad(mask, 2)
    inside = ndi.distance_transform_edt(m) * fine
    outside = ndi.distance_transform_edt(~m) * fine
    return np.where(m, -(inside - fine / 2), outside - fine / 2).astype(np.float32)


# ---- one synthetic lesion ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Intent:
    """What a synthetic lesion is meant to be (the truth its report states)."""

    organ: str
    organ_id: int
    kind: str  # "abdomen" or "lung"
    shape: str  # round / oval / lobulated / irregular
    diameter_mm: float
    density: str
    hu: float
    heterogeneous: bool
    well_defined: bool
    margin_sigma_mm: float

    @property
    def shape_class(self) -> str:
        return "punctate" if self.diameter_mm <= PUNCTATE_MAX_MM else SHAPE_CLASS[self.shape]


def _choice(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def density_range(density: str, reference_hu: float) -> tuple[float, float] | None:
    """The CT values (HU) a density class may take in an organ of ``reference_hu``; None if none fits."""
    if density in ABSOLUTE_HU:
        lo, hi = ABSOLUTE_HU[density]
        if density == FLUID_LIKE:
            hi = min(hi, reference_hu - 20.0)  # a cyst must still read as darker than its organ
        return (lo, hi) if hi >= lo else None
    lo, hi = (reference_hu + d for d in OFFSET_HU[density])
    if density == HYPODENSE:
        lo = max(lo, HYPO_MIN_HU)
    return (lo, hi) if hi >= lo else None


def draw_intent(organ: str, organ_id: int, reference_hu: float, rng: np.random.Generator, **fixed: Any) -> Intent:
    """Random attributes for a lesion in ``organ`` (any field of :class:`Intent` may be ``fixed``)."""
    kind = "lung" if organ_group(organ) == "lung" else "abdomen"
    weights = {d: w for d, w in DENSITY_WEIGHTS[kind].items() if density_range(d, reference_hu) is not None}
    density = fixed.get("density") or _choice(rng, weights)
    rng_hu = density_range(density, reference_hu)
    if rng_hu is None:
        raise LesionDiffusionError(f"no {density} CT value fits a {organ} of {reference_hu:.0f} HU")
    hu = fixed.get("hu", round(float(rng.uniform(*rng_hu)), 1))
    heterogeneous = fixed.get("heterogeneous", bool(rng.random() < HETEROGENEOUS_P[density]))
    well = fixed.get("well_defined", bool(rng.random() < WELL_DEFINED_P[density]))
    sigma = fixed.get(
        "margin_sigma_mm", round(float(rng.uniform(*A.MARGIN_SIGMA_MM[A.WELL_DEFINED if well else A.ILL_DEFINED])), 2)
    )
    return Intent(
        organ, organ_id, kind, fixed.get("shape") or _choice(rng, SHAPE_WEIGHTS),
        float(fixed.get("diameter_mm", round(float(rng.uniform(*DIAMETER_MM[kind])), 1))),
        density, float(hu), heterogeneous, well, float(sigma),
    )  # fmt: skip


def _lowpass_inside(image: np.ndarray, region: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    m = region.astype(np.float32)
    num = ndi.gaussian_filter(image * m, sigma_vox, truncate=3.0)
    den = ndi.gaussian_filter(m, sigma_vox, truncate=3.0)
    return num / np.maximum(den, 1e-3)


def _crop_around(
    box_lo: Sequence[int], box_hi: Sequence[int], shape: Sequence[int], grow: Sequence[int]
) -> tuple[slice, ...]:
    return tuple(slice(max(0, a - g), min(n, b + g)) for a, b, n, g in zip(box_lo, box_hi, shape, grow))


def donor_residual(
    image: np.ndarray, region: np.ndarray, window: Sequence[slice], spacing: Sequence[float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The scan's own noise for a lesion window: the high-pass residual of ``region`` copied from a window
    of the same size elsewhere in it (outliers and non-region voxels replaced by residuals drawn from the
    rest), and the residual field of the window itself (for ground glass). Arrays of the window's shape."""
    shape = image.shape
    size = [s.stop - s.start for s in window]
    grow = [int(np.ceil(TEXTURE_CROP_MM / sp)) for sp in spacing]
    crop = _crop_around([s.start for s in window], [s.stop for s in window], shape, grow)
    img, reg = image[crop], region[crop]
    residual = img - _lowpass_inside(img, reg, [LOWPASS_MM / sp for sp in spacing])
    values = residual[reg]
    if values.size < 20:
        raise LesionDiffusionError("too few voxels to measure the scan's noise")
    mad = float(np.median(np.abs(values - np.median(values)))) * 1.4826
    inlier = reg & (np.abs(residual) <= OUTLIER_SIGMAS * max(mad, 1e-3))
    pool = residual[inlier]
    own = residual[tuple(slice(w.start - c.start, w.stop - c.start) for w, c in zip(window, crop))]
    # the donor window: of a few random places in the region away from the lesion, the one with most usable voxels
    lo_w = np.array([w.start - c.start for w, c in zip(window, crop)])
    cand = np.argwhere(reg)
    far = np.any(np.abs(cand - (lo_w + np.array(size) // 2)) >= np.array(size), axis=1)
    cand = cand[far]
    best, best_score = None, -1.0
    picks = rng.choice(len(cand), size=min(DONOR_CANDIDATES, len(cand)), replace=False) if len(cand) else []
    for i in picks:
        lo = np.clip(cand[i] - np.array(size) // 2, 0, np.array(img.shape) - np.array(size))
        if np.any(lo < 0):
            continue
        sl = tuple(slice(int(a), int(a) + s) for a, s in zip(lo, size))
        score = float(inlier[sl].mean())
        if score > best_score:
            best, best_score = sl, score
    draw = rng.choice(pool, size=tuple(size))
    if best is None:
        return draw.astype(np.float32), own.astype(np.float32)
    donor = np.where(inlier[best], residual[best], draw)
    return donor.astype(np.float32), own.astype(np.float32)


def _blob_field(
    shape: Sequence[int], spacing: Sequence[float], diameter_mm: float, rng: np.random.Generator
) -> np.ndarray:
    sigma = [max(diameter_mm / 6.0, 2.0) / sp for sp in spacing]
    f = ndi.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32), sigma)
    return f / max(float(f.std()), 1e-6)


def place_within(organ: np.ndarray, size: Sequence[int], rng: np.random.Generator) -> Box | None:
    """A box of exactly ``size`` wholly inside ``organ`` ("within the parenchymal organ",
    :func:`lesiondiffusion.placement.centre_region`), its centre drawn uniformly; None if none fits."""
    if not organ.any():
        return None
    crop = bounding_box(organ).slices  # a box inside the organ lies inside the organ's bounding box
    region = centre_region(organ[crop], V.CAVITY_WITHIN, size, hollow=False)
    flat = np.flatnonzero(region)
    if not flat.size:
        return None
    pick = np.unravel_index(flat[rng.integers(flat.size)], region.shape)
    return Box(tuple(int(p) + s.start for p, s in zip(pick, crop)), tuple(int(v) for v in size))


@dataclass
class Painted:
    """A synthetic lesion written into a copy of a scan."""

    image: np.ndarray  # float32 HU, whole scan
    lesion: np.ndarray  # bool label (d <= 0)
    box: Any  # placement.Box of lesion + margin
    intent: Intent
    weight_window: tuple[slice, ...]


def lesion_window(intent: Intent, spacing: Sequence[float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(signed distance in mm, blend weight) of the lesion on a scan-grid window around it (cropped to its
    margin's reach plus one voxel)."""
    fine = float(np.clip(min(spacing) / 2.0, 0.4, 1.0))
    mask = shape_mask(intent.shape, intent.diameter_mm, fine, rng)
    sdf_fine = signed_distance(mask, fine)
    centre = (np.array(sdf_fine.shape) - 1) / 2.0
    reach = float(np.abs(np.argwhere(mask) - (np.array(mask.shape) - 1) / 2.0).max() * fine) + fine
    sigma = float(np.hypot(intent.margin_sigma_mm, PARTIAL_VOLUME * np.mean(spacing)))
    half = [int(np.ceil((reach + HALO_SIGMAS * sigma) / sp)) + 1 for sp in spacing]
    jitter = rng.uniform(-0.5, 0.5, 3)  # the lesion's centre falls anywhere within its voxel
    coords = np.meshgrid(
        *[(np.arange(-h, h + 1) + j) * sp / fine for h, sp, j in zip(half, spacing, jitter)], indexing="ij"
    )
    sdf = ndi.map_coordinates(sdf_fine, [c + ce for c, ce in zip(coords, centre)], order=1, cval=float(sdf_fine.max()))
    weight = ndtr(-sdf / sigma).astype(np.float32)
    keep = (sdf <= HALO_SIGMAS * sigma) | (sdf <= 0)
    if not (sdf <= 0).any():
        return sdf[:0, :0, :0], weight[:0, :0, :0]
    idx = np.nonzero(keep)
    sl = tuple(slice(max(0, int(i.min()) - 1), int(i.max()) + 2) for i in idx)
    return sdf[sl], weight[sl]


def paint_lesion(
    scan: Scan, intent: Intent, rng: np.random.Generator, avoid: np.ndarray | None = None
) -> Painted | None:
    """Write one lesion of ``intent`` into a copy of ``scan``'s image (shrunk until it fits the organ);
    None when the organ cannot hold it."""
    spacing = scan.spacing
    organ = scan.seg == intent.organ_id
    if avoid is not None:
        organ &= ~avoid
    if not organ.any():
        return None
    for _ in range(MAX_SHRINKS):
        sdf, w = lesion_window(intent, spacing, rng)
        if sdf.size and (sdf <= 0).sum() >= 4:
            box = place_within(organ, sdf.shape, rng)
            if box is not None:
                break
        intent = replace(intent, diameter_mm=round(intent.diameter_mm * SHRINK, 1))
    else:
        return None
    win = box.slices
    label_w = sdf <= 0
    allowed = allowed_region(organ, V.CAVITY_WITHIN, box, hollow=False)[win]
    assert not (label_w & ~allowed).any()  # the box lies inside the organ by construction
    img = scan.image
    if intent.kind == "lung" and intent.density == SOLID_MASS:
        body = np.zeros_like(organ)
        grow = [int(np.ceil(TEXTURE_CROP_MM / sp)) for sp in spacing]
        crop = _crop_around(box.lo, box.hi, img.shape, grow)
        body[crop] = ndi.binary_erosion(img[crop] > BODY_MIN_HU, iterations=2)
        region = body & (img >= SOFT_TISSUE_HU[0]) & (img <= SOFT_TISSUE_HU[1])
    else:
        region = scan.seg == intent.organ_id
    donor, own = donor_residual(img, region, win, spacing, rng)
    orig = img[win]
    heter = np.zeros_like(orig)
    if intent.heterogeneous and intent.density != GROUND_GLASS:
        amp = float(rng.uniform(*BLOB_STD_HU.get(intent.density, BLOB_STD_HU["default"])))
        field = _blob_field(orig.shape, spacing, intent.diameter_mm, rng)
        heter = amp * (field - float(field[label_w].mean()))
    if intent.density == GROUND_GLASS:
        # ground glass over the lung's own texture: only the low-pass level moves towards the fill
        base = orig - w * (orig - own)  # (1 - w) * orig + w * residual ... plus w * fill below
        noise = np.zeros_like(orig)
    else:
        base = (1.0 - w) * orig + w * heter
        noise = np.sqrt(np.clip(1.0 - (1.0 - w) ** 2, 0.0, 1.0)) * donor
    # the fill level whose blended mean over the label is exactly the asked CT value
    known = base + noise
    fill = (intent.hu - float(known[label_w].mean())) / float(w[label_w].mean())
    new = known + w * fill
    if scan.integer:
        new = np.rint(new)
    out = img.copy()
    out[win] = new
    lesion = np.zeros(img.shape, bool)
    lesion[win] = label_w
    return Painted(out, lesion, box, intent, win)


# ---- cases ------------------------------------------------------------------------------------------------------
def _crop_to(mask: np.ndarray, spacing: Sequence[float], margin_mm: float) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    grow = [int(np.ceil(margin_mm / sp)) for sp in spacing]
    return tuple(
        slice(max(0, int(i.min()) - g), min(n, int(i.max()) + 1 + g)) for i, g, n in zip(idx, grow, mask.shape)
    )


def _case_crop(seg: np.ndarray, organ_id: int, spacing: Sequence[float]) -> tuple[slice, ...]:
    """A case's crop: its organ grown by :data:`CASE_CROP_MM`; for a lung, both lungs (every lobe), so
    the map keeps the left/right and upper/lower relations its numbering is told by."""
    table = label_table(VERSION)
    if organ_group(table.name(organ_id)) == "lung":
        return _crop_to(np.isin(seg, table.ids("lung")), spacing, CASE_CROP_MM)
    return _crop_to(seg == organ_id, spacing, CASE_CROP_MM)


def _cropped_affine(affine: np.ndarray, crop: Sequence[slice]) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in crop]
    return affine @ shift


def enhancement_of(phase: str) -> str:
    """The report's enhancement status from a manifest contrast phase ("" when unknown)."""
    low = phase.lower()
    if not low:
        return ""
    return NON_CONTRAST if "non" in low or "native" in low or "without" in low else ENHANCED


def _organ_names(scan: Scan) -> dict[str, list[int]]:
    """Lesion organs of the scan that are large enough: name -> ids (lung: its lobes)."""
    table = label_table(VERSION)
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    counts = np.bincount(scan.seg.ravel(), minlength=256)
    out = {}
    for name in ORGAN_WEIGHTS:
        ids = [i for i in table.ids(name) if counts[i] * voxel_ml >= MIN_ORGAN_ML]
        if ids:
            out[name] = ids
    return out


@dataclass
class ScanContext:
    """Per-scan measurements shared by its cases."""

    scan: Scan
    organs: dict[str, list[int]]
    reference_hu: dict[int, float]


def scan_context(scan: Scan) -> ScanContext:
    """The scan's lesion organs and their parenchyma HU measured in it (abdominal organs too dark are dropped)."""
    table = label_table(VERSION)
    organs, refs = {}, {}
    for name, ids in _organ_names(scan).items():
        keep = []
        for i in ids:
            ref = organ_reference_hu(scan.image, scan.seg == i, scan.spacing)
            if ref is None or (name != "lung" and ref < MIN_REFERENCE_HU):
                logger.info("%s: %s skipped (reference %s HU)", scan.meta.id, table.name(i), ref)
                continue
            refs[i] = round(ref, 1)
            keep.append(i)
        if keep:
            organs[name] = keep
    return ScanContext(scan, organs, refs)


def synthetic_case(ctx: ScanContext, rng: np.random.Generator, **fixed: Any) -> dict[str, Any] | None:
    """One synthetic-lesion case of the scan (image, label, organ map on a crop; report; truth)."""
    scan = ctx.scan
    table = label_table(VERSION)
    for attempt in range(MAX_ATTEMPTS):
        name = fixed.get("organ") or _choice(rng, {n: ORGAN_WEIGHTS[n] for n in ctx.organs})
        if name not in ctx.organs:
            raise LesionDiffusionError(f"{scan.meta.id}: no {name} large enough for a lesion")
        ids = ctx.organs[name]
        sizes = np.array([np.count_nonzero(scan.seg == i) for i in ids], float)
        organ_id = ids[int(rng.choice(len(ids), p=sizes / sizes.sum()))]
        intent_fixed = {k: v for k, v in fixed.items() if k != "organ"}
        intent = draw_intent(table.name(organ_id), organ_id, ctx.reference_hu[organ_id], rng, **intent_fixed)
        painted = paint_lesion(scan, intent, rng)
        if painted is None:
            logger.debug("%s attempt %d: the %s cannot hold the lesion", scan.meta.id, attempt, intent.organ)
            continue
        return _finish_synthetic(ctx, painted)
    return None


def _finish_synthetic(ctx: ScanContext, p: Painted) -> dict[str, Any]:
    scan, intent = ctx.scan, p.intent
    organ = scan.seg == intent.organ_id
    crop = _case_crop(scan.seg, intent.organ_id, scan.spacing)
    label = np.where(organ, 1, 0).astype(np.uint8)
    label[p.lesion] = 2
    image, label, seg = p.image[crop], label[crop], scan.seg[crop]
    m = measure_lesion(image, label, seg, scan.spacing, intent.organ_id, VERSION)
    read = report_from_measurements(m, VERSION)
    attrs = dict(read.attributes)
    shape = [intent.shape_class]
    attrs.update({
        V.ENHANCEMENT: enhancement_of(scan.meta.contrast_phase) or attrs[V.ENHANCEMENT],
        V.SHAPE: V.format_classes(shape),
        V.DENSITY: V.format_classes([intent.density]),
        V.DENSITY_VARIATIONS: "heterogeneous," if intent.heterogeneous else "homogeneous,",
        V.SURFACE: margin_text(intent.organ, intent.well_defined) + ",",
        V.CAVITY: V.CAVITY_WITHIN,
    })  # fmt: skip
    report = LesionReport(
        intent.organ_id, attrs, read.centre, read.size, summary=attrs[V.SHAPE], note=LESION_TYPE[intent.density]
    )
    truth = {
        "kind": "synthetic", "scan": scan.meta.id, "organ": intent.organ, "organ_id": intent.organ_id,
        "shape": intent.shape, "shape_class": intent.shape_class, "diameter_mm": intent.diameter_mm,
        "density": intent.density, "lesion_hu": intent.hu, "measured_mean_hu": round(m.mean_hu, 1),
        "reference_hu": ctx.reference_hu[intent.organ_id], "heterogeneous": intent.heterogeneous,
        "margin": "well-defined" if intent.well_defined else "ill-defined", "margin_sigma_mm": intent.margin_sigma_mm,
        "lesion_voxels": int(p.lesion.sum()), "box": p.box.to_json(), "crop_start": [s.start for s in crop],
        "read": _read_summary(read),
    }  # fmt: skip
    return {"image": image, "label": label, "seg": seg, "affine": _cropped_affine(scan.affine, crop),
            "integer": scan.integer, "report": Report((report,)), "truth": truth}  # fmt: skip


WELL_DEFINED_CLASSES = ("well-defined margin", "clear serosal surface", "clear boundary with the renal parenchyma")


def _read_summary(read: LesionReport) -> dict[str, Any]:
    """What extraction reads from a lesion (to compare with the truth)."""
    return {
        "density": (read.classes(V.DENSITY) or [""])[0],
        "heterogeneous": read.classes(V.DENSITY_VARIATIONS) == ["heterogeneous"],
        "well_defined": any(c in WELL_DEFINED_CLASSES for c in read.classes(V.SURFACE)),
        "shape_class": (read.classes(V.SHAPE) or [""])[0],
    }


def real_case(scan: Scan) -> dict[str, Any] | None:
    """The scan's real lesion as a case, its report extracted from the image; None if no organ holds it."""
    lesion = scan.lesion
    assert lesion is not None
    shell = ndi.binary_dilation(lesion, iterations=2) & ~lesion
    ids = scan.seg[shell]
    ids = ids[ids > 0]
    if not ids.size:
        logger.warning("%s: no organ of the map touches the real lesion; not used", scan.meta.id)
        return None
    organ_id = int(np.bincount(ids).argmax())
    seg = scan.seg.copy()
    seg[lesion] = organ_id  # the lesion lies in its organ (the map, by HU or network, may leave it out)
    organ = seg == organ_id
    crop = _case_crop(seg, organ_id, scan.spacing)
    label = np.where(organ, 1, 0).astype(np.uint8)
    label[lesion] = 2
    image, label, seg = scan.image[crop], label[crop], seg[crop]
    report = extract_report(image, label, seg, scan.spacing, organ_id, version=VERSION)
    if not report.attributes.get(V.ENHANCEMENT):
        attrs = {**report.attributes, V.ENHANCEMENT: enhancement_of(scan.meta.contrast_phase)}
        report = LesionReport(report.organ_id, attrs, report.centre, report.size, report.summary, report.note)
    m = measure_lesion(image, label, seg, scan.spacing, organ_id, VERSION)
    truth = {
        "kind": "real", "scan": scan.meta.id, "organ": label_table(VERSION).name(organ_id), "organ_id": organ_id,
        "measured_mean_hu": round(m.mean_hu, 1), "reference_hu": None if m.reference_hu is None else round(m.reference_hu, 1),
        "equivalent_diameter_mm": round(m.equivalent_diameter_mm, 1), "lesion_voxels": int(lesion.sum()),
        "crop_start": [s.start for s in crop], "read": _read_summary(report),
    }  # fmt: skip
    return {"image": image, "label": label, "seg": seg, "affine": _cropped_affine(scan.affine, crop),
            "integer": scan.integer, "report": Report((report,)), "truth": truth}  # fmt: skip


def _save_case(dest: Path, case: dict[str, Any]) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    files = {k: dest / n for k, n in CASE_FILES.items()}
    save_nifti(files["image"], case["image"], case["affine"], dtype=np.int16 if case["integer"] else np.float32)
    save_nifti(files["label"], case["label"], case["affine"], dtype=np.uint8)
    save_nifti(files["organ_seg"], case["seg"], case["affine"], dtype=np.uint8)
    write_report(files["report"], case["report"])
    return files


# ---- splits and requests ------------------------------------------------------------------------------------------
def split_scans(ids: Sequence[str], val_scans: Sequence[str] | None, val_fraction: float, seed: int) -> list[str]:
    """The held-out scan ids: ``val_scans`` when given (each must exist), else ``round(n * val_fraction)``
    (at least one when there are two or more scans and the fraction is > 0), drawn with ``seed``."""
    if val_scans:
        unknown = [s for s in val_scans if s not in ids]
        if unknown:
            raise LesionDiffusionError(f"val_scans {unknown} are not scans of the corpus ({', '.join(ids)})")
        if len(set(val_scans)) == len(ids):
            raise LesionDiffusionError("val_scans holds every scan: no training scan is left")
        return list(dict.fromkeys(val_scans))
    return sorted(ids[i] for i in holdout_indices(len(ids), val_fraction, [int(seed), 7])[1])


def scan_requests(
    ctx: ScanContext, base: str, image: Path, seg: Path, rng: np.random.Generator, per_scan: int
) -> tuple[list[SynthesisRequest], list[dict]]:
    """Up to ``per_scan`` groups of requests on a held-out scan, each a lesion in one organ that differs only
    in density (a lesion of the asked size must fit the organ). The organs are taken in turn; with more
    groups than organs, each further round asks another size (:data:`REQUEST_SIZE_STEPS`) and alternates
    well- and ill-defined margins."""
    table = label_table(VERSION)
    requests, groups = [], []
    ranked = sorted(ctx.organs, key=lambda n: -ORGAN_WEIGHTS[n])
    rounds = [(r, name) for r in range(len(REQUEST_SIZE_STEPS)) for name in ranked][: int(per_scan)]
    for r, name in rounds:
        organ_id = max(ctx.organs[name], key=lambda i: np.count_nonzero(ctx.scan.seg == i))
        organ = table.name(organ_id)
        kind = "lung" if name == "lung" else "abdomen"
        well_defined = r % 2 == 0
        size = round(REQUEST_DIAMETER_MM[kind] * REQUEST_SIZE_STEPS[r], 1)
        fits = None
        for _ in range(MAX_SHRINKS):
            probe = draw_intent(organ, organ_id, ctx.reference_hu[organ_id], rng, density=REQUEST_DENSITIES[kind][1 if kind == "abdomen" else 0],
                                shape="round", diameter_mm=size, well_defined=well_defined, heterogeneous=False)  # fmt: skip
            sdf, _ = lesion_window(probe, ctx.scan.spacing, rng)
            if sdf.size and place_within(ctx.scan.seg == organ_id, sdf.shape, rng) is not None:
                fits = size
                break
            size = round(size * SHRINK, 1)
        if fits is None:
            continue
        group = {"image": base, "organ": organ, "organ_id": organ_id, "reference_hu": ctx.reference_hu[organ_id], "round": r,
                 "size_mm": int(round(fits)), "cases": []}  # fmt: skip
        for density in REQUEST_DENSITIES[kind]:
            case = f"{base}_{name.replace(' ', '_')}{f'_r{r}' if r else ''}_{REQUEST_SUFFIX[density]}"
            attributes = {
                "organ type": organ, "lesion type": LESION_TYPE[density], V.DENSITY: density,
                V.DENSITY_VARIATIONS: "homogeneous", V.CAVITY: V.CAVITY_WITHIN, V.SIZE: f"{int(round(fits))} mm",
            }  # fmt: skip
            if r:  # the first round keeps the attributes it always had
                attributes[V.SURFACE] = "well-defined margin" if well_defined else "ill-defined margin"
            requests.append(SynthesisRequest(case, image, attributes, seg))
            group["cases"].append(case)
        groups.append(group)
    return requests, groups


# ---- the product --------------------------------------------------------------------------------------------------
def _rng(seed: int, scan_index: int, case_index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(scan_index), int(case_index)])


def _rate(values: Sequence[bool]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def agreement(truths: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How often extraction reads the painted truth back (synthetic cases)."""
    syn = [t for t in truths if t["kind"] == "synthetic"]
    return {
        "cases": len(syn),
        "density": _rate([t["read"]["density"] == t["density"] for t in syn]),
        "homogeneity": _rate([t["read"]["heterogeneous"] == t["heterogeneous"] for t in syn]),
        "margin": _rate([t["read"]["well_defined"] == (t["margin"] == "well-defined") for t in syn]),
        "shape": _rate([t["read"]["shape_class"] == t["shape_class"] for t in syn]),
        "median_abs_hu_error": round(float(np.median([abs(t["measured_mean_hu"] - t["lesion_hu"]) for t in syn])), 2)
        if syn
        else None,
    }


def build_real_dataset(
    corpus: Path,
    out: Path,
    lesions_per_scan: int = 8,
    seed: int = 0,
    val_scans: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    requests_per_scan: int = 2,
    segmenter: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write the dataset (cases, list files, datalist, ``dataset.json``, README, held-out requests) into
    ``out`` atomically; see the module notes. Returns ``out``."""
    start = time.perf_counter()
    corpus, out = Path(corpus), Path(out)
    if int(lesions_per_scan) < 0:
        raise LesionDiffusionError(f"lesions_per_scan must be >= 0, got {lesions_per_scan}")
    if out.resolve() == corpus.resolve() or corpus.resolve() in out.resolve().parents:
        raise InputError(out, "output folder is inside the corpus; the corpus is never written")
    metas = read_corpus(corpus)
    held = set(split_scans([m.id for m in metas], val_scans, val_fraction, seed))
    final_out = out.resolve()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        splits: dict[str, list[tuple[Case, Case]]] = {"training": [], "validation": []}
        truths, scans_info, requests, groups = [], [], [], []
        for si, meta in enumerate(tqdm(metas, desc="scans", unit="scan", disable=None)):
            scan = load_scan(meta, segmenter)
            ctx = scan_context(scan)
            split = "validation" if meta.id in held else "training"
            built = []
            if scan.lesion is not None:
                case = real_case(scan)
                if case is not None:
                    built.append((f"{meta.id}_real", case))
            else:
                for ci in tqdm(range(int(lesions_per_scan)), desc=meta.id, unit="lesion", leave=False, disable=None):
                    if not ctx.organs:
                        break
                    case = synthetic_case(ctx, _rng(seed, si, ci))
                    if case is None:
                        logger.warning("%s: lesion %d fits no organ in %d draws; skipped", meta.id, ci, MAX_ATTEMPTS)
                        continue
                    built.append((f"{meta.id}_{ci:03d}", case))
            for name, case in built:
                files = _save_case(tmp / "cases" / name, case)
                splits[split].append(
                    (Case(**files), Case(**{k: final_out / p.relative_to(tmp) for k, p in files.items()}))
                )
                truths.append({"case": name, "split": split, **case["truth"]})
                t = case["truth"]
                logger.info("%s: %s %s, %s HU", name, t["kind"], t["organ"], t["measured_mean_hu"])
            info = {"id": meta.id, "split": split, "organ_seg_source": scan.seg_source, "organ_seg_version": VERSION,
                    "source_organ_seg_version": meta.organ_seg_version, "contrast_phase": meta.contrast_phase,
                    "spacing_mm": [round(s, 4) for s in scan.spacing], "shape": list(scan.image.shape),
                    "lesion_organs": {n: [label_table(VERSION).name(i) for i in ids] for n, ids in ctx.organs.items()},
                    "reference_hu": {label_table(VERSION).name(i): v for i, v in ctx.reference_hu.items()},
                    "real_lesion": scan.lesion is not None, "cases": len(built)}  # fmt: skip
            if split == "validation":
                if scan.lesion is not None:
                    info["requests"] = "none: the scan holds a real lesion (not lesion-free)"
                else:
                    image_path = tmp / "requests" / "images" / f"{meta.id}.nii.gz"
                    seg_path = tmp / "requests" / "organ_segs" / f"{meta.id}.nii.gz"
                    image_path.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(meta.image, image_path)  # the scan exactly as in the corpus
                    save_nifti(seg_path, scan.seg, scan.affine, dtype=np.uint8)
                    r, g = scan_requests(ctx, meta.id, image_path, seg_path, _rng(seed, si, 10_000), requests_per_scan)
                    requests += r
                    groups += g
                    info["requests"] = len(r)
            scans_info.append(info)
        if not splits["training"]:
            raise LesionDiffusionError(
                f"{corpus}: no training case could be built (no scan has an organ that holds a lesion)"
            )
        write_datalist(tmp / "datalist.json", {k: [b for b, _ in v] for k, v in splits.items() if v}, VERSION)
        write_list_files(tmp, "train", [f for _, f in splits["training"]])
        if splits["validation"]:
            write_list_files(tmp, "val", [f for _, f in splits["validation"]])
        if requests:
            write_requests(tmp / "requests" / "requests.json", requests, VERSION)
        summary = {
            "training_cases": len(splits["training"]), "validation_cases": len(splits["validation"]),
            "requests": len(requests), "seconds": round(time.perf_counter() - start, 1), "agreement": agreement(truths),
        }  # fmt: skip
        write_json(tmp / "dataset.json", {
            "generator": "lesiondiffusion.real_dataset", "corpus": str(corpus.resolve()), "seed": seed,
            "lesions_per_scan": lesions_per_scan, "val_scans": sorted(held), "organ_seg_version": VERSION,
            "summary": summary, "scans": scans_info, "density_groups": groups, "cases": truths,
        })  # fmt: skip
        write_text(tmp / "README.md", _readme(scans_info, summary, sorted(held)))
    logger.info("%d training and %d validation cases, %d requests written to %s in %.0f s", summary["training_cases"],
                summary["validation_cases"], summary["requests"], out, time.perf_counter() - start)  # fmt: skip
    return out


def _readme(scans: Sequence[dict[str, Any]], summary: dict[str, Any], held: Sequence[str]) -> str:
    rows = "\n".join(
        f"| {s['id']} | {s['split']} | {s['organ_seg_source']} | {s['contrast_phase'] or 'unknown'} | "
        f"{', '.join(s['lesion_organs']) or '-'} | {s['cases']} | {s.get('requests', '-')} |"
        for s in scans
    )
    a = summary["agreement"]
    return f"""# Lesions of known attributes in real CT scans

Built by `lesiondiffusion make-dataset --source real` (module `lesiondiffusion.real_dataset`, whose
docstring describes every rule). Cases: `cases/<case>/image.nii.gz` (the scan, cropped around the
lesion's organ, with the lesion written in), `label.nii.gz` (0 background, 1 organ, 2 lesion),
`organ_seg.nii.gz` (TotalSegmentator v1 ids) and `type.json` (the report: the true attributes).
Splits: `train_*_list.txt` / `val_*_list.txt` and `datalist.json`; whole scans are held out
({', '.join(held) or 'none'}). `requests/requests.json` asks for lesions in the held-out lesion-free scans
(`lesiondiffusion synthesize --requests` then `lesiondiffusion evaluate --requests`). `dataset.json`
holds each case's truth and what report extraction reads from it.

| scan | split | organ map | contrast | lesion organs | cases | requests |
| --- | --- | --- | --- | --- | --- | --- |
{rows}

{summary['training_cases']} training and {summary['validation_cases']} validation cases, {summary['requests']}
requests, built in {summary['seconds']} s. Extraction reads the painted truth back for
{a['cases']} synthetic lesions: density {a['density']}, homogeneity {a['homogeneity']}, margin {a['margin']},
shape {a['shape']}; median |mean HU - asked| {a['median_abs_hu_error']} HU.

Approximations: organ maps made by HU thresholds ("threshold" above) label only the lungs, each lung
cut at half its height into "upper" and "lower" lobe (fissures not found; trachea and main bronchi left
out with a band around the body's midline). Real lesions are added to the organ they lie in. Synthetic lesions keep
the scan's own noise (copied high-pass residual) but not the scan's reconstruction of a real lesion's
edge; a lesion shape is parametric (ellipsoids, lobulated, irregular blobs).
"""
