"""Benchmark: are synthetic lesions as realistic as ground-truth lesions of the same kind?

Runs ``lesiondiffusion evaluate`` with a reference dataset (:mod:`lesiondiffusion.realism`) and keeps
its realism figures: masks (fill ratio, interior fraction, solidity, sphericity, 6-connected pieces),
appearance (lesion-minus-organ HU against the report and against real lesions, interior noise against
the host organ's, edge width by margin class) and the radiomics-style realism distance beside its two
baselines computed in the same run (the same masks filled flat at the report's CT value; a ground-truth
lesion copied into each mask), checked against the design targets for realism on held-out CT.

    python benchmarks/realism.py [--pred DIR --requests FILE] [--reference DATALIST_OR_DIR]
        [--reference_n 16] [--requests_n 4] [--seed 0] [--steps 25] [--work runs/realism] [--name realism]

Without ``--pred``/``--requests`` the synthetic lesions are made here: held-out phantom requests
(``make-dataset --requests``, hypo/iso/hyperdense variants) synthesised with the shipped weights.
Without ``--reference`` the ground truth is a phantom dataset (``make-dataset``). For real CT, pass the
real-CT datalist (``make-dataset --source real``) and outputs synthesised into its held-out scans.
Writes ``benchmarks/results/<name>.{json,md}`` (and the full evaluation under ``<work>/evaluation``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO, finish_report, snapshot

CLI = [sys.executable, "-c", "from lesiondiffusion_tools.cli import main; main()"]
# The design's realism targets on held-out CT: (totals key, comparison, threshold).
TARGETS = {
    "masks solid (fill ratio >= 0.95)": ("solid_rate", ">=", 1.0),
    "interior fraction within 0.15 of real lesions of that size": ("interior_ok_rate", ">=", 0.9),
    "lesion - organ HU of the report's sign, within 15 HU": ("delta_ok_rate", ">=", 0.9),
    "noise std 0.7-1.5x the host organ's": ("noise_ok_rate", ">=", 0.9),
}


def cli(*args: str) -> None:
    """Run a ``lesiondiffusion`` command; a failure stops the benchmark naming it."""
    print("+ lesiondiffusion " + " ".join(args), flush=True)
    proc = subprocess.run([*CLI, *args], cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): lesiondiffusion {' '.join(args)}")


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """The reference dataset and the synthesis outputs to evaluate, made here where not given."""
    work = (REPO / args.work).resolve()
    timings: dict[str, float] = {}
    reference = Path(args.reference).resolve() if args.reference else None
    if reference is None:
        reference = work / "reference"
        start = time.perf_counter()
        cli(
            "make-dataset",
            "--n",
            str(args.reference_n),
            "--seed",
            str(args.seed + 100),
            "--out",
            str(reference),
            "--overwrite",
        )
        timings["reference_dataset_s"] = time.perf_counter() - start
    if (args.pred is None) != (args.requests is None):
        raise SystemExit("give --pred and --requests together (or neither, to synthesise phantom requests here)")
    if args.pred is not None:
        pred, requests = Path(args.pred).resolve(), Path(args.requests).resolve()
    else:
        requests_dir, pred = work / "requests", work / "synthesis"
        cli(
            "make-dataset",
            "--n",
            str(args.requests_n),
            "--seed",
            str(args.seed + 1000),
            "--requests",
            "--out",
            str(requests_dir),
            "--overwrite",
        )
        requests = requests_dir / "requests.json"
        start = time.perf_counter()
        proc = subprocess.run([*CLI, "synthesize", "--requests", str(requests), "--out", str(pred), "--seed", str(args.seed),
                               "--steps", str(args.steps), "--overwrite"], cwd=REPO)  # fmt: skip
        timings["synthesis_s"] = time.perf_counter() - start
        if proc.returncode != 0:  # failed cases are listed by the evaluation as missing
            print(f"synthesize exited {proc.returncode}; its failed cases count as missing", flush=True)
    return {"reference": reference, "pred": pred, "requests": requests, "work": work, "timings": timings}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare, evaluate with the reference, and collect the realism figures."""
    from lesiondiffusion.evaluation import evaluate_outputs, summary_line

    inputs = prepare(args)
    start = time.perf_counter()
    report, paths = evaluate_outputs(
        inputs["pred"], inputs["requests"], inputs["work"] / "evaluation", reference=inputs["reference"]
    )
    inputs["timings"]["evaluation_s"] = time.perf_counter() - start
    realism = report["totals"]["realism"]
    cases = []
    for c in report["cases"]:
        m = c.get("realism") or {}
        if c["status"] != "ok" or not m:
            continue
        ref = m.get("reference") or {}
        cases.append({
            "case": c["case"], "organ": m.get("organ"), "density": m.get("density"), "margin": m.get("margin_class"),
            **{k: m.get(k) for k in ("fill_ratio", "interior_fraction", "solidity", "sphericity", "components_6",
                                     "components_26", "median_delta_hu", "report_delta_hu", "noise_std_ratio",
                                     "edge_width_mm", "solid", "interior_ok", "delta_ok", "delta_in_reference_range", "noise_ok")},
            "reference_match": ref.get("match"), "reference_lesions": ref.get("lesions"),
            "reference_interior_fraction": ref.get("interior_fraction"), "reference_median_delta_hu": ref.get("median_delta_hu"),
            "reference_noise_std_ratio": ref.get("noise_std_ratio"), "reference_edge_width_mm": ref.get("edge_width_mm"),
        })  # fmt: skip
    targets = {}
    for name, (key, op, threshold) in TARGETS.items():
        value = realism[key]
        targets[name] = {
            "value": value,
            "target": f"{op} {100 * threshold:g}%",
            "met": None if value is None else value >= threshold,
        }
    d = realism["realism_distance"]
    for name, key in (("flat fill's", "flat"), ("copy-paste's", "copy_paste")):
        targets[f"realism distance below the {name}"] = {
            "value": d["synthetic"], "target": f"< {_num(d[key], '.3f')}", "met": d[f"beats_{key}"],
        }  # fmt: skip
    return {
        "reference": str(inputs["reference"]),
        "pred": str(inputs["pred"]),
        "requests": str(inputs["requests"]),
        "evaluation": str(paths["evaluation.md"]),
        "summary_line": summary_line(report),
        "evaluated": report["totals"]["evaluated"],
        "requested": report["totals"]["requested"],
        "realism": realism,
        "targets": targets,
        "cases": cases,
        "timings_s": {k: round(v, 1) for k, v in inputs["timings"].items()},
    }


