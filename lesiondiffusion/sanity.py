"""Input sanity before any work: the checks a synthesis request passes before a network runs.

Each problem is one :class:`~lesiondiffusion.errors.InputError` naming the user's own file (or request
line, or option) and what to do; what is only doubtful becomes a warning, printed and kept with the
request (``SynthesisRequest.warnings``, written to ``provenance.json``). Checked here:

- the attribute values: each must be a value of the report vocabulary (``description.json`` with its
  synonyms), a known organ and a known lesion noun; an unknown one is an error listing the closest known
  values unless ``allow_unknown`` (then a warning); two values of one attribute that exclude each other
  ("hypodense hyperdense") are always an error;
- the CT: finite voxels in and around the organ, not constant, values in Hounsfield units;
- the organ map: whole, non-negative labels; the organ large enough for the lesion asked (its volume
  against the size asked, or a minimum); a size larger than the organ's extent is clipped later, and the
  warning says so.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lesiondiffusion import vocabulary as V
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.labels import mask_bounds

logger = logging.getLogger(__name__)

ORGAN_TYPE = "organ type"
LESION_TYPE = "lesion type"
# attribute names a request may carry besides the report's fields
REQUEST_FIELDS = (ORGAN_TYPE, LESION_TYPE, "size in mm", "description text", "description reading")
# an organ below this volume cannot hold the smallest lesion LMNet draws on its 1 mm grid (with a margin)
MIN_ORGAN_MM3 = 500.0
# voxels read to judge the whole CT (constant? in HU?): a strided sample of about this many
SAMPLE_VOXELS = 2_000_000
NEIGHBOURHOOD_MM = 10.0  # non-finite voxels this close to the organ reach the lesion's crop
# median HU an organ's parenchyma may have: outside, the image is not in HU or the map is not its map
ORGAN_HU = (-300.0, 1500.0)  # up to cortical bone: vertebrae and ribs are organs too
LUNG_HU = (-1100.0, -300.0)

# classes of one attribute that exclude each other (a lesion is not both)
EXCLUSIVE: dict[str, tuple[frozenset[str], ...]] = {
    V.DENSITY: (
        frozenset({"hypodense lesion", "isodense lesion", "hyperdense lesion"}),
        frozenset({"hypoattenuating fluid-like lesion", "hyperdense lesion"}),
        frozenset({"hypoattenuating fluid-like lesion", "isodense lesion"}),
    ),
    V.DENSITY_VARIATIONS: (frozenset({"homogeneous", "heterogeneous"}),),
    V.SHAPE: (frozenset({"round-like", "irregular"}),),
    V.ENHANCEMENT: (frozenset(V.classes(V.ENHANCEMENT)),),
    V.RELATIONSHIP: (frozenset(V.classes(V.RELATIONSHIP)),),
    V.SURFACE: (
        frozenset({"well-defined margin", "ill-defined margin"}),
        frozenset({"clear serosal surface", "serosal surface irregularity"}),
        frozenset({"clear boundary with the renal parenchyma", "unclear boundary with the renal parenchyma"}),
    ),
}


def _closest(word: str, choices: Sequence[str], n: int = 4) -> str:
    """The known values nearest ``word`` (or, when none is near, the first few) as a message tail."""
    known = list(dict.fromkeys(choices))
    close = difflib.get_close_matches(word.lower(), known, n=n, cutoff=0.5)
    if close:
        return f"; closest known: {', '.join(repr(c) for c in close)}"
    return f"; known values include {', '.join(repr(c) for c in known[:6])}"


def lesion_words() -> tuple[str, ...]:
    """Every lesion noun the reader and the report know (``cyst``, ``metastasis``, ``hcc``...), and every
    lesion type this package's own datasets write (``ground-glass opacity``)."""
    from lesiondiffusion.attributes import LESION_KINDS
    from lesiondiffusion.real_dataset import LESION_TYPE as REAL_DATASET_TYPES
    from lesiondiffusion.text import LESION_WORDS

    words = [w for key, syns in LESION_WORDS.items() for w in (key, *syns)]
    words += [k for kind in LESION_KINDS for k in kind.keywords]
    words += [t.replace("-", " ") for t in REAL_DATASET_TYPES.values()]
    return tuple(dict.fromkeys(words))


def known_lesion_type(value: str) -> bool:
    """True when the lesion type holds a lesion noun (or a kind keyword such as ``metasta``) anywhere."""
    text = " ".join(str(value).lower().replace("-", " ").replace("_", " ").split())
    padded = f" {text} "
    # long nouns and stems ("metasta") match inside words, short ones ("fat", "hcc") only whole
    return any((word in text) if len(word) >= 4 else (f" {word} " in padded) for word in lesion_words())


