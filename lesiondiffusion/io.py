"""Reading inputs with clear errors, and writing outputs atomically (temp file + rename)."""

from __future__ import annotations

import hashlib
import json
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

