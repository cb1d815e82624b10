"""A ground-truth training set: phantom CTs with lesions whose every attribute is known.

The demo organ maps (``data/demo/<Case>/totalseg_health.nii.gz``, 1 mm) are resampled to a
random voxel size (:data:`SPACING_MM`) on a random crop around an organ (at most
:data:`MAX_SHAPE` voxels per axis), and a phantom CT (:mod:`lesiondiffusion.phantom`) is painted on it
with one lesion:

- **Organ.** Solid (liver, spleen, kidneys, pancreas) or hollow (urinary bladder, colon, stomach,
  gallbladder), drawn with :data:`ORGAN_WEIGHTS` from the demo maps that hold enough of it.
- **Shape.** Either a real demo lesion (label 2 of a demo case) rotated, flipped and rescaled, or a
  random blob: an ellipsoid (round-like) or an ellipsoid with a smooth random boundary (irregular).
- **Size.** Equivalent-sphere diameter drawn from :data:`DIAMETER_MM`, shrunk until the lesion fits.
- **Cavity.** Solid organs: the whole lesion and its one-voxel shell inside the organ ("within the
  parenchymal organ"). Hollow organs: in the lumen (centre deeper than the wall) or a wall thickening
  (centre at the wall, lesion clipped to the organ). The lesion never leaves its organ.
- **Density.** A class (:data:`DENSITY_WEIGHTS`) sets the lesion's mean HU against the organ's
  reference (:func:`lesiondiffusion.attributes.density_reference_hu`): hypo/iso/hyper as offsets
  (:data:`OFFSET_HU`), fluid-like as absolute water-like HU, mixed as blobs around the reference.
- **Homogeneity.** Heterogeneous lesions get the phantom's smooth brighter/darker blobs.

Each lesion is then measured back (:func:`lesiondiffusion.reports.extraction.measure_lesion`); a draw whose
measured density class, homogeneity or cavity differs from the intended one is redrawn (at most
:data:`MAX_ATTEMPTS` times per case), so the written report (``type.json``, through
:mod:`lesiondiffusion.report`) is both what was painted and what extraction reads. Shape, surface,
relationship and specific-feature words are the measured ones (the same rules as extraction); the
CT value is the lesion's exact mean HU; the box is the lesion's bounding box on the case's grid.

:func:`build_dataset` writes ``cases/<case>/{image,label,organ_seg}.nii.gz + type.json``, the four
list files per split (``train_*``, ``val_*``) and ``datalist.json``. :func:`build_requests` writes
held-out synthesis requests from the same generator: lesion-free phantoms, their organ maps and
``requests.json`` in groups of three that differ only in density (hypo / iso / hyper).
Every draw comes from ``numpy.random.default_rng([seed, case index, mode])``: same seed, same data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from lesiondiffusion import vocabulary as V
from lesiondiffusion.attributes import (
    DENSITY_ABSOLUTE_HU,
    ENHANCED,
    FLUID_MAX_HU,
    HOLLOW_WALL_MM,
    density_reference_hu,
    is_hollow_name,
)
from lesiondiffusion.dataset import Case, holdout_indices, write_datalist, write_list_files
from lesiondiffusion.demo import SOURCE_FILES, find_demo_cases
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import atomic_dir, read_nifti_array, save_nifti, write_json
from lesiondiffusion.labels import LESION_LABEL, label_table
from lesiondiffusion.phantom import axial_axis_of, make_phantom, organ_hu, read_organ_map
from lesiondiffusion.report import Report
from lesiondiffusion.reports.extraction import measure_lesion, report_from_measurements
from lesiondiffusion.requests import SynthesisRequest, write_requests

logger = logging.getLogger(__name__)

VERSION = "v1"  # the demo organ maps are TotalSegmentator v1

# ---- what is drawn ------------------------------------------------------------------------------------
# organ name -> weight; solid and hollow organs of the demo maps large enough to hold a lesion
ORGAN_WEIGHTS: dict[str, float] = {
    "liver": 0.24,
    "kidney right": 0.08,
    "kidney left": 0.08,
    "spleen": 0.1,
    "pancreas": 0.08,
    "urinary bladder": 0.16,
    "colon": 0.1,
    "stomach": 0.1,
    "gallbladder": 0.06,
}
MIN_ORGAN_VOXELS_1MM = 15000  # a demo map must hold at least this much of the organ (1 mm voxels)
SPACING_MM = (1.5, 2.0)  # isotropic voxel size, drawn uniformly in this range
MIN_SHAPE, MAX_SHAPE = 48, 96  # crop size per axis (voxels)
DIAMETER_MM = {"solid": (10.0, 40.0), "lumen": (10.0, 30.0), "wall": (10.0, 22.0)}
SHRINK, MAX_SHRINKS = 0.8, 6  # a lesion that does not fit is shrunk by this factor, this many times

HYPO, ISO, HYPER = "hypodense lesion", "isodense lesion", "hyperdense lesion"
MIXED, FLUID = "mixed-density lesion", "hypoattenuating fluid-like lesion"
DENSITY_WEIGHTS = {
    "solid": {FLUID: 0.2, HYPO: 0.3, ISO: 0.15, HYPER: 0.25, MIXED: 0.1},
    "hollow": {HYPO: 0.3, ISO: 0.35, HYPER: 0.35},
}
# mean HU relative to the organ reference; kept clear of the class thresholds (+-10 HU) so that partial
# volume and noise do not move a lesion across them
OFFSET_HU = {HYPO: (-50.0, -20.0), ISO: (-5.0, 5.0), HYPER: (20.0, 60.0), MIXED: (-3.0, 3.0)}
HYPO_MIN_HU = FLUID_MAX_HU + 5.0  # a hypodense (not fluid) lesion stays above water-like HU
HETEROGENEOUS_P = {HYPO: 0.4, HYPER: 0.4, ISO: 0.0, FLUID: 0.0, MIXED: 1.0}
DEMO_SHAPE_P = 0.35  # probability of a real demo lesion shape (else a random blob)
ROUND_P = 0.5  # probability that a blob is a plain ellipsoid
MAX_ATTEMPTS = 8
LESION_TYPE = {FLUID: "cyst", HYPO: "tumor", ISO: "tumor", HYPER: "tumor", MIXED: "tumor"}
REQUEST_DENSITIES = (HYPO, ISO, HYPER)

CASE_FILES = {"image": "image.nii.gz", "label": "label.nii.gz", "organ_seg": "organ_seg.nii.gz", "report": "type.json"}


# ---- demo source ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceMap:
    """One demo organ map (1 mm) with its lesion mask (for lesion shapes)."""

    name: str
    seg: np.ndarray  # int16 labels
    affine: np.ndarray
    lesion: np.ndarray  # bool, cropped to its bounding box
    organ_voxels: Mapping[int, int]


def load_sources(src: Path) -> list[SourceMap]:
    """The demo cases of ``src`` as :class:`SourceMap` (only read)."""
    out = []
    for folder in find_demo_cases(Path(src)):
        seg, img = read_organ_map(folder / SOURCE_FILES["organ_seg"])
        zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
        if not np.allclose(zooms, 1.0, atol=0.05):
            raise InputError(
                folder / SOURCE_FILES["organ_seg"], f"expected a 1 mm organ map, got voxel size {tuple(zooms)}"
            )
        label, _ = read_nifti_array(folder / SOURCE_FILES["label"])
        if label.shape != seg.shape:
            raise InputError(
                folder / SOURCE_FILES["label"], f"shape {label.shape} differs from the organ map's {seg.shape}"
            )
        lesion = np.rint(label) == LESION_LABEL
        if not lesion.any():
            raise InputError(folder / SOURCE_FILES["label"], "no lesion voxels (label 2)")
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(lesion))
        seg = np.rint(seg).astype(np.int16)
        ids, counts = np.unique(seg, return_counts=True)
        out.append(
            SourceMap(folder.name, seg, img.affine.copy(), lesion[box].copy(), dict(zip(ids.tolist(), counts.tolist())))
        )
    return out


# ---- geometry helpers -------------------------------------------------------------------------------------
def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def _local_coords(half: int, spacing: float) -> np.ndarray:
    """(3, n, n, n) physical coordinates (mm) of a cube of ``2 * half + 1`` voxels centred on 0."""
    ax = (np.arange(2 * half + 1) - half) * spacing
    return np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))


def demo_shape(template: np.ndarray, diameter_mm: float, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """A demo lesion mask (1 mm) rotated, flipped and rescaled to ``diameter_mm`` (equivalent sphere)."""
    src_diameter = (6.0 * template.sum() / np.pi) ** (1.0 / 3.0)
    scale = diameter_mm / src_diameter
    centroid = np.array(ndi.center_of_mass(template))
    reach = float(np.linalg.norm(np.argwhere(template) - centroid, axis=1).max()) + 1.0
    half = int(np.ceil(scale * reach / spacing)) + 1
    x = _local_coords(half, spacing).reshape(3, -1)
    flips = np.where(rng.random(3) < 0.5, -1.0, 1.0)
    rot = _rotation(rng)
    src = centroid[:, None] + (flips[:, None] * (rot.T @ x)) / scale  # inverse of x = R F (src - c) * scale
    values = ndi.map_coordinates(template.astype(np.float32), src, order=1, cval=0.0)
    mask = values.reshape((2 * half + 1,) * 3) >= 0.5
    return _largest_component(mask)


def blob_shape(diameter_mm: float, spacing: float, rng: np.random.Generator, irregular: bool) -> np.ndarray:
    """An ellipsoid of equivalent diameter ``diameter_mm``; ``irregular`` adds a smooth random boundary."""
    axes = rng.uniform(0.75, 1.3, 3) if not irregular else rng.uniform(0.6, 1.5, 3)
    axes = axes / np.prod(axes) ** (1.0 / 3.0) * diameter_mm / 2.0  # same volume as the sphere
    half = int(np.ceil(axes.max() * (1.6 if irregular else 1.0) / spacing)) + 2
    x = _local_coords(half, spacing)
    q = np.einsum("ij,j...->i...", _rotation(rng), x)
    r = np.sqrt(np.sum((q / axes[:, None, None, None]) ** 2, axis=0))
    if irregular:
        sigma = max(0.8, 0.25 * diameter_mm / spacing)
        field = ndi.gaussian_filter(rng.standard_normal(r.shape).astype(np.float32), sigma)
        field /= max(float(field.std()), 1e-6)
        r = r + rng.uniform(0.25, 0.45) * field
    mask = _largest_component(r <= 1.0)
    if not mask.any():
        mask[half, half, half] = True
    return mask


def _trim(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` cropped to its voxels and the offset of the crop's centre voxel (for placement)."""
    idx = np.nonzero(mask)
    lo = np.array([int(i.min()) for i in idx])
    hi = np.array([int(i.max()) for i in idx])
    trimmed = mask[tuple(slice(a, b + 1) for a, b in zip(lo, hi))]
    return trimmed, (hi - lo) // 2


