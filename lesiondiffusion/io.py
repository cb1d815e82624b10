"""Reading inputs with clear errors, and writing outputs atomically (temp file + rename)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lesiondiffusion.errors import InputError

PathLike = str | os.PathLike[str]
logger = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffixes so writers that infer the format from the name (.nii.gz) still work
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}-", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get the usual mode
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes (weights provenance), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: PathLike) -> Any:
    """Read a JSON file; a missing or malformed file is an :class:`InputError`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(p, f"not valid JSON ({e})") from None


def load_nifti(path: PathLike, ndim: int | None = 3) -> nib.Nifti1Image:
    """Load a NIfTI image header and check it is readable (and ``ndim``-dimensional when given)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    try:
        img = nib.load(str(p))
        shape = img.shape
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(p, f"unreadable NIfTI ({type(e).__name__}: {e})") from None
    if ndim is not None:
        squeezed = tuple(s for i, s in enumerate(shape) if i < ndim or s != 1)
        if len(squeezed) != ndim:
            raise InputError(p, f"expected a {ndim}D image, got shape {tuple(shape)}")
    return img


def read_nifti_array(path: PathLike, dtype: Any = None, ndim: int | None = 3) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Load a NIfTI image's voxels (squeezed to ``ndim``) and the image; decoding errors name the file."""
    img = load_nifti(path, ndim)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise InputError(path, f"unreadable NIfTI voxels ({type(e).__name__}: {e})") from None
    if ndim is not None and data.ndim > ndim:
        data = data.reshape(data.shape[:ndim])
    return (data if dtype is None else data.astype(dtype, copy=False)), img


def save_nifti(
    path: PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: Any = None,
) -> Path:
    """Save ``data`` with ``affine`` (and a reference header, e.g. the input's) atomically.

    Both qform and sform are set so every reader sees the same geometry.
    """
    arr = np.asarray(data if dtype is None else data.astype(dtype))
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(arr, affine, header=hdr)
    img.set_data_dtype(arr.dtype)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


@contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` that becomes ``path`` only if the block succeeds.

    An existing ``path`` is an error unless ``overwrite``; it is replaced only after success.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise InputError(target, "output already exists (use overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes an owner-only folder
        if target.exists():
            _rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            _rmtree(tmp)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)



# ---- images in other formats: DICOM series, NRRD ------------------------------------------------------
NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
_STEM_SUFFIXES = (*NIFTI_SUFFIXES, ".seg.nrrd", *NRRD_SUFFIXES)
_INT16 = np.iinfo(np.int16)


def image_format(path: PathLike) -> str:
    """"dicom" for a folder (a DICOM series), "nrrd" for ``.nrrd``/``.nhdr``, else "nifti"."""
    p = Path(path)
    if p.is_dir():
        return "dicom"
    return "nrrd" if p.name.lower().endswith(NRRD_SUFFIXES) else "nifti"


def image_stem(path: PathLike) -> str:
    """An image's name without its format suffix (``ct.nii.gz``, ``ct.nrrd`` -> ``ct``; a folder's own name)."""
    name = Path(path).name
    for suffix in _STEM_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def image_exists(path: PathLike) -> bool:
    """True for an existing image file or DICOM series folder."""
    p = Path(path)
    return p.is_file() or p.is_dir()


def read_image(path: PathLike, label: bool = False) -> nib.Nifti1Image:
    """Any supported image as a NIfTI image with its true geometry (RAS+ affine, spacing, origin).

    A NIfTI file is returned as loaded. A DICOM series folder (MONAI ``PydicomReader``) has its
    rescale slope/intercept applied (HU for CT); an NRRD file (MONAI ``NrrdReader``, ``.nrrd`` or a
    detached ``.nhdr``) keeps its values. Voxels are stored as int16 when they are integers in its range
    (uint8 for ``label`` maps up to 255), else float32. Problems are one :class:`InputError` naming ``path``.
    """
    kind = image_format(path)
    if kind == "nifti":
        return load_nifti(path, ndim=3)
    p = Path(path)
    if not image_exists(p):
        raise InputError(p, "file not found")
    if kind == "dicom":
        _check_dicom_series(p)
    data, affine = _read_with_monai(p, kind)
    if data.ndim != 3:
        raise InputError(p, f"expected a 3D image, got shape {tuple(data.shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(p, "the image's orientation/spacing give no valid voxel-to-world matrix")
    img = nib.Nifti1Image(_compact(data, label), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def as_nifti(path: PathLike, folder: PathLike, name: str, label: bool = False) -> Path:
    """``path`` itself when it is a NIfTI file; else its conversion (:func:`read_image`) saved as ``folder/name``.

    The conversion goes where the caller's outputs go, never beside the input.
    """
    if image_format(path) == "nifti":
        return Path(path)
    img = read_image(path, label=label)
    data = np.asanyarray(img.dataobj)
    out = save_nifti(Path(folder) / name, data, img.affine, header=img.header)
    logger.info("%s: converted to %s (%s, shape %s)", path, out, data.dtype, data.shape)
    return out


def _compact(data: np.ndarray, label: bool) -> np.ndarray:
    """Integer-valued voxels as the smallest of uint8 (labels) / int16 that holds them, else float32."""
    arr = np.asarray(data)
    integral = np.issubdtype(arr.dtype, np.integer) or bool(np.all(np.isfinite(arr)) and np.all(arr == np.rint(arr)))
    if integral and arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        if label and lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        if _INT16.min <= lo and hi <= _INT16.max:
            return arr.astype(np.int16)
    return arr.astype(np.float32)


def _read_with_monai(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and RAS affine through MONAI's ``LoadImage`` with the format's reader."""
    import warnings

    from monai.data import NrrdReader, PydicomReader
    from monai.transforms import LoadImage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns about optional GPU decoders it does not find
            if kind == "nrrd":
                _check_nrrd_header(path)
                reader = NrrdReader(dtype=None)
            else:
                reader = PydicomReader()
            img = LoadImage(reader=reader, image_only=True, dtype=None)(str(path))
    except InputError:
        raise
    except Exception as e:  # the readers raise many types for corrupt data
        cause = e.__cause__ or e
        what = "DICOM series" if kind == "dicom" else "NRRD"
        raise InputError(path, f"unreadable {what} ({type(cause).__name__}: {' '.join(str(cause).split())})") from None
    space = str(img.meta.get("space", "RAS"))
    if space != "RAS":
        raise InputError(path, f"image space {space} could not be brought to RAS")
    return np.asarray(img.array if hasattr(img, "array") else img), np.asarray(img.affine, dtype=np.float64)


def _check_nrrd_header(path: Path) -> None:
    """An NRRD the readers would misplace: no physical space (MONAI would assume LPS) or an unusual one."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as e:
        raise InputError(path, f"unreadable NRRD header ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if "space directions" not in header or "space origin" not in header:
        raise InputError(path, "the NRRD header has no 'space directions'/'space origin': the image's position is unknown")
    space = header.get("space", "left-posterior-superior")
    if space not in ("left-posterior-superior", "right-anterior-superior"):
        raise InputError(path, f"NRRD space {space!r} is not supported (use left-posterior-superior or right-anterior-superior)")


def _check_dicom_series(folder: Path) -> None:
    """One series of evenly spaced, parallel slices in ``folder``; else one error saying what is wrong.

    ``PydicomReader`` stacks every DICOM file of the folder by InstanceNumber and spaces the slices by
    the first and last positions: mixed series, gaps or shuffled numbers would give a wrong grid silently.
    """
    import pydicom

    headers = []
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        try:
            headers.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception:
            continue  # not DICOM (README, DICOMDIR index...): the reader skips it too
    headers = [h for h in headers if "PixelSpacing" in h or "ImagePositionPatient" in h]
    if not headers:
        raise InputError(folder, "no DICOM image files in this folder")
    series = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        raise InputError(folder, f"holds {len(series)} DICOM series; give a folder with one series")
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber") if any(k not in h for h in headers)]
    if missing:
        raise InputError(folder, f"DICOM slices lack {', '.join(missing)}: the series' geometry is unknown")
    headers.sort(key=lambda h: int(h.InstanceNumber))
    orient = np.asarray([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if not np.allclose(orient, orient[0], atol=1e-4):
        raise InputError(folder, "the slices have different orientations")
    normal = np.cross(orient[0][:3], orient[0][3:])
    depth = np.asarray([np.dot([float(v) for v in h.ImagePositionPatient], normal) for h in headers])
    if len(headers) > 1:
        steps = np.diff(depth)
        if np.any(np.abs(steps) < 1e-3) or not (np.all(steps > 0) or np.all(steps < 0)):
            raise InputError(folder, "slice positions repeat or are out of InstanceNumber order")
        if np.ptp(np.abs(steps)) > max(0.01, 0.01 * float(np.abs(steps).mean())):
            raise InputError(folder, f"slices are unevenly spaced ({np.abs(steps).min():.3g} to {np.abs(steps).max():.3g} mm): missing slices?")
