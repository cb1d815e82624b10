"""A synthetic CT (int16 HU) from a TotalSegmentator organ map, for demos and tests.

Real CT images of the demo cases were never published; their organ maps were. The phantom gives every
organ a typical contrast-enhanced (portal-venous) HU so that the pipeline sees plausible intensities:

- **Body.** Air (-1000) outside the body. The body is the union of all labels, closed in-plane (~3 cm),
  hole-filled per axial slice and grown by :data:`BODY_MARGIN_MM`; every labelled voxel is inside.
  From the outline inwards: skin (2 mm, 30 HU), subcutaneous fat (-100 HU) to 11 mm, an abdominal-wall
  muscle layer (45 HU) to 17 mm, then a smooth mixture of visceral fat (-90 HU) and soft tissue (35 HU).
  Organs are painted over these layers.
- **Organs.** :data:`ORGAN_HU` maps organ names (or group words) to the organ's mean HU; names are
  resolved through :func:`lesiondiffusion.labels.label_table`, so v1 and v2 numbering both work. A key
  matches a label whose canonical name equals it, else the longest key whose words all occur in the
  name ("kidney cyst" beats "kidney" for "kidney cyst left"). Unlisted labels get :data:`DEFAULT_HU`.
  Bones get a bright cortical rim (+450 HU on their one-voxel boundary) over a darker marrow.
- **Texture.** Gaussian-smoothed noise (~1.2 mm correlation; 6 HU in soft tissue, more in lung and
  bone: :data:`TEXTURE_HU`), a light Gaussian blur across all boundaries (partial volume, 0.6 mm), then
  white noise (7 HU) inside the body. Everything is drawn from ``numpy.random.default_rng(seed)``:
  same inputs and seed, same image.
- **Means.** After texture, blur and noise, each organ is shifted so that the mean over *all* its
  voxels (lesion excluded) equals its table value to within rounding: the table is the truth of the
  whole-organ mean. (The interior of a bone is darker than its mean; soft organs are flat.) Trachea
  voxels may clip at -1024.
- **Lesion.** Voxels of ``lesion_mask`` get ``lesion_hu`` as their exact mean (the report's ``CT
  value``); ``lesion_heterogeneous`` adds smooth brighter/darker blobs (std ~25 HU) that keep the mean.

Organ HU (mean over the whole organ):

====================================  ======  ====================================  ======
liver                                     60  aorta                                   180
spleen                                    50  artery (iliac, pulmonary, carotid...)   170
kidney (enhanced cortex+medulla)         150  portal vein and splenic vein            170
kidney cyst                               10  inferior/superior vena cava, veins      150
pancreas                                  45  heart (myocardium + blood pool)          50
adrenal gland                             40  esophagus                                40
gallbladder                               10  trachea                               -1000
urinary bladder (urine)                   10  lung (all lobes)                       -850
stomach, duodenum                         30  thyroid gland                           110
small bowel, colon (contents, no gas)     20  prostate                                 40
gluteus, iliopsoas, autochthon muscles    50  brain                                    35
vertebrae, sacrum, hip, femur, ...       500  spinal cord                              35
ribs, clavicula, scapula, sternum        450  costal cartilages                       150
skull                                    700  anything else                            40
====================================  ======  ====================================  ======
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import PathLike, read_nifti_array, save_nifti
from lesiondiffusion.labels import DEFAULT_VERSION, LESION_LABEL, label_table
from lesiondiffusion.report import read_report

logger = logging.getLogger(__name__)

# ---- the table -------------------------------------------------------------------------------------
# Organ name (canonical, as in lesiondiffusion.labels) or group word -> mean HU of the whole organ.
ORGAN_HU: dict[str, float] = {
    "liver": 60.0,
    "spleen": 50.0,
    "kidney": 150.0,  # nephrographic-phase cortex and medulla, one value for the whole organ
    "kidney cyst": 10.0,
    "pancreas": 45.0,
    "adrenal gland": 40.0,
    "gallbladder": 10.0,
    "urinary bladder": 10.0,
    "stomach": 30.0,
    "duodenum": 30.0,
    "small bowel": 20.0,  # mixed contents; no gas pockets, so the mean stays exact
    "colon": 20.0,
    "esophagus": 40.0,
    "trachea": -1000.0,
    "lung": -850.0,
    "heart": 50.0,
    "atrial appendage": 50.0,
    "aorta": 180.0,
    "artery": 170.0,
    "brachiocephalic trunk": 170.0,
    "portal vein and splenic vein": 170.0,
    "vena": 150.0,  # inferior/superior vena cava, iliac vena
    "vein": 150.0,
    "gluteus": 50.0,
    "iliopsoas": 50.0,
    "autochthon": 50.0,
    "vertebrae": 500.0,
    "sacrum": 500.0,
    "hip": 500.0,
    "femur": 500.0,
    "humerus": 500.0,
    "rib": 450.0,
    "clavicula": 450.0,
    "scapula": 450.0,
    "sternum": 450.0,
    "skull": 700.0,
    "costal cartilages": 150.0,
    "thyroid gland": 110.0,
    "prostate": 40.0,
    "brain": 35.0,
    "spinal cord": 35.0,
}
DEFAULT_HU = 40.0  # any label the table does not name (e.g. "face")

# Smooth-texture amplitude (std, HU) where it differs from the soft-tissue default.
TEXTURE_HU: dict[str, float] = {"lung": 40.0, "trachea": 2.0, "kidney": 10.0}
BONES = frozenset({"vertebrae", "sacrum", "hip", "femur", "humerus", "rib", "clavicula", "scapula", "sternum", "skull"})
BONE_TEXTURE_HU = 50.0
CORTEX_DELTA_HU = 450.0  # added on a bone's one-voxel rim before the mean is restored

# Body layers (HU) and their depth below the outline (mm).
AIR_HU, SKIN_HU, SUBCUT_FAT_HU, WALL_MUSCLE_HU = -1000.0, 30.0, -100.0, 45.0
VISCERAL_FAT_HU, VISCERAL_SOFT_HU = -90.0, 35.0
SKIN_MM, SUBCUT_MM, WALL_MM = 2.0, 11.0, 17.0
BODY_CLOSING_MM, BODY_MARGIN_MM = 30.0, 15.0
SOFT_TEXTURE_HU, NOISE_HU = 6.0, 7.0
TEXTURE_SIGMA_MM, PARTIAL_VOLUME_SIGMA_MM = 1.2, 0.6
LESION_BLOB_HU, LESION_BLOB_SIGMA_MM = 25.0, 2.5
LESION_DEFAULT_CONTRAST_HU = -20.0  # lesion without a CT value: this much below its organ
_LOWRES_MM = 4.0  # grid on which the body outline is computed
HU_RANGE = (-1024, 3071)


def _match(name: str, table: dict[str, float]) -> str | None:
    """The key of ``table`` for a canonical organ name: exact, else the longest all-words match."""
    if name in table:
        return name
    words = set(name.split())
    keys = [k for k in table if set(k.split()) <= words]
    return max(keys, key=lambda k: (len(k.split()), len(k))) if keys else None


def organ_hu(name: str) -> float:
    """Mean HU the phantom gives the organ ``name`` (a canonical TotalSegmentator name)."""
    key = _match(name, ORGAN_HU)
    return DEFAULT_HU if key is None else ORGAN_HU[key]


@cache
def _lookup_tables(version: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label id: mean HU, texture std (HU), is-bone. Index 0 is background (unused)."""
    table = label_table(version)
    size = max(table.names) + 1
    hu = np.full(size, DEFAULT_HU, np.float32)
    tex = np.full(size, SOFT_TEXTURE_HU, np.float32)
    bone = np.zeros(size, bool)
    for label_id, name in table.names.items():
        hu[label_id] = organ_hu(name)
        key = _match(name, ORGAN_HU)
        bone[label_id] = key in BONES
        tex_key = _match(name, TEXTURE_HU)
        tex[label_id] = BONE_TEXTURE_HU if bone[label_id] else TEXTURE_HU.get(tex_key, SOFT_TEXTURE_HU)  # type: ignore[arg-type]
    return hu, tex, bone


