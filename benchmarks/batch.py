"""Batch synthesis throughput: cases per hour with 1 and with N torchrun processes (gloo on CPU).

Each run is ``torchrun --nproc_per_node P -m lesiondiffusion synthesize --requests R --out DIR`` on the
same requests: ``--cases`` liver lesions of different densities and sizes in the small real CT
(``tests/data/ts_small``), shipped weights, ``--steps`` DDIM steps per network, one thread per process
(``OMP_NUM_THREADS=1``). Wall time is measured around the whole command (process start, model loading
and the merge included). Writes ``benchmarks/results/batch.{json,md}`` with the machine's load.

    .venv/bin/python benchmarks/batch.py [--cases 6] [--steps 10] [--procs 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import load_avg, uptime, write_report  # noqa: E402

TS_SMALL = REPO / "tests" / "data" / "ts_small"
DENSITIES = ("hypodense", "hyperdense", "isodense")


def requests(folder: Path, n: int) -> Path:
    common = {"image": str(TS_SMALL / "example_ct_sm.nii.gz"), "organ_seg": str(TS_SMALL / "example_seg.nii.gz")}
    entries = [
        {"case": f"case_{i:03d}", **common,
         "attributes": {"organ type": "liver", "lesion type": "tumor", "density": DENSITIES[i % 3], "size": f"{12 + 2 * (i % 4)} mm"}}
        for i in range(n)
    ]  # fmt: skip
    path = folder / "requests.json"
    path.write_text(json.dumps({"organ_seg_version": "v2", "requests": entries}))
    return path


def run(procs: int, req: Path, out: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(29600 + procs),
           "-m", "lesiondiffusion", "synthesize", "--requests", str(req), "--out", str(out), "--steps", str(steps)]  # fmt: skip
    before = load_avg()
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{procs} process(es) failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    n = summary["succeeded"]
    return {
        "processes": procs, "cases": n, "wall_s": round(seconds, 1), "cases_per_hour": round(3600 * n / seconds, 1),
        "case_seconds_median": sorted(c["seconds"] for c in summary["cases"])[n // 2], "load_before": before, "load_after": load_avg(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--procs", default="1,2")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        req = requests(Path(tmp), args.cases)
        rows = [run(int(p), req, Path(tmp) / f"out{p}", args.steps) for p in args.procs.split(",")]
    base = rows[0]["cases_per_hour"]
    for r in rows:
        r["speed_up"] = round(r["cases_per_hour"] / base, 2)
    report = {
        "cases": args.cases,
        "steps": args.steps,
        "cpu_count": os.cpu_count(),
        "uptime_after": uptime(),
        "runs": rows,
    }
    lines = [
        "# Batch synthesis: cases per hour, 1 vs N processes",
        "",
        f"`.venv/bin/python benchmarks/batch.py --cases {args.cases} --steps {args.steps} --procs {args.procs}`: "
        f"{args.cases} liver lesions in the small real CT (122 x 101 x 30), shipped weights, {args.steps} DDIM steps "
        f"per network, one thread per process, {os.cpu_count()} cores shared with other jobs (load in the table).",
        "",
        "| processes | wall time (s) | cases per hour | speed-up | median s per case | load before / after (1 min) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['wall_s']} | {r['cases_per_hour']} | {r['speed_up']}x | {r['case_seconds_median']} | "
                     f"{r['load_before'][0]} / {r['load_after'][0]} |")  # fmt: skip
    write_report("batch", report, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
