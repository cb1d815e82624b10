"""Benchmark: seconds per lesion of ``RandLesionSynthesisd`` in a training loop, and what the lesions look like.

The sample is what a segmentation training loop would feed the transform: TotalSegmentator's example
abdomen CT (``data/ts_example``, non-contrast, with its v2 organ map) on RAS at ``--spacing`` mm, cut to
``--size``^3 voxels around the liver's centre. The transform runs in fast mode (its training-loop
settings: few sampling steps, a small crop, no disk I/O) with the ``cpu`` preset and the shipped weights.

It is timed warm: the networks are built and one lesion written before the clock starts (a ``DataLoader``
worker pays the load once). Each timed lesion is a new random draw (``--lesions`` of them, one per call,
hypodense and hyperdense asked alternately); the figures are medians of the wall time and of the process's
CPU time. On the shared development machine the wall time mostly measures the other jobs (a process
gets a fraction of a core), so the CPU time of the one-thread process is also given: it is what the
lesion costs, and about its wall time on an idle core. The wall time is split into LMNet's mask
(``draw``), LINet's conditioning and inpainting (``inpaint``) and the rest (report, placement, paste).

Quality, so that speed is never bought with lesions that no longer read as asked: each lesion is measured
in the output (:func:`lesiondiffusion.reports.extraction.measure_lesion`, as ``evaluate`` does): its core HU against
the liver around it must move in the requested direction (more than 10 HU), and ``--preview`` writes the
first lesions' before/after panels at W400/L40.

    python benchmarks/rand_lesion.py [--lesions 7] [--threads 1] [--steps MASK IMAGE] [--preview]

Writes ``benchmarks/results/rand_lesion.{json,md}`` (and ``rand_lesion.png`` with ``--preview``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import REPO, RESULTS, finish_report, set_threads, snapshot

CT = REPO / "data" / "ts_example" / "example_ct.nii.gz"
SEG = REPO / "data" / "ts_example" / "example_seg_fast_force_split.nii.gz"
LIVER_V2 = 5
TARGET_S = 2.0
DENSITIES = ("hypodense lesion", "hyperdense lesion")
DIRECTION = {"hypodense lesion": -1, "hyperdense lesion": 1}


def load_sample(spacing: float, size: int) -> dict[str, Any]:
    """The CT, its organ map and a liver label on RAS ``spacing`` mm, ``size``^3 around the liver's centre."""
    import torch
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Spacingd,
        SpatialCropd,
        SpatialPadd,
    )

    keys = ["image", "organ_seg"]
    d = Compose([
        LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, "RAS"),
        Spacingd(keys, (spacing,) * 3, mode=("bilinear", "nearest")),
    ])({"image": str(CT), "organ_seg": str(SEG)})  # fmt: skip
    idx = torch.nonzero(d["organ_seg"][0] == LIVER_V2)
    centre = ((idx.min(0).values + idx.max(0).values) // 2).tolist()
    d = Compose(
        [SpatialCropd(keys, roi_center=centre, roi_size=(size,) * 3), SpatialPadd(keys, (size,) * 3, mode="edge")]
    )(d)
    d["label"] = (d["organ_seg"] == LIVER_V2).to(torch.uint8)
    return d


class StageTimer:
    """Wall time spent in named methods of an object, summed until ``take`` resets it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: Any, method: str, stage: str) -> None:
        inner = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

        setattr(owner, method, timed)

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def measure(before: dict[str, Any], after: dict[str, Any], record: dict[str, Any], spacing: float) -> dict[str, Any]:
    """The written lesion as ``evaluate`` measures it: core HU against the organ around it, and its class."""
    from lesiondiffusion import attributes as A
    from lesiondiffusion.labels import to_v1_map
    from lesiondiffusion.reports import extraction

    image = after["image"][0].numpy()
    label = after["label"][0].numpy().astype(np.int32)
    seg = to_v1_map(np.rint(before["organ_seg"][0].numpy()).astype(np.int32), "v2")
    m = extraction.measure_lesion(image, label, seg, (spacing,) * 3, record["organ_id"], version="v1")
    homogeneous = m.smoothed_std_hu <= A.HOMOGENEOUS_MAX_STD_HU
    requested = record["requested"][A.V.DENSITY]
    delta = None if m.reference_hu is None else m.core_hu - m.reference_hu
    direction = None if delta is None else (1 if delta > A.ISO_HU else -1 if delta < -A.ISO_HU else 0)
    return {
        "requested_density": requested,
        "measured_density": extraction.density_class(m, record["organ"], homogeneous),
        "core_hu": round(m.core_hu, 1),
        "organ_reference_hu": None if m.reference_hu is None else round(m.reference_hu, 1),
        "delta_hu": None if delta is None else round(delta, 1),
        "report_ct_value": record["attributes"].get(A.V.CT_VALUE),
        "direction_match": None if direction is None else direction == DIRECTION[requested],
        "size_requested": record["requested"][A.V.SIZE],
        "voxels": record["voxels"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, warm up, then time ``args.lesions`` lesions one call each."""
    import torch

    from lesiondiffusion.augment import FAST, RandLesionSynthesisd

    set_threads(args.threads)
    sample = load_sample(args.spacing, args.size)
    settings: dict[str, Any] = {"preset": "cpu"}
    if args.steps:
        settings.update(mask_steps=args.steps[0], image_steps=args.steps[1])
    distribution = {"organs": ["liver"], "lesion_types": ["tumor"], "size_mm": (10.0, 30.0),
                    "cavity": "within the parenchymal organ"}  # fmt: skip
    transforms = {
        density: RandLesionSynthesisd(
            prob=1.0,
            distribution={**distribution, "densities": [density]},
            organ_seg_version="v2",
            organ_label=1,
            settings=settings,
        )  # fmt: skip
        for density in DENSITIES
    }
    start = time.perf_counter()
    engine = transforms[DENSITIES[0]].engine
    for t in transforms.values():
        t._engine = engine  # one set of networks, as in one DataLoader worker
    load_s = time.perf_counter() - start
    timer = StageTimer()
    timer.wrap(engine.synthesiser, "draw", "draw")
    timer.wrap(engine.inpainter, "condition", "inpaint")
    timer.wrap(engine.inpainter, "inpaint_lesion", "inpaint")

    warm = transforms[DENSITIES[0]]
    warm.set_random_state(10_000)
    start = time.perf_counter()
    warm(dict(sample))
    warmup_s = time.perf_counter() - start
    timer.take()

    rows, previews = [], []
    for i in range(args.lesions):
        t = transforms[DENSITIES[i % len(DENSITIES)]]
        t.set_random_state(i)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = t(dict(sample))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        stages = timer.take()
        records = json.loads(out["image"].meta["lesion_synthesis"])
        if not records:
            rows.append({"seed": i, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "written": False})
            continue
        row = {"seed": i, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "written": True,
               **{k: round(v, 3) for k, v in stages.items()}, "rest": round(seconds - sum(stages.values()), 3),
               **measure(sample, out, records[0], args.spacing)}  # fmt: skip
        rows.append(row)
        logging.info("lesion %d: %.2f s %s", i, seconds, {k: row[k] for k in ("requested_density", "delta_hu")})
        if args.preview and len(previews) < 2:
            previews.append((out, row))

    written = [r for r in rows if r["written"]]
    median = statistics.median(r["seconds"] for r in written) if written else None
    median_cpu = statistics.median(r["cpu_seconds"] for r in written) if written else None
    report: dict[str, Any] = {
        "sample": {"ct": str(CT.relative_to(REPO)), "spacing_mm": args.spacing, "size": args.size,
                   "shape": list(sample["image"].shape[1:])},
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in FAST.items()}, **settings,
                     "distribution": distribution, "densities": list(DENSITIES)},
        "torch_threads": torch.get_num_threads(),
        "network_load_s": round(load_s, 2),
        "warmup_lesion_s": round(warmup_s, 2),
        "lesions": rows,
        "median_s_per_lesion": None if median is None else round(median, 3),
        "median_cpu_s_per_lesion": None if median_cpu is None else round(median_cpu, 3),
        "median_stages_s": {
            k: round(statistics.median(r[k] for r in written if k in r), 3) for k in ("draw", "inpaint", "rest")
        } if written else {},
        "target_s": TARGET_S,
        "meets_target_wall": None if median is None else median <= TARGET_S,
        "meets_target_cpu": None if median_cpu is None else median_cpu <= TARGET_S,
        "direction_match_rate": (
            sum(bool(r["direction_match"]) for r in written) / len(written) if written else None
        ),
    }  # fmt: skip
    if previews:
        report["preview"] = write_previews(sample, previews).name
    return report


