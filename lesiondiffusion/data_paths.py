"""Where the data shipped with the repository lie (one place; everything else imports these).

- :data:`DEMO_DATA`: the original LesionDiffusion project's two demo cases (``<Case>/totalseg_health.nii.gz``,
  ``label.nii.gz``, ``type.json``; TotalSegmentator v1 organ maps, no CT), MIT.
- :data:`TS_EXAMPLE`: TotalSegmentator's example abdomen CT with its v2 organ map (:data:`TS_EXAMPLE_CT`,
  :data:`TS_EXAMPLE_SEG`), Apache-2.0; see its ``NOTICE.md``.

The folders belong to the source tree (an editable install, ``pip install -e .``, finds them); they are
only ever read.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "data"
DEMO_DATA = DATA / "demo"
TS_EXAMPLE = DATA / "ts_example"
TS_EXAMPLE_CT = TS_EXAMPLE / "example_ct.nii.gz"
TS_EXAMPLE_SEG = TS_EXAMPLE / "example_seg_fast_force_split.nii.gz"

__all__ = ["DATA", "DEMO_DATA", "REPO_ROOT", "TS_EXAMPLE", "TS_EXAMPLE_CT", "TS_EXAMPLE_SEG"]
