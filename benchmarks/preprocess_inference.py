"""Benchmark: the preprocess bundle's inference on a full-size CT (wall time and peak memory).

Input: the demo liver case's organ map (280^3 at 1 mm) turned into a phantom CT, resliced onto a
clinical grid of ``--shape`` voxels (default 512 x 512 x 300 at 0.7 x 0.7 x 1.0 mm, LPS, int16, air
outside the phantom), with its organ map. The bundle runs as users run it (``python -m monai.bundle
run``, given organ map, offline report, one lesion) in a child process; the figures are that
process's wall time and peak resident memory, and the same for a run that stops right after start-up
(an unreadable image), i.e. the fixed cost of importing MONAI and parsing the config.

    python benchmarks/preprocess_inference.py [--shape 512 512 300] [--spacing 0.7 0.7 1.0] [--repeats 1]

Writes ``benchmarks/results/preprocess_inference.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "preprocess"
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO / "data" / "demo"  # lesiondiffusion.data_paths.DEMO_DATA, before the package is importable


def build_input(work: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[Path, Path]:
    """Phantom CT + organ map of the demo liver case on an LPS grid of ``shape`` x ``spacing`` mm."""
    import torch
    from monai.transforms import LoadImage, SpatialResample

    from lesiondiffusion.demo import build_demo_cases

    demo = build_demo_cases(DEMO, work / "demo", overwrite=True)
    case = demo / "cases" / "Liver_cancer"
    src = LoadImage(image_only=True, ensure_channel_first=True)(str(case / "organ_seg.nii.gz"))
    centre = (src.affine.numpy() @ np.r_[(np.array(src.shape[1:]) - 1) / 2, 1])[:3]
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    out = []
    for name, mode, dtype, offset in (("image", "bilinear", np.int16, 1000.0), ("organ_seg", "nearest", np.uint8, 0.0)):
        img = LoadImage(image_only=True, ensure_channel_first=True)(str(case / f"{name}.nii.gz"))
        # zero padding outside the phantom: shift HU so that zero is air (-1000 HU)
        moved = SpatialResample(mode=mode, padding_mode="zeros")(
            img + offset, dst_affine=torch.as_tensor(affine), spatial_size=shape
        )
        data = np.rint(moved[0].numpy() - offset).astype(dtype)
        path = work / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        out.append(path)
    return out[0], out[1]


def run_bundle(image: Path, organ_seg: Path | None, out: Path) -> dict[str, float]:
    """Run the bundle in a child process; wall seconds, CPU seconds, peak RSS (MiB) and exit status."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--image", str(image), "--attributes", '{"organ type": "liver", "lesion type": "cyst"}',
           "--output_dir", str(out)]  # fmt: skip
    if organ_seg is not None:
        cmd += ["--organ_seg", str(organ_seg)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=BUNDLE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource usage
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "exit_status": proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, help="keep the built input in this folder and reuse it on later runs")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal: build the input into this folder
    args = parser.parse_args()
    shape, spacing = tuple(args.shape), tuple(args.spacing)
    if args.build is not None:
        build_input(args.build, shape, spacing)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        work = Path(tmp)
        inputs = args.work / f"{'x'.join(map(str, shape))}_{'x'.join(map(str, spacing))}" if args.work else work
        image, seg = inputs / "image.nii.gz", inputs / "organ_seg.nii.gz"
        if not (image.is_file() and seg.is_file()):
            t0 = time.perf_counter()
            inputs.mkdir(parents=True, exist_ok=True)
            # built in a child process: a child forked from a big parent inherits its memory high-water mark
            build = [
                sys.executable,
                __file__,
                "--build",
                str(inputs),
                "--shape",
                *map(str, shape),
                "--spacing",
                *map(str, spacing),
            ]
            subprocess.run(build, check=True)
            print(f"input built in {time.perf_counter() - t0:.1f} s: {shape} at {spacing} mm")
        bad = work / "unreadable.nii.gz"
        bad.write_bytes(b"not a NIfTI file")
        startup = run_bundle(bad, None, work / "startup_out")
        runs = [run_bundle(image, seg, work / f"out_{i}") for i in range(args.repeats)]
        ok = all((work / f"out_{i}" / "manifest.json").is_file() for i in range(args.repeats))
        std = nib.load(str(work / "out_0" / "case_000" / "image.nii.gz")).shape if ok else None
    best = min(runs, key=lambda r: r["wall_s"])
    result = {
        "benchmark": "preprocess inference (bundle run, given organ map, offline report, 1 lesion)",
        "input_shape": list(shape),
        "input_spacing_mm": list(spacing),
        "standardised_shape": None if std is None else list(std),
        "succeeded": ok,
        "runs": runs,
        "best": best,
        "startup_only": startup,
        "processing_s": round(best["wall_s"] - startup["wall_s"], 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": [round(v, 2) for v in os.getloadavg()]},
        "command": "python benchmarks/preprocess_inference.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    (RESULTS / "preprocess_inference.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Preprocess inference benchmark",
        "",
        f"Input: phantom CT {shape[0]} x {shape[1]} x {shape[2]} at {spacing[0]} x {spacing[1]} x {spacing[2]} mm (LPS, int16) "
        f"with its organ map; standardised grid {result['standardised_shape']} (RAS, 1 mm).",
        "",
        "| measure | wall (s) | CPU (s) | peak RSS (MiB) |",
        "|---|---|---|---|",
        f"| whole run (best of {len(runs)}) | {best['wall_s']} | {best['cpu_s']} | {best['peak_rss_mib']} |",
        f"| start-up only (import + config, failing input) | {startup['wall_s']} | {startup['cpu_s']} | {startup['peak_rss_mib']} |",
        "",
        f"Processing beyond start-up: {result['processing_s']} s. Machine: {os.cpu_count()} CPUs, load average at the end "
        f"{result['machine']['load_avg']}. Command: `{result['command']}`.",
        "",
    ]
    (RESULTS / "preprocess_inference.md").write_text("\n".join(md))
    print("\n".join(md))
    if not ok:
        raise SystemExit("the benchmark run failed")


if __name__ == "__main__":
    main()