def _paste(shape: Sequence[int], mask: np.ndarray, centre: Sequence[int]) -> np.ndarray | None:
    """``mask`` placed with its box centre at ``centre`` in an array of ``shape``; None if it leaves it."""
    trimmed, mid = _trim(mask)
    start = np.asarray(centre) - mid
    stop = start + np.asarray(trimmed.shape)
    if np.any(start < 0) or np.any(stop > np.asarray(shape)):
        return None
    out = np.zeros(shape, bool)
    out[tuple(slice(int(a), int(b)) for a, b in zip(start, stop))] = trimmed
    return out


# ---- one case ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A resampled crop of a demo organ map."""

    source: str
    seg: np.ndarray
    affine: np.ndarray
    spacing: float


def sample_grid(source: SourceMap, organ_id: int, rng: np.random.Generator) -> Grid:
    """A random-spacing, random-size crop of ``source`` around a random voxel of ``organ_id`` (nearest)."""
    spacing = float(np.round(rng.uniform(*SPACING_MM), 2))
    shape = rng.integers(MIN_SHAPE, MAX_SHAPE + 1, 3)
    organ_idx = np.argwhere(source.seg == organ_id)
    centre = organ_idx[int(rng.integers(len(organ_idx)))].astype(float)
    extent = shape * spacing
    centre = centre + rng.uniform(-0.15, 0.15, 3) * extent  # the organ is not always in the middle
    start = centre - (shape - 1) / 2.0 * spacing
    idx = [np.rint(start[a] + np.arange(shape[a]) * spacing).astype(int) for a in range(3)]
    inside = [(i >= 0) & (i < n) for i, n in zip(idx, source.seg.shape)]
    clipped = [np.clip(i, 0, n - 1) for i, n in zip(idx, source.seg.shape)]
    seg = source.seg[np.ix_(*clipped)].copy()
    seg[~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])] = 0
    # new voxel i sits at source voxel start + i * spacing (array axes of the 1 mm source)
    step = np.diag([spacing, spacing, spacing, 1.0])
    step[:3, 3] = start
    return Grid(source.name, seg, source.affine @ step, spacing)


