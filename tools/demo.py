"""``lesiondiffusion demo`` (what ``make demo`` runs): write described lesions into a real CT and evaluate them.

By default the CT is TotalSegmentator's example abdomen CT shipped in ``data/ts_example`` (3 mm,
non-contrast) with its organ map (TotalSegmentator v2 ids, which the preprocess stage recognises).
:data:`DEMO_REQUESTS` asks for one lesion in each of the liver, a kidney, the spleen, the pancreas and
the urinary bladder; the liver's is given as a plain sentence. The requests file is written into ``--out`` (never beside the input data),
``synthesize`` writes the lesions with the weights the repository ships (or ``--weights DIR``), then
``evaluate`` measures them. Prints each preview, the seconds per lesion and the evaluation line.

``--source phantom`` runs the earlier, cheaper demo instead: a lesion-free CT phantom made from one of
the original project's demo organ maps (``data/demo``), three requests that differ only in density.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lesiondiffusion.data_paths import DEMO_DATA, TS_EXAMPLE_CT, TS_EXAMPLE_SEG
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import output_lock, read_json, write_json
from lesiondiffusion_tools.synthesize import synthesize

logger = logging.getLogger(__name__)

DEMO_SOURCE = DEMO_DATA  # the phantom demo's organ maps
SOURCES = ("ct", "phantom")

# One lesion per organ, in the words of the report vocabulary (lesiondiffusion/resources/description.json).
# Sizes stay well inside each organ of the example CT (its pancreas is small: ~19 mL).
DEMO_REQUESTS: tuple[dict[str, Any], ...] = (
    {"case": "liver_cyst", "text": "a 25 mm hypodense, round-like, well-defined cyst in the liver"},
    {"case": "kidney_tumor", "attributes": {
        "organ type": "right kidney", "lesion type": "tumor", "density": "hypodense", "size": "20 mm",
        "density variations": "homogeneous"}},
    {"case": "spleen_tumor", "attributes": {
        "organ type": "spleen", "lesion type": "tumor", "density": "hypodense", "size": "18 mm"}},
    {"case": "pancreas_tumor", "attributes": {
        "organ type": "pancreas", "lesion type": "tumor", "density": "hypodense", "size": "12 mm"}},
    {"case": "bladder_tumor", "attributes": {
        "organ type": "urinary bladder", "lesion type": "tumor", "density": "hyperdense", "size": "20 mm",
        "cavity": "wall thickening"}},
)  # fmt: skip


def write_demo_requests(
    path: Path, image: Path, organ_seg: Path, cases: list[dict[str, Any]], organ_seg_version: str | None = None
) -> Path:
    """Write ``cases`` as a requests file at ``path``, each on ``image`` with ``organ_seg`` (paths relative to it),
    declaring the map's numbering when ``organ_seg_version`` is known."""

    def rel(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), path.parent.resolve())).as_posix()

    entries = [{"case": c["case"], "image": rel(image), "organ_seg": rel(organ_seg), **{k: v for k, v in c.items() if k != "case"}}
               for c in cases]  # fmt: skip
    head = {} if organ_seg_version is None else {"organ_seg_version": organ_seg_version}
    return write_json(path, {**head, "requests": entries})


def select_requests(lesions: Any) -> list[dict[str, Any]]:
    """:data:`DEMO_REQUESTS` whose case names are in ``lesions`` (comma-separated text or a list; None: all)."""
    if lesions is None:
        return list(DEMO_REQUESTS)
    wanted = [s.strip() for s in (lesions.split(",") if isinstance(lesions, str) else lesions) if str(s).strip()]
    known = {r["case"]: r for r in DEMO_REQUESTS}
    unknown = [w for w in wanted if w not in known]
    if unknown or not wanted:
        raise LesionDiffusionError(
            f"--lesions: unknown demo lesion(s) {unknown or wanted!r}; choose from {', '.join(known)}"
        )
    return [known[w] for w in wanted]


def demo(
    out: str = "demo_output",
    source: str = "ct",
    image: str = str(TS_EXAMPLE_CT),
    organ_seg: str = str(TS_EXAMPLE_SEG),
    lesions: Any = None,
    src: str = str(DEMO_SOURCE),
    seed: int = 0,
    steps: int = 25,
    weights: str | None = None,
    device: str | None = None,
    bundle_overrides: Any = None,
) -> dict:
    """Synthesise the demo lesions and evaluate them; everything lands under ``--out``.

    ``--source ct`` (default): the lesions of :data:`DEMO_REQUESTS` (or those named by ``--lesions``,
    comma-separated) in ``--image`` with its organ map ``--organ_seg``. ``--source phantom``: three
    density-only variants in a phantom built from ``--src``. Returns the evaluation report.
    """
    from lesiondiffusion.evaluation import evaluate_outputs, summary_line
    from lesiondiffusion.phantom_dataset import build_requests

    if source not in SOURCES:
        raise LesionDiffusionError(f"--source must be one of {', '.join(SOURCES)}, not {source!r}")
    root = Path(out)
    with output_lock(root, overwrite=True, command="demo"):  # one demo at a time writes into --out
        if source == "phantom":
            if not Path(src).is_dir():
                raise LesionDiffusionError(f"{src}: demo data folder not found (pass --src DIR)")
            requests = (
                build_requests(Path(src), root / "requests", n=1, seed=int(seed), overwrite=True) / "requests.json"
            )
        else:
            for path in (image, organ_seg):
                if not Path(path).is_file():
                    raise InputError(path, "file not found")
            root.mkdir(parents=True, exist_ok=True)
            # the shipped example map is v2; a user's own map is told from its anatomy (or synthesize's flag)
            declared = "v2" if Path(organ_seg).resolve() == TS_EXAMPLE_SEG.resolve() else None
            requests = write_demo_requests(
                root / "requests.json", Path(image), Path(organ_seg), select_requests(lesions), declared
            )
        synthesis = root / "synthesis"
        summary = synthesize(requests=str(requests), out=str(synthesis), overwrite=True, seed=int(seed), steps=int(steps),
                             weights=weights, device=device, bundle_overrides=bundle_overrides)  # fmt: skip
        report, paths = evaluate_outputs(str(synthesis), str(requests), str(root / "evaluation"), None, 160)
        print(f"requests:   {requests}")
        print(
            f"synthesis:  {synthesis} (image.nii.gz, label.nii.gz, report.json, provenance.json, preview.png per case)"
        )
        for entry in read_json(requests)["requests"]:
            asked = entry.get("text") or ", ".join(f"{k}: {v}" for k, v in entry.get("attributes", {}).items())
            print(f"  {entry['case']:<16} {synthesis / entry['case'] / 'preview.png'}  ({asked})")
        print(f"evaluation: {paths['evaluation.md']}, {paths['contact_sheet.png']}")
        print(f"seconds per lesion: {summary['seconds_per_lesion']:.1f}")
        print(f"evaluation: {summary_line(report)}")
    return report
