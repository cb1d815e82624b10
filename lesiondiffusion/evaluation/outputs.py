"""Evaluating a synthesis output folder against its requests: measure each case, aggregate, write the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from lesiondiffusion import lesion_metrics as L
from lesiondiffusion import realism as R
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.evaluation.aggregation import density_ordering, totals
from lesiondiffusion.evaluation.metrics import PSNR_RANGE_HU, CaseError, evaluate_case
from lesiondiffusion.evaluation.rendering import case_caption, contact_sheet, markdown
from lesiondiffusion.io import (
    PathLike,
    atomic_path,
    read_json,
    user_path,
    write_json,
    write_text,
)
from lesiondiffusion.requests import read_requests

logger = logging.getLogger(__name__)

REPORT_FILES = ("evaluation.json", "evaluation.md", "contact_sheet.png")


# ---- the whole run ------------------------------------------------------------------------------------
def _failure_reasons(pred: Path) -> dict[str, str]:
    """Why cases failed, from the synthesis run's ``summary.json`` when there is a readable one."""
    path = pred / "summary.json"
    if not path.is_file():
        return {}
    try:
        cases = read_json(path).get("cases", [])
        return {
            c["case"]: f"failed in {c.get('stage', '?')}: {c.get('error', '')}"
            for c in cases
            if c.get("status") == "error"
        }
    except (InputError, AttributeError, KeyError, TypeError):
        logger.warning("%s: not a synthesis summary; failure reasons are not shown", path)
        return {}


def evaluate_outputs(
    pred: PathLike,
    requests: PathLike,
    out: PathLike | None = None,
    margin_mm: float | None = None,
    tile: int = 160,
    reference: PathLike | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Evaluate every requested case of ``pred``; write ``evaluation.json``, ``evaluation.md`` and
    ``contact_sheet.png`` into ``out`` (default: ``<pred>_evaluation`` beside ``pred``, never inside it).

    ``margin_mm`` overrides each run's recorded margin. ``reference``: a labelled dataset (datalist JSON
    or the folder holding ``datalist.json``) whose lesions the realism measures are set beside
    (:mod:`lesiondiffusion.realism`). Returns the report and the written paths.
    """
    pred = user_path(pred)
    requests_path = user_path(requests)
    wanted = read_requests(requests_path)
    if not pred.is_dir():
        raise InputError(pred, "synthesis output folder not found")
    if margin_mm is not None and float(margin_mm) < 0:
        raise LesionDiffusionError(f"--margin_mm must not be negative, not {margin_mm}")
    out_dir = user_path(out) if out else pred.parent / f"{pred.name}_evaluation"
    reasons = _failure_reasons(pred)

    records: dict[str, dict[str, Any]] = {}
    cases: list[dict[str, Any]] = []
    tiles: list[tuple[str, str, Image.Image | None]] = []
    crops: dict[str, L.LesionCrop] = {}
    # the reference first: a wrong path fails before the cases are measured
    pool = R.load_reference(reference) if reference is not None else None
    missing: list[dict] = []
    invalid: list[dict] = []
    for request in tqdm(wanted, desc="evaluate", unit="case"):
        folder = pred / request.case
        if not folder.is_dir():
            entry = {"case": request.case, "status": "missing", "error": reasons.get(request.case, "no output folder")}
            missing.append(entry)
            cases.append(entry)
            tiles.append((request.case, "missing", None))
            continue
        try:
            record, image = evaluate_case(request, folder, margin_mm, tile, crops)
        except CaseError as e:
            entry = {"case": request.case, "status": "invalid", "error": str(e)}
            invalid.append(entry)
            cases.append(entry)
            tiles.append((request.case, "invalid", None))
            logger.warning("%s: %s", request.case, e)
            continue
        records[request.case] = record
        cases.append(record)
        tiles.append((request.case, case_caption(record), image))
    if pool is not None:
        for case, record in records.items():
            look = record["realism"]
            if look and case in crops:
                R.compare_case(look, crops[case], look["organ"], look["density"], pool)
    ordering = density_ordering(wanted, records)
    reference_path = None if reference is None else str(user_path(reference).resolve())
    report = {
        "pred": str(pred.resolve()),
        "requests": str(requests_path.resolve()),
        "reference": reference_path,
        "psnr_range_hu": PSNR_RANGE_HU,
        "cases": cases,
        "missing": missing,
        "invalid": invalid,
        "density_ordering": ordering,
        "totals": totals(list(records.values()), missing, invalid, ordering, pool, reference_path),
    }
    paths = {name: out_dir / name for name in REPORT_FILES}
    write_json(paths["evaluation.json"], report)
    write_text(paths["evaluation.md"], markdown(report))
    with atomic_path(paths["contact_sheet.png"]) as tmp:
        contact_sheet(tiles, tile).save(tmp, format="PNG")
    return report, paths