def _num(v: Any, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(r: dict[str, Any]) -> str:
    """The benchmark report: targets, synthetic beside ground truth, the distance and its baselines, cases."""
    t = r["realism"]
    syn, gt = t["synthetic"], t["ground_truth"] or {}
    d = t["realism_distance"]
    lines = [
        "# Realism of synthetic lesions against ground-truth lesions", "",
        f"Command: `{r['command']}`  ", f"Reference (ground truth): `{r['reference']}` ({t['reference_lesions']} lesions, "
        f"{t['matched_reference_lesions']} matched to the cases by organ and density class)  ",
        f"Synthetic: `{r['pred']}` ({r['evaluated']} of {r['requested']} requested cases evaluated)  ",
        f"Full evaluation: `{r['evaluation']}`", "",
        f"`{r['summary_line']}`", "",
        "## Targets", "", "| target | value | required | met |", "| --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, g in r["targets"].items():
        value = _num(g["value"], ".3f") if "distance" in name else _pct(g["value"])
        met = "-" if g["met"] is None else "yes" if g["met"] else "**no**"
        lines.append(f"| {name} | {value} | {g['target']} | {met} |")
    lines += [
        "",
        "## Synthetic beside ground truth (medians)",
        "",
        "| measure | synthetic | ground truth |",
        "| --- | --- | --- |",
    ]
    for key, name, fmt in (("fill_ratio", "fill ratio", ".3f"), ("interior_fraction", "interior fraction", ".3f"),
                           ("solidity", "solidity", ".3f"), ("sphericity", "sphericity", ".3f"),
                           ("median_delta_hu", "lesion - organ median HU", "+.1f"),
                           ("noise_std_ratio", "noise std ratio (lesion / organ)", ".2f"),
                           ("edge_width_mm", "edge width (mm)", ".2f")):  # fmt: skip
        lines.append(f"| {name} | {_num(syn.get(key), fmt)} | {_num(gt.get(key), fmt)} |")
    for cls, v in t["delta_by_density"].items():
        lines.append(
            f"| lesion - organ HU, {cls} ({v['cases']} / {v['reference_lesions']}) | {_num(v['synthetic'], '+.1f')} | {_num(v['ground_truth'], '+.1f')} |"
        )
    for cls, v in t["edge_width_by_margin"].items():
        lines.append(
            f"| edge width (mm), {cls} ({v['cases']} / {v['reference_lesions']}) | {_num(v['synthetic'])} | {_num(v['ground_truth'])} |"
        )
    lines += [
        "", f"One 6-connected piece per lesion: {_pct(t['one_piece_rate'])}; lesion - organ HU within the matched real "
        f"lesions' 10th-90th percentiles (+-10 HU): {_pct(t['delta_in_reference_range_rate'])}.", "",
        "## Realism distance", "",
        f"Fréchet-style distance (diagonal covariance) on {len(d['features'])} in-house radiomics-style features "
        f"({', '.join(d['features'])}), scaled by the ground truth's spread; lower is closer. Both baselines are "
        "computed in this run from the same masks.", "",
        "| lesions | distance | cases |", "| --- | --- | --- |",
        f"| synthetic | {_num(d['synthetic'], '.3f')} | {d['cases_with_features']['synthetic']} |",
        f"| flat fill at the report's CT value | {_num(d['flat'], '.3f')} | {d['cases_with_features']['flat']} |",
        f"| copy-paste of a ground-truth lesion | {_num(d['copy_paste'], '.3f')} | {d['cases_with_features']['copy_paste']} |",
        "", "## Cases", "",
        "| case | organ | density | fill | interior (GT) | HU vs organ: measured / report (GT) | noise ratio (GT) | edge mm (GT) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for c in r["cases"]:
        lines.append(
            f"| {c['case']} | {c['organ']} | {(c['density'] or '-').replace(' lesion', '')} | {_num(c['fill_ratio'])} "
            f"| {_num(c['interior_fraction'])} ({_num(c['reference_interior_fraction'])}) "
            f"| {_num(c['median_delta_hu'], '+.1f')} / {_num(c['report_delta_hu'], '+.1f')} ({_num(c['reference_median_delta_hu'], '+.1f')}) "
            f"| {_num(c['noise_std_ratio'])} ({_num(c['reference_noise_std_ratio'])}) | {_num(c['edge_width_mm'])} ({_num(c['reference_edge_width_mm'])}) |"
        )
    lines += [
        "",
        f"Seconds: {', '.join(f'{k} {v}' for k, v in r['timings_s'].items())}.",
        "",
        r.get("machine_note", ""),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pred", help="synthesis output folder to evaluate (default: synthesise phantom requests here)"
    )
    parser.add_argument("--requests", help="the requests file that produced --pred")
    parser.add_argument(
        "--reference", help="ground-truth datalist or its folder (default: a phantom dataset made here)"
    )
    parser.add_argument(
        "--reference_n", type=int, default=16, help="phantom ground-truth cases when --reference is not given"
    )
    parser.add_argument(
        "--requests_n", type=int, default=4, help="phantom request images (x3 densities) when --pred is not given"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--work", default="runs/realism", help="working folder (relative to the repository)")
    parser.add_argument("--name", default="realism")
    args = parser.parse_args()
    before = snapshot()
    report = run(args)

    def render(r: dict[str, Any]) -> str:
        from common import machine_note

        return markdown({**r, "machine_note": machine_note(r["machine"])})

    finish_report(args.name, __file__, report, before, 0, render)


if __name__ == "__main__":
    main()