def check_attributes(attributes: Mapping[str, Any], where: str, allow_unknown: bool = False) -> list[str]:
    """Vocabulary checks of one request's attributes; returns warnings, raises on errors.

    ``where`` names the request for the user (``--attributes``, ``requests.json: requests[2]``,
    ``attrs.txt:3``); each error is one line starting with it.
    """
    from lesiondiffusion.attributes import parse_cavity
    from lesiondiffusion.labels import UnknownOrganError, label_table

    warnings: list[str] = []

    def unknown(problem: str) -> None:
        if not allow_unknown:
            raise LesionDiffusionError(f"{where}: {problem} (pass --allow_unknown_values to use it anyway)")
        warnings.append(f"{where}: {problem}; used as given (--allow_unknown_values)")

    known_fields = (*REQUEST_FIELDS, *V.REPORT_FIELDS, *V.OPTIONAL_FIELDS)
    for key, raw in attributes.items():
        value = str(raw).strip()
        if key not in known_fields:
            unknown(f"unknown attribute {key!r}{_closest(str(key), known_fields)}")
            continue
        if not value:
            continue
        if key == ORGAN_TYPE:
            try:
                label_table("v1").ids(value)
            except UnknownOrganError as e:
                raise LesionDiffusionError(f"{where}: {e}") from None
        elif key == LESION_TYPE:
            if not known_lesion_type(value):
                unknown(f"unknown lesion type {value!r}{_closest(value, lesion_words())}")
        elif key == V.SIZE:
            from lesiondiffusion.attributes import parse_lesion_size

            try:
                parse_lesion_size(value)
            except LesionDiffusionError as e:
                raise LesionDiffusionError(f"{where}: {e}") from None
        elif key == V.CT_VALUE:
            from lesiondiffusion.attributes import read_hu

            hu = read_hu(value)
            if hu is None or not -1100 <= hu <= 4000:
                raise LesionDiffusionError(
                    f"{where}: CT value {value!r} is not a number of HU between -1100 and 4000 (e.g. '40 HU')"
                )
        elif key == V.CAVITY:
            if parse_cavity(value) is None:
                raise LesionDiffusionError(
                    f"{where}: unknown cavity {value!r}; use one of: {', '.join(V.CAVITY_CLASSES)}"
                )
        elif V.is_categorical(key):
            found, pieces = V.parse_classes(key, value)
            for piece in pieces:
                synonyms = [s for cls in V.synonym_table()[key] for s in cls]
                unknown(f"unknown {key} {piece!r}{_closest(piece, synonyms)}")
            for group in EXCLUSIVE.get(key, ()):
                clash = [c for c in found if c in group]
                if len(clash) > 1:
                    raise LesionDiffusionError(
                        f"{where}: {key} {value!r} names {' and '.join(repr(c) for c in clash)}, "
                        "which exclude each other; give one"
                    )
    return warnings


def check_device(device: str | None) -> None:
    """``--device``: one torch knows and this machine has (a CUDA device asked for on a machine without one)."""
    if device in (None, "", "auto"):
        return
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise LesionDiffusionError(f"--device: {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise LesionDiffusionError(f"--device {device}: this machine has {count} CUDA device(s); use --device cpu")
    elif dev.type not in ("cpu", "mps"):
        raise LesionDiffusionError(f"--device: {device!r} is not supported (use cpu or cuda)")


# ---- the images ----------------------------------------------------------------------------------------
def _sample(image: Any) -> np.ndarray:
    """A strided sample of the image's values (HU, float32) of at most about :data:`SAMPLE_VOXELS`."""
    shape = image.raw.shape
    step = max(1, math.ceil((float(np.prod(shape)) / SAMPLE_VOXELS) ** (1 / 3)))
    return image.to_hu(np.s_[::step, ::step, ::step], np.float32).reshape(-1)


def check_image(img: Any, path: Path) -> None:
    """A CT (a :class:`~lesiondiffusion.io.StoredImage`) that cannot be one: constant, or not in Hounsfield
    units (non-finite voxels: :func:`check_organ`)."""
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "the header gives no valid voxel-to-world matrix (zero or missing voxel spacing?)")
    values = _sample(img)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InputError(path, "no finite voxel value (all NaN or infinite)")
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1.0:
        raise InputError(path, f"the image is constant ({lo:g} everywhere): not a CT scan")
    median = float(np.median(finite))
    if lo >= 0 and np.all(finite == np.rint(finite)) and np.unique(finite).size <= 255:
        raise InputError(
            path, f"holds only {np.unique(finite).size} whole values from {lo:g} to {hi:g}: a label map, not a CT"
        )
    if lo >= 0 and median > 500:
        raise InputError(
            path,
            f"values {lo:g} to {hi:g} (median {median:g}) are not Hounsfield units (air is -1000, soft tissue "
            "about 40): check the rescale slope/intercept",
        )
    if hi < -500:
        raise InputError(path, f"every value is below -500 HU (highest {hi:g}): no tissue in this image")


