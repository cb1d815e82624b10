"""Reading inputs with clear errors, and writing outputs atomically (temp file + rename)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lesiondiffusion.errors import InputError, LesionDiffusionError

PathLike = str | os.PathLike[str]

logger = logging.getLogger(__name__)


def user_path(value: PathLike) -> Path:
    """``value`` as a path with ``~`` expanded; a ``~name`` of no known user stays as written (its file is
    then simply not found, rather than ``expanduser`` raising)."""
    path = Path(value)
    try:
        return path.expanduser()
    except RuntimeError:
        return path


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
    except OSError as e:
        raise _write_error(target, e) from None
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
        img = nib.load(str(p)) if p.name.lower().endswith(NIFTI_SUFFIXES) else _nifti_by_content(p)
        shape = img.shape
    except InputError:
        raise
    except Exception as e:  # nibabel raises many types for corrupt files
        raise InputError(p, f"unreadable NIfTI ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if ndim is not None:
        squeezed = tuple(s for i, s in enumerate(shape) if i < ndim or s != 1)
        if len(squeezed) != ndim:
            raise InputError(p, f"expected a {ndim}D image, got shape {tuple(shape)}")
    return img


def _nifti_by_content(path: Path) -> nib.Nifti1Image:
    """A NIfTI file whatever its name (a cache blob behind a symlink, no suffix): told by its header bytes."""
    import gzip

    with open(path, "rb") as f:  # through any symlink, without replacing the user's path
        raw = f.read()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    magic = data[344:348]
    if len(data) < 352 or magic not in (b"n+1\x00", b"n+2\x00"):
        raise InputError(path, "not a NIfTI file (no NIfTI header), nor a DICOM folder or NRRD file (.nrrd/.nhdr)")
    cls = nib.Nifti2Image if magic == b"n+2\x00" else nib.Nifti1Image
    return cls.from_bytes(data)


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


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Physical size of a voxel along each array axis (column norms of the affine), mm."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


@dataclass(frozen=True)
class StoredImage:
    """A NIfTI volume as stored: raw voxels (on-disk dtype), the scaling that turns them into HU, the image."""

    raw: np.ndarray
    slope: float
    inter: float
    image: nib.Nifti1Image

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.image.affine, dtype=np.float64)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along each array axis."""
        return tuple(float(s) for s in voxel_spacing(self.image.affine))  # type: ignore[return-value]

    def to_hu(self, box: Any = None, dtype: Any = np.float64) -> np.ndarray:
        """Scaled values (HU) of the whole array or of ``box``, as ``dtype``."""
        raw = self.raw if box is None else self.raw[box]
        return raw.astype(dtype) * dtype(self.slope) + dtype(self.inter)

    def values(self) -> np.ndarray:
        """HU for measurements: the raw array itself when the scaling is the identity (no copy), else float32."""
        return self.raw if (self.slope, self.inter) == (1.0, 0.0) else self.to_hu(dtype=np.float32)

    def from_hu(self, hu: np.ndarray) -> np.ndarray:
        """HU -> stored values of the raw dtype (rounded and clipped for integer dtypes)."""
        stored = (np.asarray(hu, dtype=np.float64) - self.inter) / self.slope
        dtype = self.raw.dtype
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return np.clip(np.rint(stored), info.min, info.max).astype(dtype)
        if dtype == np.bool_:
            return stored > 0.5
        return stored.astype(dtype)


def read_stored(path: PathLike, label: bool = False) -> StoredImage:
    """Read a 3D NIfTI keeping its stored dtype and scaling (never modified); problems are an :class:`InputError`.

    nibabel only: reading a NIfTI needs neither torch nor MONAI (a DICOM series or NRRD file is read by
    :func:`read_image`, ``label`` as for it). Inside :func:`shared_reads` an unchanged NIfTI file is decoded
    once and every caller gets the same read-only voxels.
    """
    if image_format(path) != "nifti":
        return stored_image(read_image(path, label=label), path)
    key = _file_key(path) if _shared is not None else None
    if key is not None and key in _shared:  # type: ignore[operator]
        _shared.move_to_end(key)  # type: ignore[union-attr]
        return _shared[key]  # type: ignore[index]
    stored = stored_image(load_nifti(path, ndim=3), path)
    if key is not None:
        stored.raw.flags.writeable = False  # shared: a caller that edits must copy (they all do)
        _shared[key] = stored  # type: ignore[index]
        while len(_shared) > _shared_max:  # type: ignore[arg-type]
            _shared.popitem(last=False)  # type: ignore[union-attr]
    return stored


def stored_image(img: nib.Nifti1Image, path: PathLike | None = None) -> StoredImage:
    """The voxels of a loaded 3D image as stored (see :func:`read_stored`); ``path`` names it in errors."""
    try:
        proxy = img.dataobj
        raw = np.asarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    except Exception as e:  # corrupt gzip streams and the like
        raise InputError(path, f"unreadable NIfTI voxels ({type(e).__name__}: {' '.join(str(e).split())})") from None
    raw = raw.reshape(raw.shape[:3])
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return StoredImage(raw, slope, inter, img)  # type: ignore[arg-type]