@dataclass(frozen=True)
class Intent:
    """What a case is meant to show (the truth the report states)."""

    organ_id: int
    organ: str
    cavity: str
    density: str
    heterogeneous: bool
    diameter_mm: float
    shape_kind: str  # "demo", "round" or "irregular"


def _organ_kind(organ: str) -> str:
    return "hollow" if is_hollow_name(organ) else "solid"


def _choice(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def draw_intent(organ: str, rng: np.random.Generator, density: str | None = None) -> Intent:
    """Random attributes for a lesion in ``organ`` (``density`` fixed when given)."""
    organ_id = label_table(VERSION).id(organ)
    kind = _organ_kind(organ)
    if kind == "hollow":
        cavity = V.CAVITY_LUMEN if rng.random() < 0.6 else V.CAVITY_WALL
    else:
        cavity = V.CAVITY_WITHIN
    density = density or _choice(rng, DENSITY_WEIGHTS[kind])
    heterogeneous = bool(rng.random() < HETEROGENEOUS_P[density])
    size_key = "solid" if kind == "solid" else ("lumen" if cavity == V.CAVITY_LUMEN else "wall")
    diameter = float(rng.uniform(*DIAMETER_MM[size_key]))
    u = rng.random()
    shape_kind = "demo" if u < DEMO_SHAPE_P else ("round" if rng.random() < ROUND_P else "irregular")
    return Intent(organ_id, organ, cavity, density, heterogeneous, diameter, shape_kind)


def lesion_hu(intent: Intent, rng: np.random.Generator) -> float:
    """The lesion's mean HU for its density class against the organ's reference."""
    if intent.density == FLUID:
        lo, hi = DENSITY_ABSOLUTE_HU[FLUID]
        return round(float(rng.uniform(lo, hi)), 1)
    ref = density_reference_hu(intent.organ, None if is_hollow_name(intent.organ) else organ_hu(intent.organ))
    lo, hi = (ref + d for d in OFFSET_HU[intent.density])
    if intent.density == HYPO:
        lo = max(lo, HYPO_MIN_HU)
        hi = max(hi, lo)
    return round(float(rng.uniform(lo, hi)), 1)


def _candidates(organ: np.ndarray, spacing: float, reach_mm: float, cavity: str) -> np.ndarray:
    """Voxels where a lesion centre may go: deep enough for the lesion (solid, lumen) or at the wall."""
    depth = ndi.distance_transform_edt(np.pad(organ, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    if cavity == V.CAVITY_WALL:
        return organ & (depth >= spacing) & (depth <= min(3.0, HOLLOW_WALL_MM - spacing))
    need = reach_mm + spacing  # the lesion's one-voxel shell stays in the organ
    if cavity == V.CAVITY_LUMEN:
        need = max(need, HOLLOW_WALL_MM + 2 * spacing)
    return organ & (depth >= need)


def place_lesion(
    grid: Grid, intent: Intent, templates: Sequence[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, Intent] | None:
    """A lesion mask in ``grid`` for ``intent`` (shrunk until it fits); None when the organ cannot hold one."""
    organ = grid.seg == intent.organ_id
    if organ.sum() < 30:
        return None
    diameter = intent.diameter_mm
    for _ in range(MAX_SHRINKS):
        if intent.shape_kind == "demo":
            mask = demo_shape(templates[int(rng.integers(len(templates)))], diameter, grid.spacing, rng)
        else:
            mask = blob_shape(diameter, grid.spacing, rng, irregular=intent.shape_kind == "irregular")
        if mask.sum() < 4:
            diameter /= SHRINK
            continue
        trimmed, mid = _trim(mask)
        pts = np.argwhere(trimmed) - mid
        reach = float(np.linalg.norm(pts * grid.spacing, axis=1).max())
        cand = np.argwhere(_candidates(organ, grid.spacing, reach, intent.cavity))
        if len(cand):
            centre = cand[int(rng.integers(len(cand)))]
            placed = _paste(grid.seg.shape, trimmed, centre)
            if placed is not None:
                placed &= organ  # wall lesions are clipped to the organ; the others are inside already
                if placed.sum() >= 4:
                    return placed, replace(intent, diameter_mm=round(diameter, 1))
        diameter *= SHRINK
    return None


def _measured(image: np.ndarray, label: np.ndarray, grid: Grid, organ_id: int):
    m = measure_lesion(image, label, grid.seg, (grid.spacing,) * 3, organ_id, VERSION)
    return m, report_from_measurements(m, VERSION)


def make_case(sources: Sequence[SourceMap], rng: np.random.Generator, organ: str | None = None) -> dict[str, Any]:
    """One case (image, label, organ map, report, grid) whose measured attributes equal the intended ones.

    Redraws (organ crop, lesion, HU, noise) up to :data:`MAX_ATTEMPTS` times; an error if none agrees.
    """
    templates = [s.lesion for s in sources]
    for attempt in range(MAX_ATTEMPTS):
        name = organ or _choice(rng, _available_organs(sources))
        organ_id = label_table(VERSION).id(name)
        holders = [s for s in sources if s.organ_voxels.get(organ_id, 0) >= MIN_ORGAN_VOXELS_1MM]
        source = holders[int(rng.integers(len(holders)))]
        grid = sample_grid(source, organ_id, rng)
        intent = draw_intent(name, rng)
        placed = place_lesion(grid, intent, templates, rng)
        if placed is None:
            logger.debug("attempt %d: the %s in this crop cannot hold the lesion", attempt, name)
            continue
        lesion, intent = placed
        hu = lesion_hu(intent, rng)
        label = np.where(grid.seg == organ_id, 1, 0).astype(np.uint8)
        label[lesion] = 2
        image = make_phantom(
            grid.seg, (grid.spacing,) * 3, seed=int(rng.integers(2**31)), version=VERSION, lesion_mask=lesion,
            lesion_hu=hu, lesion_heterogeneous=intent.heterogeneous, axial_axis=axial_axis_of(grid.affine),
        )  # fmt: skip
        m, measured = _measured(image, label, grid, organ_id)
        got = (measured.classes(V.DENSITY), measured.classes(V.DENSITY_VARIATIONS), measured.attributes[V.CAVITY])
        want = ([intent.density], ["heterogeneous" if intent.heterogeneous else "homogeneous"], intent.cavity)
        if got != want:
            logger.debug("attempt %d: measured %s, intended %s; redrawing", attempt, got, want)
            continue
        attrs = dict(measured.attributes)
        attrs[V.ENHANCEMENT] = ENHANCED  # the phantom is a portal-venous CT, aorta in the crop or not
        report = replace(measured, attributes=attrs, note=LESION_TYPE[intent.density])
        truth = {
            "source": grid.source, "organ": name, "organ_id": organ_id, "cavity": intent.cavity,
            "density": intent.density, "heterogeneous": intent.heterogeneous, "shape_kind": intent.shape_kind,
            "diameter_mm": intent.diameter_mm, "lesion_hu": hu, "measured_mean_hu": round(m.mean_hu, 1),
            "reference_hu": None if m.reference_hu is None else round(m.reference_hu, 1),
            "spacing_mm": grid.spacing, "shape": list(grid.seg.shape), "lesion_voxels": int(lesion.sum()),
            "attempts": attempt + 1,
        }  # fmt: skip
        return {"image": image, "label": label, "grid": grid, "report": Report((report,)), "truth": truth}
    raise LesionDiffusionError(f"no lesion whose measured attributes match the intended ones in {MAX_ATTEMPTS} draws")


@lru_cache(maxsize=8)
def _organ_names_cached(keys: tuple[tuple[int, int], ...]) -> tuple[str, ...]:
    table = label_table(VERSION)
    present = {k for k, n in keys if n >= MIN_ORGAN_VOXELS_1MM}
    return tuple(name for name in ORGAN_WEIGHTS if table.id(name) in present)


def _available_organs(sources: Sequence[SourceMap]) -> dict[str, float]:
    """:data:`ORGAN_WEIGHTS` restricted to organs some source map holds enough of."""
    counts: dict[int, int] = {}
    for s in sources:
        for k, n in s.organ_voxels.items():
            counts[k] = max(counts.get(k, 0), n)
    names = _organ_names_cached(tuple(sorted(counts.items())))
    if not names:
        raise LesionDiffusionError("the demo organ maps hold none of the lesion organs: " + ", ".join(ORGAN_WEIGHTS))
    return {n: ORGAN_WEIGHTS[n] for n in names}


def _save_case(dest: Path, case: dict[str, Any]) -> dict[str, Path]:
    grid: Grid = case["grid"]
    dest.mkdir(parents=True, exist_ok=True)
    files = {k: dest / n for k, n in CASE_FILES.items()}
    save_nifti(files["image"], case["image"], grid.affine, dtype=np.int16)
    save_nifti(files["label"], case["label"], grid.affine, dtype=np.uint8)
    save_nifti(files["organ_seg"], grid.seg.astype(np.uint8), grid.affine, dtype=np.uint8)
    from lesiondiffusion.report import write_report

    write_report(files["report"], case["report"])
    return files


def _rng(seed: int, index: int, mode: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(mode)])


def _check_out(src: Path, out: Path, n: int) -> None:
    if int(n) < 1:
        raise LesionDiffusionError(f"--n must be at least 1, got {n}")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InputError(out, "output folder is inside the demo source; the source is never written")


# ---- the two products --------------------------------------------------------------------------------------
def build_dataset(
    src: Path, out: Path, n: int, seed: int = 0, val_fraction: float = 0.2, overwrite: bool = False
) -> Path:
    """Write ``n`` ground-truth cases into ``out`` (atomically): cases, list files, datalist, summary.

    ``val_fraction`` of the cases, drawn with ``seed`` (:func:`lesiondiffusion.dataset.holdout_indices`),
    form the validation split.
    """
    src, out = Path(src), Path(out)
    _check_out(src, out, n)
    kept, held = holdout_indices(n, val_fraction, seed)
    sources = load_sources(src)
    final_out = out.resolve()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        built, final, truths = [], [], []
        for i in tqdm(range(n), desc="phantom cases", unit="case", disable=None):
            name = f"phantom_{i:04d}"
            case = make_case(sources, _rng(seed, i, 0))
            files = _save_case(tmp / "cases" / name, case)
            built.append(Case(**files))
            final.append(Case(**{k: final_out / p.relative_to(tmp) for k, p in files.items()}))
            truths.append({"case": name, **case["truth"]})
            t = case["truth"]
            logger.info(
                "%s: %s, %s, %s, %.0f HU, %d voxels",
                name,
                t["organ"],
                t["density"],
                t["cavity"],
                t["lesion_hu"],
                t["lesion_voxels"],
            )
        write_datalist(
            tmp / "datalist.json",
            {"training": [built[i] for i in kept], "validation": [built[i] for i in held]},
            VERSION,
        )
        write_list_files(tmp, "train", [final[i] for i in kept])
        if held:
            write_list_files(tmp, "val", [final[i] for i in held])
        write_json(tmp / "dataset.json", {
            "generator": "lesiondiffusion.phantom_dataset", "mode": "training", "n": n, "seed": seed,
            "val_fraction": val_fraction, "source": [s.name for s in sources], "cases": truths,
        })  # fmt: skip
    logger.info("%d cases (%d validation) written to %s", n, len(held), out)
    return out


def build_requests(src: Path, out: Path, n: int, seed: int = 0, overwrite: bool = False) -> Path:
    """Write held-out synthesis requests into ``out`` (atomically): ``n`` lesion-free phantoms with their
    organ maps under ``images/`` and ``organ_segs/``, and ``requests.json`` with three requests per
    image that differ only in density (hypo / iso / hyper), for the density-ordering check.
    """
    src, out = Path(src), Path(out)
    _check_out(src, out, n)
    sources = load_sources(src)
    templates = [s.lesion for s in sources]
    table = label_table(VERSION)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        requests, groups = [], []
        for i in tqdm(range(n), desc="request images", unit="image", disable=None):
            rng = _rng(seed, i, 1)
            for _ in range(MAX_ATTEMPTS * 4):
                organ = _choice(rng, _available_organs(sources))
                organ_id = table.id(organ)
                holders = [s for s in sources if s.organ_voxels.get(organ_id, 0) >= MIN_ORGAN_VOXELS_1MM]
                grid = sample_grid(holders[int(rng.integers(len(holders)))], organ_id, rng)
                intent = draw_intent(organ, rng, density=ISO)
                intent = replace(
                    intent, heterogeneous=False, cavity=V.CAVITY_LUMEN if is_hollow_name(organ) else V.CAVITY_WITHIN
                )
                placed = place_lesion(grid, intent, templates, rng)  # the requested size must fit this organ
                if placed is not None:
                    break
            else:
                raise LesionDiffusionError(f"image {i}: no crop of the demo maps holds a lesion (seed {seed})")
            _, intent = placed
            image = make_phantom(grid.seg, (grid.spacing,) * 3, seed=int(rng.integers(2**31)), version=VERSION,
                                 axial_axis=axial_axis_of(grid.affine))  # fmt: skip
            base = f"img_{i:04d}"
            img_path, seg_path = tmp / "images" / f"{base}.nii.gz", tmp / "organ_segs" / f"{base}.nii.gz"
            img_path.parent.mkdir(exist_ok=True)
            seg_path.parent.mkdir(exist_ok=True)
            save_nifti(img_path, image, grid.affine, dtype=np.int16)
            save_nifti(seg_path, grid.seg.astype(np.uint8), grid.affine, dtype=np.uint8)
            size_mm = max(4, int(round(intent.diameter_mm)))
            group = {"image": base, "organ": organ, "organ_id": organ_id, "spacing_mm": grid.spacing,
                     "shape": list(grid.seg.shape), "source": grid.source, "size_mm": size_mm, "cases": []}  # fmt: skip
            for density in REQUEST_DENSITIES:
                case = f"{base}_{density.split()[0].replace('dense', '')}"
                attributes = {
                    "organ type": organ, "lesion type": "tumor", V.DENSITY: density,
                    V.DENSITY_VARIATIONS: "homogeneous", V.CAVITY: intent.cavity, V.SIZE: f"{size_mm} mm",
                }  # fmt: skip
                requests.append(SynthesisRequest(case, img_path, attributes, seg_path))
                group["cases"].append(case)
            groups.append(group)
        write_requests(tmp / "requests.json", requests, VERSION)
        write_json(tmp / "dataset.json", {
            "generator": "lesiondiffusion.phantom_dataset", "mode": "requests", "n": n, "seed": seed,
            "source": [s.name for s in sources], "density_groups": groups,
        })  # fmt: skip
    logger.info("%d requests on %d images written to %s", 3 * n, n, out)
    return out