def check_labels(seg: np.ndarray, path: Path) -> np.ndarray:
    """An organ map's labels as integers; float (non-whole) or negative labels are an error."""
    arr = np.asarray(seg)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)):
            raise InputError(path, "the organ map holds NaN or infinite labels")
        frac = arr[arr != np.rint(arr)]
        if frac.size:
            shown = ", ".join(f"{v:g}" for v in np.unique(frac)[:4])
            raise InputError(
                path,
                f"organ labels must be whole numbers; found {shown} "
                "(an interpolated organ map? resample it with nearest neighbour)",
            )
        arr = np.rint(arr).astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InputError(path, f"organ labels must not be negative; found {int(arr.min())}")
    return arr


def _organ_mask(seg: np.ndarray, organ: str, version: str) -> np.ndarray:
    from lesiondiffusion.labels import convert_ids, label_table

    ids_v1 = set(label_table("v1").ids(organ))
    if version == "v1":
        ids = ids_v1
    else:
        ids = {src for src, dst in convert_ids(version, "v1").items() if dst in ids_v1}
    mask = np.zeros_like(seg, dtype=bool)  # in the map's memory order (NIfTI's is Fortran): no strided pass
    for i in sorted(ids):  # a few comparisons: much faster than np.isin on a whole CT
        mask |= seg == i
    return mask


