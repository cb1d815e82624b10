"""Realism measures of one lesion, computed the same way on synthetic and on ground-truth lesions.

Everything here works on a small crop around the lesion (:class:`LesionCrop`: HU, lesion mask, host-organ
mask, voxel size in mm, the organ's reference HU) and returns plain numbers, so that
:mod:`lesiondiffusion.realism` can put a synthetic lesion beside real lesions of the same kind.

- **Mask.** *Fill ratio*: volume over the volume after a one-voxel binary closing (6-connected
  structuring element) and hole filling; porous or speckled masks fall far below 1, real tumour masks
  sit at 0.98-1.0. *Interior fraction*: voxels whose 6 face neighbours are all lesion. *Solidity*: the
  digital solidity that report extraction uses (:mod:`lesiondiffusion.attributes`: voxel count over the
  voxel centres inside the convex hull of the voxel centres, so 1 for any digitally convex shape
  whatever its size; a flat mask is its own hull). *Sphericity*: ``pi^(1/3) (6V)^(2/3) / A`` with the area ``A`` from exposed
  voxel faces, each weighted by ``1 / |n|_1`` of the local surface normal (the normal from the gradient
  of the lightly smoothed mask), which undoes the staircase's overestimate (a plain face count makes a
  ball's area 1.5 times too large); a digitised ball scores 0.99-1.01, a cube 0.89 (truly 0.81),
  speckle far less. *Components*: counted with 6-connectivity (face neighbours), so diagonal speckle is many pieces.
- **Appearance.** Lesion-minus-organ median HU. *Noise*: the high-pass residual (HU minus its 3x3x3
  mean) on voxels whose whole 3x3x3 neighbourhood lies in the region, so a lesion's own gradient or its
  edge does not count; its spread is ``1.4826 * MAD`` (robust to vessels in the organ); measured on the
  lesion and on host-organ voxels :data:`NOISE_GAP_MM` to :data:`CROP_MM` from the lesion (beyond any
  blend zone). *Edge width*: the mean HU profile over shells at signed distances -3..+3 shells (shell
  width: the voxel size's geometric mean) from the lesion's border, into the host organ; the distance
  between its 10% and 90% crossings of the inner-to-outer step (mm); None below
  :data:`EDGE_MIN_STEP_HU` of step.
- **Radiomics-style features** (:data:`FEATURES`): first order on HU minus the organ reference (mean,
  std, skewness, kurtosis, entropy of a :data:`BIN_WIDTH_HU` histogram, 10th/50th/90th percentiles),
  GLCM texture (contrast, homogeneity, joint energy, correlation; symmetric, distance 1, the 13 3D
  directions averaged, levels of :data:`BIN_WIDTH_HU`), and shape (fill ratio, sphericity). They are
  computed in-house with numpy in the spirit of IBSI / pyradiomics but are NOT certified against them:
  compare numbers only with numbers from this module. :func:`frechet_distance` compares two sets of
  them with a diagonal covariance (few samples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from lesiondiffusion.reports import extraction

# Crop kept around a lesion (mm): the host-organ noise and the edge profile are measured in it.
CROP_MM = 30.0
# Host-organ noise only this far from the lesion: beyond a synthesis blend zone (3 mm) plus the filter.
NOISE_GAP_MM = 6.0
# Fewer voxels than this give no noise estimate.
MIN_NOISE_VOXELS = 10
# The edge width needs at least this step between the inner and outer plateaus.
EDGE_MIN_STEP_HU = 10.0
EDGE_SHELLS = 3
# Smoothing (in coarse voxels) of the mask whose gradient gives the surface normals of the area estimate.
NORMAL_SIGMA_VOXELS = 0.5
# First-order histogram and GLCM grey levels: fixed bin width on HU minus the organ reference.
BIN_WIDTH_HU = 10.0
MAX_LEVELS = 64
_CROSS = ndi.generate_binary_structure(3, 1)
_CUBE = np.ones((3, 3, 3), bool)
# The 13 unique neighbour directions of a 3D grid (the other 13 are their opposites: the GLCM is symmetric).
_DIRECTIONS = ((0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1), (0, 1, -1), (1, 0, 1), (1, 0, -1),
               (1, 1, 0), (1, -1, 0), (1, 1, 1), (1, 1, -1), (1, -1, 1), (1, -1, -1))  # fmt: skip
FIRST_ORDER = ("mean", "std", "skewness", "kurtosis", "entropy", "p10", "p50", "p90")
TEXTURE = ("glcm_contrast", "glcm_homogeneity", "glcm_energy", "glcm_correlation")
SHAPE = ("fill_ratio", "sphericity")
FEATURES = FIRST_ORDER + TEXTURE + SHAPE
# Per-feature unit below which differences do not matter: it floors each feature's scale in the
# distance, so a feature on which all real lesions agree (fill ratio 1.0) does not blow it up.
FEATURE_FLOOR = {"mean": 5.0, "std": 2.0, "skewness": 0.1, "kurtosis": 0.3, "entropy": 0.1, "p10": 5.0,
                 "p50": 5.0, "p90": 5.0, "glcm_contrast": 0.2, "glcm_homogeneity": 0.02, "glcm_energy": 0.02,
                 "glcm_correlation": 0.05, "fill_ratio": 0.02, "sphericity": 0.02}  # fmt: skip


@dataclass
class LesionCrop:
    """A lesion and its surroundings: HU crop, lesion and host-organ masks (same shape), voxel size (mm),
    and the organ's reference HU (the density reference; None when unknown)."""

    image: np.ndarray
    lesion: np.ndarray
    organ: np.ndarray
    spacing: tuple[float, float, float]
    reference_hu: float | None


