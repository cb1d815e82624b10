"""Shared fixtures: the demo data and small demo datasets built from it once per test session.

- ``demo_src``: ``data/demo`` in the repository (two cases, ``Bladder_cancer`` and
  ``Liver_cancer``: 280^3 organ map, label map and ``type.json``; never written).
- ``small_demo``: ``build_demo_cases(demo_src, ..., crop=64)``: 64^3 voxels at 1 mm around each lesion.
- ``tiny_demo``: ``build_demo_cases(demo_src, ..., crop=96, step=2)``: 48^3 voxels at 2 mm.

Both demo folders hold ``cases/<Case>/{image,label,organ_seg}.nii.gz`` + ``type.json`` (phantom CT,
int16 HU; report box moved to the cropped grid), ``datalist.json`` (both cases under "training") and
``train_{img,label,type,seg}_list.txt``. Treat them as read-only: they are shared by every test.
``demo_src_snapshot`` records the source files (size, mtime, hash) before any build, so a test can
prove the source is never written. ``write_nifti`` is a factory writing small NIfTI files into the test's ``tmp_path``.
"""

from __future__ import annotations

import os

# numpy reads this once, when first imported: without transparent-huge-page advice a fresh large array does
# not fault through memory compaction on hosts short of huge pages (the command line does the same)
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

import hashlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lesiondiffusion.data_paths import DEMO_DATA  # noqa: E402

# The suite runs on two pytest workers (`make test`), each starting bundle processes: one thread per
# process keeps the cores busy without oversubscription, which slows small convolutions many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")

DEMO_SRC = DEMO_DATA


@pytest.fixture(scope="session")
def demo_src() -> Path:
    """The published demo cases (organ maps, label maps, reports); read-only."""
    assert DEMO_SRC.is_dir(), f"demo data not found at {DEMO_SRC}"
    return DEMO_SRC


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: size, modification time and SHA-256 (to prove it was not written)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def demo_src_snapshot(demo_src: Path) -> dict[str, tuple[int, int, str]]:
    """:func:`snapshot` of ``demo_src`` taken before the demo datasets are built."""
    return snapshot(demo_src)


@pytest.fixture(scope="session")
def small_demo(demo_src: Path, demo_src_snapshot: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo dataset cropped to 64^3 voxels (1 mm) around each lesion; returns its folder."""
    from lesiondiffusion.demo import build_demo_cases

    return build_demo_cases(demo_src, tmp_path_factory.mktemp("demo") / "small", crop=64)


@pytest.fixture(scope="session")
def tiny_demo(demo_src: Path, demo_src_snapshot: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo dataset cropped to 96^3 voxels around each lesion, subsampled to 48^3 at 2 mm."""
    from lesiondiffusion.demo import build_demo_cases

    return build_demo_cases(demo_src, tmp_path_factory.mktemp("demo") / "tiny", crop=96, step=2)


@pytest.fixture
def write_nifti(tmp_path: Path) -> Callable[..., Path]:
    """``write_nifti(name, array, affine=None, dtype=None) -> path`` in ``tmp_path`` (identity affine)."""

    def write(name: str, array: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> Path:
        arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
        return path

    return write