def _lut(values: np.ndarray, n: int, fill: float) -> np.ndarray:
    """``values`` extended to ``n`` entries (ids the table lacks get ``fill``)."""
    if n <= len(values):
        return values
    return np.concatenate([values, np.full(n - len(values), fill, values.dtype)])


# ---- body outline ----------------------------------------------------------------------------------
def _close_in_plane(mask: np.ndarray, radius_mm: float, sampling: Sequence[float]) -> np.ndarray:
    """Morphological closing by a disk of ``radius_mm``, through distance transforms (fast for big disks)."""
    if not mask.any():
        return mask.copy()
    # pad in-plane (edge) so the body is not eaten where it leaves the field of view
    r = [int(np.ceil(radius_mm / sp)) + 1 for sp in sampling[:2]]
    padded = np.pad(mask, ((r[0], r[0]), (r[1], r[1]), (0, 0)), mode="edge")
    dilated = ndi.distance_transform_edt(~padded, sampling=sampling) <= radius_mm
    closed = ndi.distance_transform_edt(dilated, sampling=sampling) > radius_mm
    return closed[r[0] : -r[0], r[1] : -r[1]] | mask


def _lowres_depth(union: np.ndarray, spacing: np.ndarray, axial_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed in-plane depth (mm) below the body outline on a coarse grid, and the coarse factors."""
    factors = np.maximum(1, np.rint(_LOWRES_MM / spacing)).astype(int)
    padded_shape = [int(np.ceil(s / f)) * f for s, f in zip(union.shape, factors)]
    pad = [(0, p - s) for s, p in zip(union.shape, padded_shape)]
    blocks = np.pad(union, pad).reshape(
        padded_shape[0] // factors[0],
        factors[0],
        padded_shape[1] // factors[1],
        factors[1],
        padded_shape[2] // factors[2],
        factors[2],
    )
    low = blocks.any(axis=(1, 3, 5))
    low_spacing = spacing * factors
    # work with the axial axis last so per-slice operations are plain 2D
    low = np.moveaxis(low, axial_axis, -1)
    in_plane = np.delete(low_spacing, axial_axis)
    # in-plane distances only: the through-plane step is made too large to ever be the nearest
    sampling = (*in_plane, 1e6)
    closed = _close_in_plane(low, BODY_CLOSING_MM, sampling)
    filled = np.empty_like(closed)
    for k in range(closed.shape[-1]):  # per axial slice: cheap on the coarse grid
        filled[..., k] = ndi.binary_fill_holes(closed[..., k])
    inside = ndi.distance_transform_edt(filled, sampling=sampling) if filled.any() else np.zeros(filled.shape)
    outside = ndi.distance_transform_edt(~filled, sampling=sampling) if filled.any() else np.full(filled.shape, 1e6)
    depth = np.clip(inside - outside, -1000.0, 1000.0).astype(np.float32) + BODY_MARGIN_MM
    return np.moveaxis(depth, -1, axial_axis), factors


def _upsample(low: np.ndarray, factors: Sequence[int], region: tuple[slice, ...]) -> np.ndarray:
    """Linear interpolation of a block-averaged coarse grid at the full-resolution voxels of ``region``."""
    out = low
    for axis, (f, sl) in enumerate(zip(factors, region)):
        x = np.arange(sl.start, sl.stop, dtype=np.float64)
        u = np.clip((x - (f - 1) / 2.0) / f, 0, low.shape[axis] - 1)  # coarse voxel b is centred at b*f+(f-1)/2
        i0 = np.floor(u).astype(int)
        i1 = np.minimum(i0 + 1, low.shape[axis] - 1)
        w = (u - i0).astype(np.float32)
        shape = [1] * low.ndim
        shape[axis] = len(x)
        w = w.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
    return out.astype(np.float32, copy=False)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    field = ndi.gaussian_filter(rng.standard_normal(tuple(shape), dtype=np.float32), sigma, truncate=3.0)
    std = float(field.std())
    return field / std if std > 0 else field


def _rim(labels: np.ndarray) -> np.ndarray:
    """Voxels with a 6-neighbour of a different label (region borders do not count)."""
    rim = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        a = [slice(None)] * labels.ndim
        b = [slice(None)] * labels.ndim
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        diff = labels[tuple(a)] != labels[tuple(b)]
        rim[tuple(a)] |= diff
        rim[tuple(b)] |= diff
    return rim


def _labels(organ_seg: np.ndarray) -> np.ndarray:
    seg = np.asarray(organ_seg)
    labels = np.rint(seg).astype(np.int32) if seg.dtype.kind == "f" else seg.astype(np.int32)
    labels[labels < 0] = 0
    return labels


def _full_region(shape: Sequence[int], region: Sequence[slice] | None) -> tuple[slice, ...]:
    if region is None:
        return tuple(slice(0, int(s)) for s in shape)
    if len(region) != len(shape):
        raise LesionDiffusionError(f"region must have {len(shape)} slices, got {len(region)}")
    out = []
    for sl, n in zip(region, shape):
        start, stop, step = sl.indices(int(n))
        if step != 1 or stop <= start:
            raise LesionDiffusionError(f"region slices must be contiguous and non-empty, got {tuple(region)}")
        out.append(slice(start, stop))
    return tuple(out)


def body_mask(
    organ_seg: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    axial_axis: int = 2,
    region: Sequence[slice] | None = None,
) -> np.ndarray:
    """The phantom's body (True inside): the labels closed, hole-filled per axial slice and grown.

    Every labelled voxel is inside; ``region`` evaluates only that part (outline from the whole map).
    """
    seg = np.asarray(organ_seg)
    region = _full_region(seg.shape, region)
    low_depth, factors = _lowres_depth(seg >= 0.5, np.asarray(spacing, dtype=np.float64), axial_axis)
    return (_upsample(low_depth, factors, region) > 0) | (seg[region] >= 0.5)


# ---- the phantom -----------------------------------------------------------------------------------
def make_phantom(
    organ_seg: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    version: str = DEFAULT_VERSION,
    lesion_mask: np.ndarray | None = None,
    lesion_hu: float | None = None,
    lesion_heterogeneous: bool = False,
    *,
    axial_axis: int = 2,
    region: Sequence[slice] | None = None,
) -> np.ndarray:
    """A CT phantom (int16 HU, same shape as ``organ_seg``) from a TotalSegmentator organ map.

    ``spacing`` is the voxel size in mm per axis; ``axial_axis`` the array axis along the body (the
    slices that are hole-filled). ``lesion_mask`` (same shape) is painted with mean ``lesion_hu``
    (default: 20 HU below the organ it lies in), with blobs when ``lesion_heterogeneous``. ``region``
    (contiguous slices) computes only that part, with the body outline still taken from the whole map:
    much faster for a crop, but its noise differs from the same crop of the full phantom.
    """
    seg = np.asarray(organ_seg)
    if seg.ndim != 3:
        raise LesionDiffusionError(f"organ map must be 3D, got shape {seg.shape}")
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (3,) or np.any(spacing_arr <= 0):
        raise LesionDiffusionError(f"spacing must be three positive numbers, got {tuple(spacing)}")
    if lesion_mask is not None and np.shape(lesion_mask) != seg.shape:
        raise LesionDiffusionError(
            f"lesion mask shape {np.shape(lesion_mask)} differs from the organ map's {seg.shape}"
        )
    region = _full_region(seg.shape, region)

    rng = np.random.default_rng(seed)
    union = seg >= 0.5  # same voxels as rounded labels > 0, without converting the whole map

    # body outline from the whole map, evaluated on the region only
    low_depth, factors = _lowres_depth(union, spacing_arr, axial_axis)
    del union
    depth = _upsample(low_depth, factors, region)
    labels = _labels(seg[region])
    organ = labels > 0
    body = (depth > 0) | organ
    shape = labels.shape

    hu_table, tex_table, bone_table = _lookup_tables(version)
    n = int(labels.max()) + 1
    hu_lut = _lut(hu_table, n, DEFAULT_HU)[:n]
    tex_lut = _lut(tex_table, n, SOFT_TEXTURE_HU)[:n]
    bone_lut = _lut(bone_table, n, False)[:n]

    # body layers; the visceral fat/soft-tissue mixture comes from a coarse field (consistent per seed)
    low_mix = _smooth_noise(rng, low_depth.shape, sigma=1.5)
    mix = np.clip((_upsample(low_mix, factors, region) - 0.4) / 0.6 + 0.5, 0.0, 1.0)
    value = VISCERAL_FAT_HU + (VISCERAL_SOFT_HU - VISCERAL_FAT_HU) * mix
    value = np.where(depth < WALL_MM, WALL_MUSCLE_HU, value)
    value = np.where(depth < SUBCUT_MM, SUBCUT_FAT_HU, value)
    value = np.where(depth < SKIN_MM, SKIN_HU, value)
    value = np.where(body, value, np.float32(AIR_HU))
    del depth, mix

    # organs over the layers (gathers over the whole grid are cheaper than masked assignments)
    value = np.where(organ, hu_lut[labels], value).astype(np.float32, copy=False)
    value += (_rim(labels) & bone_lut[labels]) * np.float32(CORTEX_DELTA_HU)

    lesion = None
    if lesion_mask is not None:
        lesion = np.asarray(lesion_mask)[region].astype(bool)
        if not lesion.any():
            lesion = None
    if lesion is not None:
        if lesion_hu is None:
            host = labels[lesion]
            lesion_hu = float(hu_lut[host].mean()) + LESION_DEFAULT_CONTRAST_HU
            logger.info(
                "no lesion HU given: painting it %.0f HU below its organ (%.1f HU)",
                -LESION_DEFAULT_CONTRAST_HU,
                lesion_hu,
            )
        value[lesion] = lesion_hu
        body |= lesion

    # texture: amplitude per organ, soft-tissue default elsewhere in the body
    tex_sigma = TEXTURE_SIGMA_MM / spacing_arr
    texture = _smooth_noise(rng, shape, tex_sigma)
    tex_lut = tex_lut.copy()
    tex_lut[0] = SOFT_TEXTURE_HU  # unlabelled body tissue
    texture *= tex_lut[labels]
    texture *= body
    value += texture
    del texture
    if lesion is not None and lesion_heterogeneous:
        blobs = _smooth_noise(rng, shape, LESION_BLOB_SIGMA_MM / spacing_arr)
        blobs_in = blobs[lesion]
        value[lesion] += LESION_BLOB_HU * (blobs_in - blobs_in.mean()) / max(float(blobs_in.std()), 1e-6)
        del blobs

    value = ndi.gaussian_filter(value, PARTIAL_VOLUME_SIGMA_MM / spacing_arr, truncate=3.0)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= body
    value += np.float32(NOISE_HU) * noise
    del noise

    # restore exact means: each organ (lesion excluded) to its table value, the lesion to its HU
    groups = labels.copy()
    lesion_id = n
    targets = np.append(hu_lut, np.float32(lesion_hu if lesion is not None else 0.0))
    if lesion is not None:
        groups[lesion] = lesion_id
    counts = np.bincount(groups.ravel(), minlength=n + 1)
    sums = np.bincount(groups.ravel(), weights=value.ravel(), minlength=n + 1)
    shift = np.zeros(n + 1, np.float32)
    present = counts > 0
    shift[present] = targets[present] - sums[present] / counts[present]
    shift[0] = 0.0  # background keeps its layers
    value += shift[groups]

    return np.clip(np.rint(value), *HU_RANGE).astype(np.int16)


# ---- files -----------------------------------------------------------------------------------------
def axial_axis_of(affine: np.ndarray) -> int:
    """The array axis that runs head-foot (S/I) in ``affine``'s orientation."""
    codes = nib.aff2axcodes(affine)
    return next((i for i, c in enumerate(codes) if c in ("S", "I")), 2)


def check_label_map(organ_img: nib.Nifti1Image, label_img: nib.Nifti1Image, label_path: PathLike) -> None:
    """A label map must share the organ map's grid; a mismatch is an :class:`InputError` naming it."""
    if tuple(label_img.shape[:3]) != tuple(organ_img.shape[:3]):
        raise InputError(
            label_path, f"shape {tuple(label_img.shape[:3])} differs from the organ map's {tuple(organ_img.shape[:3])}"
        )
    if not np.allclose(label_img.affine, organ_img.affine, atol=1e-3):
        raise InputError(label_path, "affine differs from the organ map's")


def read_organ_map(path: PathLike) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read an organ map; anything but whole non-negative label ids is an :class:`InputError`."""
    seg, img = read_nifti_array(path)
    if seg.dtype.kind not in "iuf":
        raise InputError(path, f"organ map has non-numeric voxels ({seg.dtype})")
    if seg.dtype.kind == "f" and (not np.all(np.isfinite(seg)) or np.any(seg != np.rint(seg))):
        raise InputError(path, "not a label map: voxel values must be whole label ids")
    if seg.size and (seg.min() < 0 or seg.max() > 1000):
        raise InputError(path, f"not a label map: values range {seg.min():g}..{seg.max():g}")
    return seg, img


def make_phantom_file(
    organ_seg_path: PathLike,
    out_path: PathLike,
    seed: int = 0,
    version: str = DEFAULT_VERSION,
    label_path: PathLike | None = None,
    report_path: PathLike | None = None,
) -> Path:
    """Write a phantom CT (int16 HU) with the organ map's geometry to ``out_path`` (atomically).

    With ``label_path`` (0/1/2 map on the same grid) the lesion (label 2) is painted with the mean HU
    and heterogeneity of ``report_path`` (``type.json``; its first lesion). Input problems are one-line
    :class:`InputError` naming the file; nothing is written then.
    """
    out = Path(out_path)
    inputs = [Path(p) for p in (organ_seg_path, label_path, report_path) if p is not None]
    if any(out.resolve() == p.resolve() for p in inputs):
        raise InputError(out, "output path is one of the inputs; inputs are never overwritten")
    if report_path is not None and label_path is None:
        raise LesionDiffusionError("a report needs a label map (label_path) to say where the lesion is")
    seg, img = read_organ_map(organ_seg_path)
    lesion_mask = None
    lesion_hu = None
    heterogeneous = False
    if label_path is not None:
        label, label_img = read_nifti_array(label_path)
        check_label_map(img, label_img, label_path)
        lesion_mask = np.rint(label) == LESION_LABEL
        if not lesion_mask.any():
            logger.warning("%s: no lesion voxels (label 2); the phantom has no lesion", label_path)
    if report_path is not None:
        report = read_report(report_path)
        if not report.lesions:
            raise InputError(report_path, "the report has no lesion entry")
        if len(report.lesions) > 1:
            logger.warning(
                "%s: %d lesions; painting all label-2 voxels with the first one's HU", report_path, len(report.lesions)
            )
        first = report.lesions[0]
        lesion_hu = first.mean_hu
        heterogeneous = "heterogeneous" in first.classes("density variations")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    image = make_phantom(
        seg,
        spacing=zooms,
        seed=seed,
        version=version,
        lesion_mask=lesion_mask,
        lesion_hu=lesion_hu,
        lesion_heterogeneous=heterogeneous,
        axial_axis=axial_axis_of(img.affine),
    )
    save_nifti(out, image, img.affine, header=img.header, dtype=np.int16)
    logger.info("phantom CT written to %s", out)
    return out