def write_previews(sample: dict[str, Any], previews: list[tuple[dict[str, Any], dict[str, Any]]]) -> Path:
    """Before/after panels (three planes, W400/L40) of the given lesions, stacked into ``rand_lesion.png``."""
    from PIL import Image

    from lesiondiffusion.io import atomic_path
    from lesiondiffusion.preview import write_preview

    before, affine = sample["image"][0].numpy(), sample["image"].affine.numpy()
    tiles = []
    with tempfile.TemporaryDirectory(prefix="rand-lesion-") as tmp:
        for k, (out, row) in enumerate(previews):
            caption = (f"RandLesionSynthesisd (fast): {row['requested_density']}, {row['size_requested']}; "
                       f"measured {row['delta_hu']:+.0f} HU vs liver, {row['seconds']:.1f} s")  # fmt: skip
            png = write_preview(Path(tmp) / f"{k}.png", before, out["image"][0].numpy(), out["label"][0].numpy() == 2,
                                affine, organ="liver", caption=caption)  # fmt: skip
            with Image.open(png) as im:
                tiles.append(im.convert("RGB"))
    canvas = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)))
    y = 0
    for tile in tiles:
        canvas.paste(tile, (0, y))
        y += tile.height
    path = RESULTS / "rand_lesion.png"
    with atomic_path(path) as tmp_path:
        canvas.save(tmp_path, format="PNG")
    return path


def markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        "# RandLesionSynthesisd: seconds per lesion (fast mode, cpu preset, shipped weights)", "",
        f"Command: `{report['command']}`", "",
        f"Sample: `{report['sample']['ct']}` on RAS {report['sample']['spacing_mm']} mm, "
        f"{report['sample']['size']}^3 voxels around the liver. Settings: LMNet {s.get('mask_steps')} steps, "
        f"LINet {s.get('image_steps')} steps, guidance {s.get('image_guidance')}, "
        f"{s.get('calibration_rounds')} calibration round(s), LINet crop {s.get('crop_size')}. "
        f"Lesions: liver tumour, {s['distribution']['size_mm'][0]:.0f}-{s['distribution']['size_mm'][1]:.0f} mm, "
        "hypodense and hyperdense asked alternately.", "",
        f"Networks loaded in {report['network_load_s']} s; first (untimed) lesion {report['warmup_lesion_s']} s; "
        f"{report['torch_threads']} torch thread(s). Machine: {m['cpus']} CPUs, load average before "
        f"{m['load_before']}, after {m['load_after']} (other jobs inflate wall time: figures are upper bounds).",
        "",
        f"**Median {report['median_s_per_lesion']} s wall, {report['median_cpu_s_per_lesion']} s CPU per lesion** "
        f"over {len(report['lesions'])} lesions (target {report['target_s']} s: "
        f"{'met' if report['meets_target_wall'] else 'not met'} in wall time, "
        f"{'met' if report['meets_target_cpu'] else 'not met'} in CPU time); median wall split: "
        + ", ".join(f"{k} {v} s" for k, v in report["median_stages_s"].items())
        + f". Density direction as requested (core HU vs liver, beyond 10 HU): "
        f"{report['direction_match_rate'] * 100:.0f}% of lesions.", "",
        "| seed | wall s | CPU s | draw (LMNet) | inpaint (LINet) | rest | asked | measured | core HU | liver HU "
        "| size asked | voxels |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for r in report["lesions"]:
        if not r["written"]:
            lines.append(
                f"| {r['seed']} | {r['seconds']} | {r['cpu_seconds']} | not written (no place found) | | | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['seed']} | {r['seconds']} | {r['cpu_seconds']} | {r.get('draw', '-')} | {r.get('inpaint', '-')} "
            f"| {r['rest']} | "
            f"{r['requested_density']} | {r['measured_density']} | {r['core_hu']} | {r['organ_reference_hu']} | "
            f"{r['size_requested']} | {r['voxels']} |"
        )
    if report.get("preview"):
        lines += ["", f"![first lesions, W400/L40]({report['preview']})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lesions", type=int, default=7, help="timed lesions (the median is reported)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the machine is shared; 0: torch's default)"
    )
    ap.add_argument("--spacing", type=float, default=1.5, help="sample voxel size in mm")
    ap.add_argument("--size", type=int, default=96, help="sample edge in voxels")
    ap.add_argument("--steps", type=int, nargs=2, metavar=("MASK", "IMAGE"), help="override fast mode's steps")
    ap.add_argument("--preview", action="store_true", help="write rand_lesion.png (first two lesions, W400/L40)")
    ap.add_argument("--name", default="rand_lesion", help="report name in benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    before = snapshot()
    report = run(args)
    finish_report(args.name, __file__, report, before, args.threads, markdown)


if __name__ == "__main__":
    main()