def crop_around(
    image_hu: np.ndarray, lesion: np.ndarray, organ: np.ndarray, spacing: Sequence[float],
    reference_hu: float | None, mm: float = CROP_MM,
) -> LesionCrop:  # fmt: skip
    """The :class:`LesionCrop` of ``lesion`` grown by ``mm`` (clipped to the volume); ``organ`` excludes the lesion."""
    sp = tuple(float(s) for s in spacing)
    margin = [int(math.ceil(mm / s)) for s in sp]
    box = []
    for axis in range(3):
        hit = np.flatnonzero(lesion.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin[axis], 0), min(int(hit[-1]) + margin[axis] + 1, lesion.shape[axis])))
    box_t = tuple(box)
    les = np.asarray(lesion[box_t], bool)
    return LesionCrop(
        np.asarray(image_hu[box_t], dtype=np.float32), les, np.asarray(organ[box_t], bool) & ~les, sp,  # type: ignore[arg-type]
        None if reference_hu is None else float(reference_hu),
    )  # fmt: skip


# ---- mask ---------------------------------------------------------------------------------------------
def _padded(mask: np.ndarray, pad: int = 2) -> np.ndarray:
    return np.pad(np.asarray(mask, bool), pad)


def fill_ratio(mask: np.ndarray) -> float | None:
    """Volume over the volume after a one-voxel closing (6-connected element) and hole filling."""
    n = int(np.count_nonzero(mask))
    if not n:
        return None
    closed = ndi.binary_fill_holes(ndi.binary_closing(_padded(mask), structure=_CROSS))
    return n / max(int(np.count_nonzero(closed | _padded(mask))), 1)


def interior_fraction(mask: np.ndarray) -> float | None:
    """Fraction of voxels whose 6 face neighbours all belong to the mask."""
    n = int(np.count_nonzero(mask))
    if not n:
        return None
    return int(np.count_nonzero(ndi.binary_erosion(_padded(mask, 1), structure=_CROSS))) / n


def components(mask: np.ndarray) -> int:
    """Number of 6-connected (face-connected) pieces: diagonal contact does not join."""
    return int(ndi.label(np.asarray(mask, bool), structure=_CROSS)[1]) if np.any(mask) else 0


