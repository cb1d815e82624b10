"""Benchmark: the LMNet bundle's ``cpu`` preset (training speed, sampling time, memory, FLOPs).

Each measurement runs in its own child process so that its peak resident memory is its own:

- ``network``: parameters and state-dict size of the preset's network (UNet + condition encoder), FLOPs
  of one forward at the preset's crop (``torch.utils.flop_counter``), and the forward's wall time, i.e.
  the FLOP rate reached (against this CPU's ~145 GFLOP/s fp32 on matrix products, SPEC section 8);
- ``train``: the bundle's own ``train.json`` (parsed with MONAI's ``ConfigParser``, the demo cases of
  ``shared/data/demo`` as datalist, cached loading) runs ``--iters`` iterations; iterations/s are taken
  between the first and the last iteration (so the cache fill and the first, slower step are excluded);
- ``sample``: one lesion mask drawn by the inference config's sampler (DDIM, guidance scale 1: one
  network evaluation per step) at 10, 25 and 50 steps, plus the post-processing (threshold sweep,
  largest component) of the field; network weights are freshly initialised: timing does not depend on
  their values.

    python benchmarks/lmnet.py [--iters 12] [--steps 10 25 50]

Writes ``benchmarks/results/lmnet.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "lmnet"
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO.parent / "shared" / "data" / "demo"
CPU_GFLOPS = 145.0  # this machine's fp32 matrix-product rate (2 cores), SPEC section 8


def parser_for(config: str, **overrides):
    """The bundle config ``config`` parsed with ``overrides`` (the bundle folder is the working directory)."""
    from monai.bundle import ConfigParser

    os.chdir(BUNDLE)
    sys.path.insert(0, str(BUNDLE))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / config))
    for k, v in overrides.items():
        parser[k] = v
    return parser


def network_phase() -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    parser = parser_for("inference.json")
    net = parser.get_parsed_content("network_def").eval()
    crop = parser.get_parsed_content("crop")
    spec = net.encoder.spec
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    torch.manual_seed(0)
    x = torch.randn(1, 1, *crop)
    extra = torch.rand(1, 3, *crop)
    t = torch.tensor([500])
    context = spec.encode({})[None]
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            net(x, t, context=context, extra=extra)
        flops = counter.get_total_flops()
        net(x, t, context=context, extra=extra)  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            net(x, t, context=context, extra=extra)
            times.append(time.perf_counter() - start)
    forward_s = min(times)
    return {
        "crop": list(crop),
        "parameters": sum(p.numel() for p in net.parameters()),
        "unet_parameters": sum(p.numel() for p in net.unet.parameters()),
        "state_dict_mb": round(buffer.getbuffer().nbytes / 1e6, 2),
        "gflop_per_forward": round(flops / 1e9, 2),
        "forward_s": round(forward_s, 3),
        "achieved_gflops": round(flops / 1e9 / forward_s, 1),
        "fraction_of_cpu_rate": round(flops / 1e9 / forward_s / CPU_GFLOPS, 3),
        "threads": torch.get_num_threads(),
    }


def train_phase(iters: int) -> dict:
    import torch
    from ignite.engine import Events

    from lesiondiffusion.demo import build_demo_cases

    with tempfile.TemporaryDirectory(prefix="bench-lmnet-") as tmp:
        demo = build_demo_cases(DEMO, Path(tmp) / "demo")
        parser = parser_for(
            "train.json", datalist=str(demo / "datalist.json"), output_dir=str(Path(tmp) / "out"), iter_num=iters, max_epochs=1
        )
        parser["train#handlers"] = [h for h in parser["train#handlers"] if "ProgressBar" not in str(h)]
        parser.get_parsed_content("initialize")  # seeds, as a bundle run does
        t0 = time.perf_counter()
        trainer = parser.get_parsed_content("train#trainer")  # builds the cached dataset
        build_s = time.perf_counter() - t0
        stamps: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
        start = time.perf_counter()
        trainer.run()
        first_s = stamps[0] - start
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        return {
            "cases": len(json.loads((demo / "datalist.json").read_text())["training"]),
            "batch_size": parser.get_parsed_content("batch_size"),
            "crop": parser.get_parsed_content("crop"),
            "spacing_mm": parser.get_parsed_content("spacing"),
            "iterations": len(stamps),
            "iterations_per_s": round(rate, 3),
            "s_per_iteration": round(1 / rate, 2),
            "first_iteration_s": round(first_s, 2),
            "config_and_cache_s": round(build_s, 2),
            "threads": torch.get_num_threads(),
        }


def sample_phase(steps: int) -> dict:
    import numpy as np
    import torch

    parser = parser_for("inference.json", steps=steps)
    parser["diffusion_sampler#progress"] = False
    net = parser.get_parsed_content("network_def").eval()
    sampler = parser.get_parsed_content("diffusion_sampler")
    crop = parser.get_parsed_content("crop")
    import scripts.postprocess as post

    extra = torch.zeros(1, 3, *crop)
    extra[:, 2, crop[0] // 4 : 3 * crop[0] // 4, crop[1] // 4 : 3 * crop[1] // 4, crop[2] // 4 : 3 * crop[2] // 4] = 1
    condition = net.encoder.spec.encode({})[None]
    start = time.perf_counter()
    with torch.no_grad():
        sample = sampler(net, (1, 1, *crop), condition=condition, extra=extra, seed=0)
    sample_s = time.perf_counter() - start
    start = time.perf_counter()
    allowed = np.ones(crop, bool)
    post.select_mask(sample[0, 0].numpy(), allowed, float(extra[0, 2].sum()) * post.ELLIPSOID_FILL, 8)
    post_s = time.perf_counter() - start
    return {"steps": steps, "network_evaluations": steps, "sample_s": round(sample_s, 2), "postprocess_s": round(post_s, 3)}


def child(args: list[str]) -> tuple[dict, float]:
    """Run this script's ``args`` phase in a child; its JSON answer and its peak RSS in MiB."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"benchmark phase {args} failed")
        out.seek(0)
        result = json.loads(out.read().strip().splitlines()[-1])
    return result, round(usage.ru_maxrss / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--steps", type=int, nargs="+", default=(10, 25, 50))
    ap.add_argument("--phase", choices=("network", "train", "sample"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        result = {"network": network_phase, "train": lambda: train_phase(args.iters), "sample": lambda: sample_phase(args.steps[0])}[args.phase]()
        print(json.dumps(result))
        return
    network, network_rss = child(["--phase", "network"])
    train, train_rss = child(["--phase", "train", "--iters", str(args.iters)])
    samples = []
    for steps in args.steps:
        s, rss = child(["--phase", "sample", "--steps", str(steps)])
        samples.append({**s, "peak_rss_mib": rss})
    result = {
        "benchmark": "LMNet bundle, cpu preset",
        "network": {**network, "peak_rss_mib": network_rss},
        "training": {**train, "peak_rss_mib": train_rss},
        "sampling": samples,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": [round(v, 2) for v in os.getloadavg()]},
        "command": "python benchmarks/lmnet.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lmnet.json").write_text(json.dumps(result, indent=2) + "\n")
    n, t = result["network"], result["training"]
    md = [
        "# LMNet benchmark (`cpu` preset)",
        "",
        f"Network: DiffusionModelUNet + `vocab` condition encoder, {n['parameters']:,} parameters "
        f"(UNet {n['unet_parameters']:,}), state dict {n['state_dict_mb']} MB; crop {n['crop']} working voxels.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| FLOPs per forward (batch 1, crop {n['crop']}) | {n['gflop_per_forward']} GFLOP |",
        f"| forward wall time (best of 5, {n['threads']} threads) | {n['forward_s']} s |",
        f"| FLOP rate reached | {n['achieved_gflops']} GFLOP/s = {n['fraction_of_cpu_rate'] * 100:.1f}% of ~{CPU_GFLOPS:.0f} GFLOP/s |",
        f"| training (batch {t['batch_size']}, crop {t['crop']} at {t['spacing_mm']} mm, {t['cases']} demo cases) | "
        f"{t['iterations_per_s']} it/s ({t['s_per_iteration']} s/it, {t['iterations']} iterations; first {t['first_iteration_s']} s) |",
        f"| training: config + cached dataset build | {t['config_and_cache_s']} s |",
        f"| training peak RSS | {t['peak_rss_mib']} MiB |",
    ]
    for s in samples:
        md.append(
            f"| one sampled mask, DDIM {s['steps']} steps ({s['network_evaluations']} network evaluations) | "
            f"{s['sample_s']} s + post-processing {s['postprocess_s']} s; peak RSS {s['peak_rss_mib']} MiB |"
        )
    md += [
        "",
        f"Machine: {os.cpu_count()} CPUs shared with other work while this ran (load average at the end "
        f"{result['machine']['load_avg']}), so the figures are upper bounds for an idle machine. "
        f"Command: `{result['command']}`.",
        "",
    ]
    (RESULTS / "lmnet.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