_shared: OrderedDict[tuple[Any, ...], StoredImage] | None = None
_shared_max = 0


def _file_key(path: PathLike) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # load_nifti names the problem
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextmanager
def shared_reads(max_files: int = 2) -> Iterator[None]:
    """Within this block :func:`read_stored` keeps the last ``max_files`` files it decoded: the input checks
    and the stages of one in-process synthesis share one decoding of a CT and of its organ map (a file
    changed meanwhile is read again; a batch holds no more than ``max_files`` volumes). Nested blocks
    share the outer one's reads."""
    global _shared, _shared_max
    outer, outer_max = _shared, _shared_max
    if outer is None:
        _shared, _shared_max = OrderedDict(), int(max_files)
    try:
        yield
    finally:
        _shared, _shared_max = outer, outer_max


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

    An existing ``path`` is an error unless ``overwrite``; it is replaced only after success, and the
    check is made again at that moment: a folder that appeared meanwhile is never replaced without
    ``overwrite``. The temporary folder (:func:`work_prefix`) is removed on every exit path.
    """
    target = Path(path)
    check_output_target(target, overwrite)
    tmp = make_work_dir(target)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes an owner-only folder
        _commit_dir(tmp, target, overwrite)
    except OSError as e:
        raise _write_error(target, e) from None
    finally:
        if tmp.exists():
            _rmtree(tmp)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---- one writer per output: lock file, work folders, guarded commit ----------------------------------
WORK_TAG = ".work-"
LOCK_TAG = ".lock"
# errors a full, read-only or failing disk gives: reported as one line naming the output
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM)


def work_prefix(target: PathLike) -> str:
    """Name prefix of the work folders a run makes beside ``target`` (one output, one prefix)."""
    return f".{Path(target).name}{WORK_TAG}"


def lock_file(target: PathLike) -> Path:
    """The lock file of output ``target``: beside it, so it exists before the output does."""
    t = Path(target)
    return t.parent / f".{t.name}{LOCK_TAG}"


def _write_error(target: Path, e: OSError) -> Exception:
    """An OSError met while writing ``target`` as one line (disk full, read-only...); others unchanged."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return LesionDiffusionError(f"{target}: cannot write the output ({e.strerror or e})")
    return e