def surface_area_mm2(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Surface area (mm^2): exposed voxel faces, each weighted by ``1 / |n|_1`` of the local normal.

    A face along axis ``a`` stands for the surface's projection on that axis (``|n_a| dA``), so the
    weight turns the staircase back into the surface it digitises; where the normal is undefined
    (gradient 0, e.g. inside speckle) a face counts as its own area.
    """
    sp = np.asarray([float(s) for s in spacing])
    m = _padded(mask)
    # the normal from the mask smoothed by half a coarse voxel, the same in mm along every axis (wider
    # smoothing rounds a cube's edges off: 0.5 gives balls 0.99-1.01 and a cube 0.89 against its true 0.81)
    sigma = NORMAL_SIGMA_VOXELS * float(sp.max()) / sp
    grads = np.gradient(ndi.gaussian_filter(m.astype(np.float32), sigma), *sp)
    norm = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grads))
    l1 = sum(np.abs(g) for g in grads) / np.maximum(norm, 1e-12)
    weight = np.where(norm > 1e-6, 1.0 / np.clip(l1, 1.0, math.sqrt(3.0)), 1.0)
    area = 0.0
    for axis in range(3):
        face = float(np.prod(sp)) / sp[axis]
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        a, b = m[tuple(lo)], m[tuple(hi)]
        exposed = a != b
        w = 0.5 * (weight[tuple(lo)] + weight[tuple(hi)])
        area += face * float(w[exposed].sum())
    return area


def sphericity(mask: np.ndarray, spacing: Sequence[float]) -> float | None:
    """``pi^(1/3) (6V)^(2/3) / A`` (1 for a ball) with :func:`surface_area_mm2`."""
    n = int(np.count_nonzero(mask))
    if not n:
        return None
    volume = n * float(np.prod([float(s) for s in spacing]))
    area = surface_area_mm2(mask, spacing)
    return float(math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area) if area > 0 else None


def mask_measures(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float | int | None]:
    """Fill ratio, interior fraction, solidity, sphericity, box fill, 6-connected components, size in voxels."""
    mask = np.asarray(mask, bool)
    n = int(np.count_nonzero(mask))
    if not n:
        return {"fill_ratio": None, "interior_fraction": None, "solidity": None, "sphericity": None, "box_fill": None,
                "box_voxels": [0, 0, 0], "components_6": 0, "components_26": 0, "equivalent_diameter_voxels": 0.0}  # fmt: skip
    # every measure below is local to the mask: trim it to its box (the hull test scans the whole array)
    lo, hi = np.argwhere(mask).min(0), np.argwhere(mask).max(0)
    mask = mask[tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))]
    solidity = extraction._shape_metrics(np.pad(mask, 1), spacing)[0]  # one definition of solidity in the package
    return {
        "fill_ratio": fill_ratio(mask),
        "interior_fraction": interior_fraction(mask),
        "solidity": solidity,
        "sphericity": sphericity(mask, spacing),
        # the share of its bounding box the lesion fills: a voxelised ellipsoid 40-52%, a cuboid near 100%
        # (sphericity hardly tells them apart: 0.81 for a cube)
        "box_fill": n / float(mask.size),
        "box_voxels": [int(v) for v in mask.shape],
        "components_6": components(mask),
        "components_26": int(ndi.label(mask, structure=_CUBE)[1]),
        "equivalent_diameter_voxels": float((6.0 * n / math.pi) ** (1.0 / 3.0)),
    }


# ---- appearance ---------------------------------------------------------------------------------------
def _robust_std(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def highpass_std(image: np.ndarray, region: np.ndarray) -> float | None:
    """Robust spread of ``image`` minus its 3x3x3 mean, on voxels whose whole 3x3x3 neighbourhood is in
    ``region``; None when fewer than :data:`MIN_NOISE_VOXELS` such voxels exist."""
    core = ndi.binary_erosion(np.asarray(region, bool), structure=_CUBE, border_value=0)
    if np.count_nonzero(core) < MIN_NOISE_VOXELS:
        return None
    img = np.asarray(image, np.float64)
    residual = img - ndi.uniform_filter(img, size=3, mode="nearest")
    return _robust_std(residual[core])


def _distance_outside(lesion: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    return ndi.distance_transform_edt(~lesion, sampling=spacing) if (~lesion).any() else np.zeros(lesion.shape)


def noise_measures(crop: LesionCrop) -> dict[str, float | None]:
    """The lesion's interior high-pass noise, the host organ's (away from the lesion) and their ratio."""
    lesion_std = highpass_std(crop.image, crop.lesion)
    far = _distance_outside(crop.lesion, crop.spacing) >= NOISE_GAP_MM
    organ_std = highpass_std(crop.image, crop.organ & far)
    ratio = None if lesion_std is None or not organ_std else lesion_std / organ_std
    return {"lesion_noise_std_hu": lesion_std, "organ_noise_std_hu": organ_std, "noise_std_ratio": ratio}


def edge_profile(crop: LesionCrop) -> tuple[list[float], list[float]]:
    """``(positions_mm, mean_hu)`` over shells -3..-1 (lesion) and +1..+3 (host organ) from the border.

    Shell ``k`` holds voxels whose distance to the other side lies in ``((|k|-1) h, |k| h]`` (``h`` the
    voxel size's geometric mean) and stands at ``+-(|k| - 1/2) h`` from the border. Outside, the host
    organ counts when it has voxels in every shell, else all outside voxels do (a protruding lesion).
    """
    sp = crop.spacing
    h = float(np.prod(sp)) ** (1.0 / 3.0)
    les = crop.lesion
    if not les.any() or les.all():
        return [], []
    inside = ndi.distance_transform_edt(les, sampling=sp)
    outside = ndi.distance_transform_edt(~les, sampling=sp)
    shells_in = np.ceil(inside / h - 1e-6).astype(int)
    shells_out = np.ceil(outside / h - 1e-6).astype(int)
    around = crop.organ & ~les
    if any(not np.any(around & (shells_out == k)) for k in range(1, EDGE_SHELLS + 1)):
        around = ~les
    xs, ys = [], []
    for k in range(EDGE_SHELLS, 0, -1):
        sel = les & (shells_in == k)
        if sel.any():
            xs.append(-(k - 0.5) * h)
            ys.append(float(crop.image[sel].mean()))
    for k in range(1, EDGE_SHELLS + 1):
        sel = around & (shells_out == k)
        if sel.any():
            xs.append((k - 0.5) * h)
            ys.append(float(crop.image[sel].mean()))
    return xs, ys


def edge_width_mm(crop: LesionCrop) -> float | None:
    """Distance (mm) between the profile's 10% and 90% crossings of its inner-to-outer step
    (:func:`edge_profile`); None without both ends or with a step below :data:`EDGE_MIN_STEP_HU`."""
    xs, ys = edge_profile(crop)
    if len(xs) < 2 or xs[0] > 0 or xs[-1] < 0:
        return None
    step = ys[-1] - ys[0]
    if abs(step) < EDGE_MIN_STEP_HU:
        return None
    q = [(y - ys[0]) / step for y in ys]

    def crossing(level: float) -> float:
        for i in range(len(q) - 1):
            if (q[i] - level) * (q[i + 1] - level) <= 0 and q[i] != q[i + 1]:
                return xs[i] + (level - q[i]) / (q[i + 1] - q[i]) * (xs[i + 1] - xs[i])
        return xs[-1]

    return float(abs(crossing(0.9) - crossing(0.1)))


# ---- radiomics-style features -------------------------------------------------------------------------
def _levels(values: np.ndarray) -> np.ndarray:
    """Grey levels 0.. of a fixed :data:`BIN_WIDTH_HU` (capped at :data:`MAX_LEVELS`)."""
    bins = np.floor(values / BIN_WIDTH_HU)
    return np.clip(bins - bins.min(), 0, MAX_LEVELS - 1).astype(np.int64)


def first_order(values: np.ndarray) -> dict[str, float]:
    """Mean, std, skewness, kurtosis (3 for a Gaussian; skewness and kurtosis 0 for a constant),
    histogram entropy (bits) and percentiles of ``values`` (HU minus the organ reference)."""
    x = np.asarray(values, np.float64)
    mean, std = float(x.mean()), float(x.std())
    if std > 1e-9:
        z = (x - mean) / std
        skew, kurt = float(np.mean(z**3)), float(np.mean(z**4))
    else:
        skew = kurt = 0.0
    p = np.bincount(_levels(x)).astype(np.float64)
    p = p[p > 0] / x.size
    p10, p50, p90 = (float(v) for v in np.percentile(x, (10, 50, 90)))
    return {"mean": mean, "std": std, "skewness": skew, "kurtosis": kurt, "entropy": float(-(p * np.log2(p)).sum()),
            "p10": p10, "p50": p50, "p90": p90}  # fmt: skip


def glcm(levels: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """GLCM contrast, homogeneity (``1/(1+|i-j|)``), joint energy and correlation inside ``mask``:
    symmetric, distance 1, each of the 13 directions normalised, then averaged. A single grey level
    gives contrast 0, homogeneity, energy and correlation 1."""
    n = int(levels[mask].max()) + 1 if mask.any() else 1
    feats: dict[str, list[float]] = {k: [] for k in TEXTURE}
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for d in _DIRECTIONS:
        src, dst = [], []
        for axis, step in enumerate(d):
            size = levels.shape[axis]
            if step == 0:
                src.append(slice(None))
                dst.append(slice(None))
            elif step > 0:
                src.append(slice(0, size - step))
                dst.append(slice(step, size))
            else:
                src.append(slice(-step, size))
                dst.append(slice(0, size + step))
        both = mask[tuple(src)] & mask[tuple(dst)]
        if not both.any():
            continue
        a, b = levels[tuple(src)][both], levels[tuple(dst)][both]
        counts = np.bincount(a * n + b, minlength=n * n).reshape(n, n).astype(np.float64)
        p = counts + counts.T
        p /= p.sum()
        mu = float((i * p).sum())
        var = float((((i - mu) ** 2) * p).sum())
        feats["glcm_contrast"].append(float((((i - j) ** 2) * p).sum()))
        feats["glcm_homogeneity"].append(float((p / (1.0 + np.abs(i - j))).sum()))
        feats["glcm_energy"].append(float((p**2).sum()))
        # symmetric matrix: both marginals share mean and variance
        feats["glcm_correlation"].append(1.0 if var < 1e-12 else float((((i - mu) * (j - mu) * p).sum()) / var))
    if not feats["glcm_contrast"]:  # no two neighbouring voxels: nothing to co-occur
        return {"glcm_contrast": 0.0, "glcm_homogeneity": 1.0, "glcm_energy": 1.0, "glcm_correlation": 1.0}
    return {k: float(np.mean(v)) for k, v in feats.items()}


def features(crop: LesionCrop, shape: Mapping[str, float | int | None] | None = None) -> dict[str, float] | None:
    """The :data:`FEATURES` of a lesion (None without a reference HU or lesion voxels); ``shape``
    reuses already computed mask measures."""
    if crop.reference_hu is None or not crop.lesion.any():
        return None
    offset = crop.image.astype(np.float64) - crop.reference_hu
    out = first_order(offset[crop.lesion])
    # a box just around the lesion: the GLCM needs the lesion's neighbours only
    box = tuple(
        slice(max(int(lo) - 1, 0), int(hi) + 2)
        for lo, hi in zip(np.argwhere(crop.lesion).min(0), np.argwhere(crop.lesion).max(0))
    )
    sub = crop.lesion[box]
    levels = np.zeros(sub.shape, np.int64)
    levels[sub] = _levels(offset[box][sub])
    out.update(glcm(levels, sub))
    shape = shape or {"fill_ratio": fill_ratio(crop.lesion), "sphericity": sphericity(crop.lesion, crop.spacing)}
    for name in SHAPE:
        out[name] = float(shape[name]) if shape.get(name) is not None else 0.0
    return out


def lesion_measures(crop: LesionCrop) -> dict[str, object]:
    """Mask and appearance measures of one lesion, and its :data:`FEATURES` (``features``)."""
    mask = mask_measures(crop.lesion, crop.spacing)
    median = float(np.median(crop.image[crop.lesion])) if crop.lesion.any() else None
    out: dict[str, object] = dict(mask)
    out["median_delta_hu"] = None if median is None or crop.reference_hu is None else median - crop.reference_hu
    out.update(noise_measures(crop))
    out["edge_width_mm"] = edge_width_mm(crop)
    out["features"] = features(crop, mask)
    return out


# ---- set distance -------------------------------------------------------------------------------------
def feature_matrix(rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    """Rows of :data:`FEATURES` values as an ``(n, len(FEATURES))`` array."""
    return np.asarray([[float(r[k]) for k in FEATURES] for r in rows], np.float64).reshape(len(rows), len(FEATURES))


def feature_scale(reference: np.ndarray) -> np.ndarray:
    """Per-feature scale: the reference set's spread, floored by :data:`FEATURE_FLOOR`."""
    floor = np.asarray([FEATURE_FLOOR[k] for k in FEATURES])
    spread = reference.std(axis=0) if len(reference) > 1 else np.zeros(len(FEATURES))
    return np.sqrt(spread**2 + floor**2)


def frechet_distance(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> float | None:
    """Fréchet distance between two feature sets, each a Gaussian with DIAGONAL covariance (samples are
    few), features divided by ``scale``; the squared distance averaged over the features:
    ``mean_k ((mu_a - mu_b)^2 + (sd_a - sd_b)^2) / scale^2``. 0 for a set and itself; None if one is empty."""
    if not len(a) or not len(b):
        return None
    mu = (a.mean(axis=0) - b.mean(axis=0)) / scale
    sd = (a.std(axis=0) - b.std(axis=0)) / scale
    return float(np.mean(mu**2 + sd**2))
