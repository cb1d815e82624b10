"""``lesiondiffusion evaluate``: measure synthesis outputs against the requests that produced them.

Writes ``evaluation.json``, ``evaluation.md`` (a table per case + totals + targets) and
``contact_sheet.png`` into ``--out`` and prints one summary line. The measurements are
:mod:`lesiondiffusion.evaluation`'s; with ``--reference`` the realism measures stand beside ground-truth
lesions' (:mod:`lesiondiffusion.realism`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def evaluate(
    pred: str,
    requests: str,
    out: str | None = None,
    margin_mm: float | None = None,
    tile: int = 160,
    reference: str | None = None,
) -> None:
    """Measure every case of a synthesis output folder against its request.

    --pred DIR: what `lesiondiffusion synthesize --out DIR` wrote. --requests FILE: the requests file it
    ran. --out REPORT_DIR: where the report goes (default: DIR_evaluation beside DIR). --margin_mm M:
    override the margin recorded in each case's provenance. --tile PX: contact-sheet panel size.
    --reference DATALIST_OR_DIR: ground-truth lesions (a labelled dataset as `make-dataset` writes it:
    its datalist.json or the folder holding it) to set the realism measures beside, with the realism
    distance and its flat-fill and copy-paste baselines.
    """
    from lesiondiffusion.evaluation import evaluate_outputs, summary_line

    report, paths = evaluate_outputs(
        str(pred), str(requests), None if out is None else str(out), margin_mm, int(tile),
        None if reference is None else str(reference),
    )  # fmt: skip
    for name, path in paths.items():
        logger.info("%s: %s", name, path)
    print(f"{summary_line(report)}; report: {paths['evaluation.md']}")
