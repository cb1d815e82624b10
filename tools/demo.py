"""``lesiondiffusion demo`` (what ``make demo`` runs): synthesise lesions into a demo phantom and evaluate them.

A lesion-free CT phantom is made from one of the published demo organ maps (``../shared/data/demo``),
with three requests that differ only in density (hypo-, iso-, hyperdense; :mod:`lesiondiffusion.phantom_dataset`).
``synthesize`` writes the lesions with the weights the repository ships (or ``--weights DIR``), then
``evaluate`` measures them. Prints the output paths, seconds per lesion and the evaluation line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion_tools.synthesize import synthesize

logger = logging.getLogger(__name__)

DEMO_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "demo"


def demo(
    out: str = "demo_output",
    src: str = str(DEMO_SOURCE),
    seed: int = 0,
    steps: int = 25,
    weights: str | None = None,
    device: str | None = None,
    bundle_overrides: Any = None,
) -> dict:
    """Build a demo phantom with three lesion requests, synthesise them, evaluate; outputs under ``--out``."""
    from lesiondiffusion.evaluation import evaluate_outputs, summary_line
    from lesiondiffusion.phantom_dataset import build_requests

    if not Path(src).is_dir():
        raise LesionDiffusionError(f"{src}: demo data folder not found (pass --src DIR)")
    root = Path(out)
    requests = build_requests(Path(src), root / "requests", n=1, seed=int(seed), overwrite=True) / "requests.json"
    synthesis = root / "synthesis"
    summary = synthesize(requests=str(requests), out=str(synthesis), overwrite=True, seed=int(seed), steps=int(steps), weights=weights, device=device, bundle_overrides=bundle_overrides)
    report, paths = evaluate_outputs(str(synthesis), str(requests), str(root / "evaluation"), None, 160)
    print(f"requests:   {requests}")
    print(f"synthesis:  {synthesis} (image.nii.gz, label.nii.gz, report.json, provenance.json, preview.png per case)")
    print(f"evaluation: {paths['evaluation.md']}, {paths['contact_sheet.png']}")
    print(f"seconds per lesion: {summary['seconds_per_lesion']:.1f}")
    print(f"evaluation: {summary_line(report)}")
    return report
