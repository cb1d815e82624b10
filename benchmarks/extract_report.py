"""Benchmark: report extraction (``lesiondiffusion.reports.extraction.extract_report``) on whole CT volumes.

Inputs: the two demo cases at their full size (280^3 at 1 mm: phantom CT with the lesion painted at the
report's HU, the real label and organ maps), and the liver case placed in a 512 x 512 x 300 volume (the
size of a clinical CT on the 1 mm working grid is usually smaller; this is the upper end). Each case is
measured in a fresh child process: wall time of ``extract_report`` (median of ``--repeats``), the peak
memory one call allocates beyond its inputs (tracemalloc) and the process's peak resident memory.

    python benchmarks/extract_report.py [--repeats 3]

Writes ``benchmarks/results/extract_report.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "data" / "demo"  # lesiondiffusion.data_paths.DEMO_DATA, before the package is importable

CHILD = r"""
import json, resource, sys, time, tracemalloc
import numpy as np
from lesiondiffusion.reports.extraction import extract_report
data = np.load(sys.argv[1])
image, label, seg = data["image"], data["label"], data["seg"]
inputs = image.nbytes + label.nbytes + seg.nbytes
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    report = extract_report(image, label, seg, (1.0, 1.0, 1.0))
    times.append(time.perf_counter() - start)
# a separate call under tracemalloc (numpy reports its buffers to it): the call's own peak allocation
tracemalloc.start()
extract_report(image, label, seg, (1.0, 1.0, 1.0))
_, traced_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
print(json.dumps({"times_s": times, "inputs_mib": round(inputs / 2**20, 1), "added_peak_mib": round(traced_peak / 2**20, 1),
                  "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "density": report.attributes["density"], "shape": report.attributes["shape"]}))
"""


def build_inputs(work: Path) -> dict[str, Path]:
    """``.npz`` files (image, label, seg) of the benchmark cases."""
    import numpy as np

    from lesiondiffusion.demo import build_demo_cases
    from lesiondiffusion.io import read_nifti_array

    demo = build_demo_cases(DEMO, work / "demo")
    out = {}
    arrays = {}
    for case in ("Bladder_cancer", "Liver_cancer"):
        folder = demo / "cases" / case
        arrays[case] = [read_nifti_array(folder / f"{k}.nii.gz")[0] for k in ("image", "label", "organ_seg")]
        out[f"{case} 280^3"] = work / f"{case}.npz"
        np.savez(out[f"{case} 280^3"], image=arrays[case][0], label=arrays[case][1], seg=arrays[case][2])
    big = (512, 512, 300)
    image = np.full(big, -1000, np.int16)
    label = np.zeros(big, np.uint8)
    seg = np.zeros(big, np.uint8)
    src = arrays["Liver_cancer"]
    region = tuple(slice(o, o + n) for o, n in zip((116, 116, 10), src[0].shape))
    image[region], label[region], seg[region] = src[0], src[1], src[2]
    out["Liver_cancer in 512x512x300"] = work / "big.npz"
    np.savez(out["Liver_cancer in 512x512x300"], image=image, label=label, seg=seg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in build_inputs(Path(tmp)).items():
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(path), str(args.repeats)], capture_output=True, text=True, check=True
            )
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            times = sorted(result.pop("times_s"))
            rows.append(
                {"case": name, "median_s": round(times[len(times) // 2], 2), "min_s": round(times[0], 2), **result}
            )
            print(rows[-1], flush=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "repeats": args.repeats,
        "load_avg": [round(v, 2) for v in os.getloadavg()],
        "command": f"python benchmarks/extract_report.py --repeats {args.repeats:d}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "extract_report.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [
        "# extract_report on whole volumes",
        "",
        f"`{meta['command']}` ({meta['cpus']} CPU cores, Python {meta['python']}). Wall time of one call (median and",
        "minimum of the repeats); the call's own peak allocation beyond its inputs (tracemalloc, which numpy",
        "reports its buffers to; one more call) and the child process's peak RSS (imports and inputs included).",
        f"Load average at the end: {meta['load_avg']}.",
        "",
        "| case | median s | min s | inputs MiB | added peak MiB | process peak RSS MiB | density | shape |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['median_s']} | {r['min_s']} | {r['inputs_mib']} | {r['added_peak_mib']} | {r['process_peak_rss_mib']} | {r['density']} | {r['shape']} |"
        for r in rows
    ]
    (RESULTS / "extract_report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
