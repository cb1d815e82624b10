"""The case loop of the stages that extend a manifest (LMNet, LINet), and the policies every stage shares.

- **Failures**: a case whose inputs are wrong (a :class:`~lesiondiffusion.errors.LesionDiffusionError`) is
  marked ``error`` in the manifest with its one-line reason and the other cases go on; the manifest is
  written with every case in place; then the stage fails with one line naming the failed cases
  (:func:`failed_cases_error`), so a run with a failed case never exits 0. A case that failed in an
  earlier stage is passed on untouched and not counted again.
- **Seeds**: each lesion's seed comes from the run's seed, the case's name and the lesion's index
  (:func:`lesion_seed`), never from the case's position in the manifest.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.manifest import MANIFEST_NAME, CaseEntry, Manifest, write_manifest

logger = logging.getLogger(__name__)


def lesion_seed(seed: int, case: str, index: int) -> int:
    """A per-lesion seed that depends on the case name, not on its position in the manifest."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{case}:{index}".encode())) % (2**63 - 1)


def failed_cases_error(failures: dict[str, str], total: int, manifest: Path) -> LesionDiffusionError | None:
    """``N of M case(s) failed (case: reason; ...); the others are in MANIFEST``, or None without failures."""
    if not failures:
        return None
    listed = "; ".join(f"{case}: {reason}" for case, reason in failures.items())
    return LesionDiffusionError(f"{len(failures)} of {total} case(s) failed ({listed}); the others are in {manifest}")


def run_cases(
    stage: str,
    manifest: Manifest,
    process: Callable[[CaseEntry], CaseEntry],
    out_dir: Path,
) -> Path:
    """``process`` every ``ok`` case of ``manifest`` in order; write ``out_dir/manifest.json`` with every case.

    Returns the written manifest; raises :func:`failed_cases_error` after writing it when a case failed.
    """
    cases = list(manifest.cases)
    todo = [i for i, c in enumerate(cases) if c.ok]
    failures: dict[str, str] = {}
    for i in tqdm(todo, desc=f"{stage} cases", unit="case", disable=len(todo) < 2):
        case = cases[i]
        try:
            cases[i] = process(case)
        except LesionDiffusionError as e:
            logger.error("%s: %s", case.case, e)
            cases[i] = case.failed(str(e))
            failures[case.case] = cases[i].error or "failed"
    written = write_manifest(out_dir / MANIFEST_NAME, replace(manifest, cases=tuple(cases)))
    error = failed_cases_error(failures, len(cases), written)
    if error is not None:
        raise error
    return written
