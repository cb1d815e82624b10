"""Where the data shipped with the project lie (one place; everything else imports these).

- :data:`BUNDLES`: the four MONAI bundles (``preprocess``, ``vqgan``, ``lmnet``, ``linet``).
- :data:`DEMO_DATA`: the original LesionDiffusion project's two demo cases (``<Case>/totalseg_health.nii.gz``,
  ``label.nii.gz``, ``type.json``; TotalSegmentator v1 organ maps, no CT), MIT.
- :data:`TS_EXAMPLE`: TotalSegmentator's example abdomen CT with its v2 organ map (:data:`TS_EXAMPLE_CT`,
  :data:`TS_EXAMPLE_SEG`), Apache-2.0; see its ``NOTICE.md``.

In the source tree (``pip install -e .``) they are the repository's ``bundles/`` and ``data/``; a wheel
(``pip install .``) carries the same folders as package data, ``lesiondiffusion/bundles`` and
``lesiondiffusion/data``. The installed copy wins when both exist. They are only ever read.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def shipped_dir(name: str) -> Path:
    """The shipped folder ``name`` (``bundles`` or ``data``): inside the installed package, else the source tree's."""
    installed = PACKAGE_DIR / name
    return installed if installed.is_dir() else REPO_ROOT / name


BUNDLES = shipped_dir("bundles")
DATA = shipped_dir("data")
DEMO_DATA = DATA / "demo"
TS_EXAMPLE = DATA / "ts_example"
TS_EXAMPLE_CT = TS_EXAMPLE / "example_ct.nii.gz"
TS_EXAMPLE_SEG = TS_EXAMPLE / "example_seg_fast_force_split.nii.gz"

__all__ = [
    "BUNDLES", "DATA", "DEMO_DATA", "PACKAGE_DIR", "REPO_ROOT", "TS_EXAMPLE", "TS_EXAMPLE_CT", "TS_EXAMPLE_SEG",
    "shipped_dir",
]  # fmt: skip
