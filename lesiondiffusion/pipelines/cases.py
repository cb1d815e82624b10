"""The case loop of the stages that extend a manifest (LMNet, LINet), and the policies every stage shares.

A stage runs as a MONAI evaluator (:class:`CaseEvaluator`): a ``Dataset`` of the manifest's cases
(:func:`case_items`) read one case per iteration, the stage's ``process`` as the iteration, and handlers
in ``val_handlers``; :class:`ManifestWriter` writes the extended manifest when the run completes.

- **Failures**: a case whose inputs are wrong (a :class:`~lesiondiffusion.errors.LesionDiffusionError`) is
  marked ``error`` in the manifest with its one-line reason and the other cases go on; the manifest is
  written with every case in place; then the stage fails with one line naming the failed cases
  (:func:`failed_cases_error`), so a run with a failed case never exits 0. A case that failed in an
  earlier stage is passed on untouched and not counted again.
- **Seeds**: a case's reports and boxes come from the run's seed and the case's name (:func:`case_seed`),
  each lesion's shape and texture from those and the lesion's index (:func:`lesion_seed`), never from the
  case's position in the batch or the manifest.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import PathLike
from lesiondiffusion.manifest import MANIFEST_NAME, CaseEntry, Manifest, read_manifest, write_manifest

logger = logging.getLogger(__name__)

CASE = "case"  # the key of a case's entry in a dataset item and in the evaluator's output
ERROR = "error"  # the key of the case's failure (None when it succeeded or was passed on)


def case_seed(seed: int, case: str) -> int:
    """A per-case seed (the preprocess stage draws a case's reports and boxes from it): the case's name, not
    its position in the batch."""
    return (int(seed) * 1_000_003 + zlib.crc32(case.encode())) % (2**63 - 1)


def lesion_seed(seed: int, case: str, index: int) -> int:
    """A per-lesion seed that depends on the case name, not on its position in the manifest."""
    return case_seed(seed, f"{case}:{index}")


def failed_cases_error(failures: dict[str, str], total: int, manifest: Path) -> LesionDiffusionError | None:
    """``N of M case(s) failed (case: reason; ...); the others are in MANIFEST``, or None without failures."""
    if not failures:
        return None
    listed = "; ".join(f"{case}: {reason}" for case, reason in failures.items())
    return LesionDiffusionError(f"{len(failures)} of {total} case(s) failed ({listed}); the others are in {manifest}")


def read_stage_manifest(path: PathLike | None, previous: str, require_ok: bool = False) -> Manifest:
    """The manifest a stage extends (written by the ``previous`` stage); one-line errors when it is missing,
    or, with ``require_ok``, when every case already failed."""
    hint = f"set manifest to the manifest.json written by the {previous} stage (--manifest FILE)"
    if not path:
        raise LesionDiffusionError(hint)
    if not Path(path).is_file():
        raise InputError(path, f"manifest not found; {hint}")
    manifest = read_manifest(path)
    if require_ok and not manifest.ok_cases():
        raise InputError(path, "no case to process (every case failed in an earlier stage)")
    return manifest


def stage_dir(manifest: PathLike, output_dir: PathLike | None = None) -> Path:
    """Where a stage writes: ``output_dir``, by default the manifest's folder (extended in place, atomically)."""
    return Path(output_dir) if output_dir else Path(manifest).parent


def case_items(manifest: Manifest) -> list[dict[str, CaseEntry]]:
    """The stage's dataset: one ``{"case": entry}`` item per case, in manifest order (failed ones included)."""
    return [{CASE: case} for case in manifest.cases]


def one_case(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``collate_fn`` of a loader with ``batch_size`` 1: the case's item as it is (entries are not tensors)."""
    (item,) = batch
    return item


class CaseEvaluator(Evaluator):
    """A stage's case loop as a MONAI evaluator: one iteration per case of the manifest.

    ``process(case, output_dir)`` extends an ``ok`` case's entry (writing its files into ``output_dir``); a
    case that fails with a :class:`~lesiondiffusion.errors.LesionDiffusionError` is marked failed and the
    loop goes on; a case failed in an earlier stage passes through untouched. Each iteration's output is
    ``{"case": entry, "error": reason or None}``, for ``val_handlers`` such as :class:`ManifestWriter`.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Any,
        process: Callable[[CaseEntry, Path], CaseEntry],
        output_dir: PathLike,
        val_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, val_handlers=val_handlers, decollate=False)
        self.process, self.output_dir = process, Path(output_dir)

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, Any]:
        case: CaseEntry = batchdata[CASE]
        if not case.ok:
            return {CASE: case, ERROR: None}
        try:
            with torch.no_grad():
                return {CASE: self.process(case, self.output_dir), ERROR: None}
        except LesionDiffusionError as e:
            logger.error("%s: %s", case.case, e)
            failed = case.failed(str(e))
            return {CASE: failed, ERROR: failed.error or "failed"}


class ManifestWriter:
    """Handler: writes ``<output_dir>/manifest.json``, ``manifest`` with every case as the run left it, when
    the run completes; then fails the run with :func:`failed_cases_error` when a case failed."""

    def __init__(self, manifest: Manifest, output_dir: PathLike) -> None:
        self.manifest, self.output_dir = manifest, Path(output_dir)
        self.written: Path | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self.cases: dict[str, CaseEntry] = {}
        self.failures: dict[str, str] = {}

    def _collect(self, engine: Engine) -> None:
        case: CaseEntry = engine.state.output[CASE]
        self.cases[case.case] = case
        if engine.state.output[ERROR] is not None:
            self.failures[case.case] = engine.state.output[ERROR]

    def _write(self, engine: Engine) -> None:
        cases = tuple(self.cases.get(c.case, c) for c in self.manifest.cases)
        self.written = write_manifest(self.output_dir / MANIFEST_NAME, replace(self.manifest, cases=cases))
        error = failed_cases_error(self.failures, len(cases), self.written)
        if error is not None:
            raise error