def check_output_target(target: PathLike, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``), is not a folder, or would swallow the current folder."""
    t = Path(target)
    if t.exists() or t.is_symlink():
        if not overwrite:
            raise InputError(t, "output already exists; pass --overwrite to replace it")
        if not t.is_dir():
            raise InputError(t, "exists and is not a folder; give --out a folder path")
        here = Path.cwd().resolve()
        real = t.resolve()
        if real == Path(real.anchor) or real == Path.home().resolve() or real == here or real in here.parents:
            raise InputError(
                t, "refusing to replace this folder with --overwrite (it is the current, home or root folder)"
            )


def check_inputs_outside(target: PathLike, inputs: Sequence[PathLike]) -> None:
    """Refuse an output folder that holds (or is) one of the inputs: replacing it would delete them."""
    t = Path(target).absolute()
    real = t.resolve()
    for p in inputs:
        a = Path(p).absolute()
        if a == t or t in a.parents or a.resolve() == real or real in a.resolve().parents:
            raise InputError(p, f"lies inside the output folder {t}; choose another --out (inputs are never replaced)")


def make_work_dir(target: PathLike) -> Path:
    """A fresh work folder beside ``target`` (named by :func:`work_prefix`); an unwritable place is one line."""
    t = Path(target)
    try:
        t.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=work_prefix(t), dir=t.parent))
    except OSError as e:
        raise LesionDiffusionError(f"{t}: cannot write beside it in {t.parent} ({e.strerror or e})") from None


@contextmanager
def work_dir(target: PathLike) -> Iterator[Path]:
    """:func:`make_work_dir` for the length of the block, removed on every exit path."""
    tmp = make_work_dir(target)
    try:
        yield tmp
    finally:
        _rmtree(tmp)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing if ``dst`` exists (Linux ``renameat2``; elsewhere a checked rename)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # filesystems without the flag fall through
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


def _commit_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``target``; an existing target is set aside first and only then deleted."""
    if target.exists() or target.is_symlink():
        if not overwrite:  # re-checked now, not only at the start
            raise InputError(
                target, "appeared while this run was writing it; not replaced (pass --overwrite to replace it)"
            )
        check_output_target(target, overwrite)
        old = Path(tempfile.mkdtemp(prefix=work_prefix(target) + "old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
        try:
            _rename_noreplace(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _rmtree(old)
        return
    try:
        _rename_noreplace(tmp, target)
    except FileExistsError:
        raise InputError(
            target, "appeared while this run was writing it; not replaced (pass --overwrite to replace it)"
        ) from None


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux clock ticks since boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class OutputLock:
    """One writer per output folder: an ``O_EXCL`` lock file beside ``target`` holding pid, host and start.

    A second run on the same output refuses at once (:class:`LesionDiffusionError`, one line). A lock
    left by a run that no longer exists on this host (killed) is stale: it is taken over with a warning.
    Work folders left beside the output by such runs (:func:`work_prefix`) are listed in
    ``stale_work`` when the lock is taken; :func:`output_lock` names or removes them.
    """

    def __init__(self, target: PathLike, command: str = "") -> None:
        self.target = Path(target)
        self.path = lock_file(self.target)
        self.command = command
        self.stale_work: list[Path] = []
        self._token: str | None = None

    def _record(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "pid": pid,
            "host": socket.gethostname(),
            "start": _process_start(pid),
            "since": time.time(),
            "command": self.command,
        }

    def _holder(self) -> dict[str, Any] | None:
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
            return obj if isinstance(obj, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any] | None) -> bool:
        if holder is None:  # unreadable: a run killed while writing it, unless it is being written now
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except OSError:
                return True
        if holder.get("host") != socket.gethostname():
            return False  # another machine's run: its pid cannot be checked from here
        try:
            return not _alive(int(holder["pid"]), holder.get("start"))
        except (KeyError, TypeError, ValueError):
            return True

    def acquire(self) -> OutputLock:
        """Take the lock or raise; see the class docstring."""
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LesionDiffusionError(f"{self.target}: cannot create its folder ({e.strerror or e})") from None
        record = self._record()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    logger.warning("%s: taking over the lock of a run that is gone (%s)", self.target, _who(holder))
                    self._break(holder)
                    continue
                raise LesionDiffusionError(
                    f"{self.target}: another run is writing this output ({_who(holder)}); wait for it to end, "
                    f"or remove {self.path} if that run is gone"
                ) from None
            except OSError as e:
                raise LesionDiffusionError(f"{self.target}: cannot write in {parent} ({e.strerror or e})") from None
            try:
                os.write(fd, json.dumps(record).encode())
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                os.unlink(self.path)
                raise _write_error(self.path, e) from None
            os.close(fd)
            self._token = json.dumps(record)
            break
        else:
            raise LesionDiffusionError(f"{self.target}: could not take the lock {self.path}")
        prefix = work_prefix(self.target)
        self.stale_work = sorted(p for p in parent.iterdir() if p.name.startswith(prefix))
        return self

    def _break(self, holder: dict[str, Any] | None) -> None:
        """Remove a stale lock, unless another run replaced it meanwhile (checked after moving it aside)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = None
        if holder is not None and moved != holder:  # a live run's lock: put it back
            try:
                _rename_noreplace(aside, self.path)
                return
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if it is still this run's."""
        if self._token is None:
            return
        try:
            if self.path.read_text(encoding="utf-8") == self._token:
                self.path.unlink()
        except OSError:
            pass
        self._token = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _who(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "lock file unreadable"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {when}"


@contextmanager
def output_lock(target: PathLike, overwrite: bool = False, command: str = "") -> Iterator[OutputLock]:
    """Hold :class:`OutputLock` on ``target`` for the block; work folders killed runs left beside it are
    named (a warning line) and, with ``overwrite``, removed."""
    lock = OutputLock(target, command)
    with lock:
        for stale in lock.stale_work:
            if overwrite:
                _rmtree(stale)
                logger.warning("removed %s, a work folder left by a run that was stopped", stale)
            else:
                logger.warning("%s is a work folder left by a run that was stopped; --overwrite removes it", stale)
        yield lock


# ---- images in other formats: DICOM series, NRRD ------------------------------------------------------
NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
_STEM_SUFFIXES = (*NIFTI_SUFFIXES, ".seg.nrrd", *NRRD_SUFFIXES)
_INT16 = np.iinfo(np.int16)


def image_format(path: PathLike) -> str:
    """ "dicom" for a folder (a DICOM series), "nrrd" for ``.nrrd``/``.nhdr``, else "nifti"."""
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
        raise InputError(
            path, "the NRRD header has no 'space directions'/'space origin': the image's position is unknown"
        )
    space = header.get("space", "left-posterior-superior")
    if space not in ("left-posterior-superior", "right-anterior-superior"):
        raise InputError(
            path, f"NRRD space {space!r} is not supported (use left-posterior-superior or right-anterior-superior)"
        )


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
    missing = [
        k
        for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber")
        if any(k not in h for h in headers)
    ]
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
            raise InputError(
                folder,
                f"slices are unevenly spaced ({np.abs(steps).min():.3g} to {np.abs(steps).max():.3g} mm): missing slices?",
            )