def requested_size_mm(attributes: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """The lesion size asked in mm (``"25 mm"``, ``"3 x 2 x 2 cm"``), None when none was or it is in voxels."""
    from lesiondiffusion.attributes import parse_lesion_size

    text = str(attributes.get(V.SIZE, "") or "").strip()
    if not text or "pixel" in text.lower() or "voxel" in text.lower() or "[" in text:
        return None
    try:
        return tuple(float(v) for v in parse_lesion_size(text))  # type: ignore[return-value]
    except LesionDiffusionError as e:
        raise LesionDiffusionError(f"{e}") from None


def check_organ(
    image: Any,
    image_path: Path,
    seg: np.ndarray,
    seg_img: Any,
    seg_path: Path,
    attributes: Mapping[str, Any],
    version: str,
) -> list[str]:
    """The organ the lesion goes into: present, finite and plausible HU around it, large enough for the size asked."""
    organ = str(attributes.get(ORGAN_TYPE, "")).strip()
    mask = _organ_mask(seg, organ, version)
    if tuple(seg.shape) != tuple(image.shape[:3]):
        return []  # another grid: preprocessing lays the map onto the image or reports it
    if not mask.any():
        present = ", ".join(str(int(i)) for i in np.unique(seg) if i)[:200] or "none"
        raise InputError(
            seg_path, f"the {organ} is not in this organ map (TotalSegmentator {version} labels present: {present})"
        )
    from lesiondiffusion.io import voxel_spacing

    spacing = voxel_spacing(seg_img.affine)
    voxel_mm3 = float(np.prod(spacing))
    volume = float(mask.sum()) * voxel_mm3
    lo, hi = mask_bounds(mask)
    extent = (hi - lo + 1) * spacing
    pad = np.ceil(NEIGHBOURHOOD_MM / spacing).astype(int)
    box = tuple(slice(max(int(a - p), 0), int(b + p + 1)) for a, b, p in zip(lo, hi, pad, strict=True))
    region = image.to_hu(box, np.float32)
    bad = int((~np.isfinite(region)).sum())
    if bad:
        raise InputError(
            image_path,
            f"{bad} non-finite voxel(s) (NaN or infinite) in or within {NEIGHBOURHOOD_MM:g} mm of the {organ}: "
            "fix or mask them first",
        )
    inside = region[mask[box]]
    median = float(np.median(inside))
    low, high = LUNG_HU if "lung" in organ.lower() else ORGAN_HU
    if not low <= median <= high:
        raise InputError(
            image_path,
            f"the {organ} measures {median:.0f} HU (median), not plausible for it ({low:g} to {high:g}): "
            f"is the image in HU, and is {seg_path.name} its organ map?",
        )
    size = requested_size_mm(attributes)
    need = MIN_ORGAN_MM3 if size is None else max(MIN_ORGAN_MM3, math.pi / 6 * float(np.prod(size)))
    asked = "the smallest lesion" if size is None else f"the {' x '.join(f'{s:g}' for s in size)} mm lesion asked"
    if volume < need:
        raise InputError(
            seg_path,
            f"the {organ} holds {volume:.0f} mm3 ({int(mask.sum())} voxel(s)), too small for {asked} "
            f"(needs at least {need:.0f} mm3)",
        )
    # the size's axes are the standardised grid's, the map's may be ordered otherwise: compare sorted extents
    if size is not None and any(a > e + 1e-6 for a, e in zip(sorted(size), sorted(extent.tolist()), strict=True)):
        return [
            f"size {' x '.join(f'{s:g}' for s in size)} mm is larger than the {organ} in this scan "
            f"({' x '.join(f'{e:.0f}' for e in extent)} mm): the lesion is clipped to the organ's box"
        ]
    return []


def check_case(
    image_path: Path,
    seg_path: Path | None,
    attributes: Mapping[str, Any],
    organ_seg_version: str = "auto",
    where: str = "",
    allow_unknown: bool = False,
    vocabulary: Mapping[str, Any] | None = None,
) -> tuple[list[str], str | None]:
    """Every check of one request (see the module docstring); raises the first error.

    Returns the request's warnings and the organ map's numbering ("v1", "v2") as asked or told from the
    map, None when there is no map or the map alone cannot tell (preprocessing then decides with the image).

    ``vocabulary``: the attributes whose values the user typed (default: all of ``attributes``; a
    sentence's reading is made of known values already).
    """
    from lesiondiffusion.io import read_stored
    from lesiondiffusion.labels import resolve_version

    warnings = check_attributes(
        attributes if vocabulary is None else vocabulary, where or str(image_path), allow_unknown
    )
    image = read_stored(image_path)
    check_image(image, image_path)
    if seg_path is None:
        if not np.all(np.isfinite(_sample(image))):
            raise InputError(image_path, "holds non-finite voxels (NaN or infinite): fix or mask them first")
        return warnings, None
    seg_img = read_stored(seg_path, label=True)
    seg = check_labels(seg_img.raw, seg_path)
    if seg.ndim > 3:
        seg = seg.reshape(seg.shape[:3])
    from lesiondiffusion.geometry import same_grid

    if not same_grid(seg_img.affine, seg.shape, image.affine, image.shape):
        if sorted(seg.shape[:3]) != sorted(image.shape[:3]):
            raise InputError(
                seg_path, f"organ map shape {seg.shape[:3]} differs from the image's {tuple(image.shape[:3])}"
            )
        raise InputError(seg_path, f"organ map affine differs from the image's ({image_path})")
    try:
        version = resolve_version(organ_seg_version, seg, seg_img.affine, source=seg_path)
    except LesionDiffusionError:
        return warnings, None  # numbering not told from the map alone: preprocessing decides with the image
    return warnings + check_organ(image, image_path, seg, seg_img, seg_path, attributes, version), version


def check_requests(
    requests: Sequence[Any], organ_seg_version: str = "auto", allow_unknown: bool = False
) -> tuple[list[Any], dict[str, str]]:
    """:func:`check_case` for each :class:`~lesiondiffusion.requests.SynthesisRequest`.

    Returns the requests with their warnings and organ-map numbering attached (each warning also logged
    as one line; the numbering is told once, here, when the map alone tells it) and, for a batch,
    the cases refused with their one-line reason (the others still run). A single request, or a batch
    whose every case is refused, raises the first error instead: nothing is run or written.
    """
    out, refused, first = [], {}, None
    for r in requests:
        declared = organ_seg_version in (None, "", "auto") and r.organ_seg_version
        version = r.organ_seg_version if declared else organ_seg_version
        try:
            found, numbering = check_case(
                Path(r.image),
                None if r.organ_seg is None else Path(r.organ_seg),
                r.attributes,
                version or "auto",
                r.source or f"case {r.case}",
                allow_unknown,
                vocabulary=r.given if r.text is not None else None,
            )
        except LesionDiffusionError as e:
            if len(requests) == 1:
                raise
            first = first or e
            refused[r.case] = str(e)
            logger.error("%s: %s", r.case, e)
            found, numbering = [], None
        for w in found:
            logger.warning("%s: %s", r.case, w)
        out.append(replace(r, warnings=tuple(dict.fromkeys((*r.warnings, *found))), organ_seg_numbering=numbering))
    if first is not None and len(refused) == len(out):
        raise first
    return out, refused
