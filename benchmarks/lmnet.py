"""Benchmark: the LMNet bundle's ``cpu`` preset (training speed, sampling time, memory, FLOPs).

Each measurement runs in its own child process (``common.run_child``) so that its peak resident memory is
its own, with ``--threads`` torch threads (default 1: the development machine is shared):

- ``network``: parameters and state-dict size of the preset's network (UNet + condition encoder), FLOPs
  of one forward at the preset's crop (``torch.utils.flop_counter``), and the forward's wall time, i.e.
  the FLOP rate reached (against this CPU's ~145 GFLOP/s fp32 on matrix products, docs/design.md section 8);
- ``train``: the bundle's own ``train.json`` (parsed with MONAI's ``ConfigParser``, the demo cases of
  ``data/demo`` as datalist, cached loading) runs ``--iters`` iterations; iterations/s are taken
  between the first and the last iteration (so the cache fill and the first, slower step are excluded);
- ``sample``: one lesion mask drawn by the inference config's sampler (DDIM, guidance scale 1: one
  network evaluation per step) at 10, 25 and 50 steps, plus the post-processing (threshold sweep,
  largest component) of the field; network weights are freshly initialised: timing does not depend on
  their values.

    python benchmarks/lmnet.py [--iters 6] [--steps 10 25 50] [--repeats 2] [--threads 1]

Writes ``benchmarks/results/lmnet.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import (
    CPU_GFLOPS,
    DEMO,
    REPO,
    best_time,
    bundle_parser,
    count_flops,
    finish_child,
    finish_report,
    flop_rate,
    machine_note,
    rewrite_markdown,
    run_child,
    set_threads,
    snapshot,
    state_dict_mb,
    time_iterations,
)  # fmt: skip

BUNDLE = REPO / "bundles" / "lmnet"


def parser_for(config: str, **overrides):
    """The bundle config ``config`` parsed with ``overrides`` (the bundle folder is the working directory)."""
    return bundle_parser(BUNDLE, config, overrides, chdir=True)


def network_phase(repeats: int) -> dict:
    import torch

    parser = parser_for("inference.json")
    net = parser.get_parsed_content("network_def").eval()
    crop = parser.get_parsed_content("crop_size")
    spec = net.encoder.spec
    torch.manual_seed(0)
    x = torch.randn(1, 1, *crop)
    extra = torch.rand(1, 3, *crop)
    t = torch.tensor([500])
    context = spec.encode({})[None]

    def forward() -> None:
        net(x, t, context=context, extra=extra)

    with torch.no_grad():
        flops = count_flops(forward)  # also the warm-up
        forward_s = best_time(forward, repeats)
    return {
        "crop": list(crop),
        "parameters": sum(p.numel() for p in net.parameters()),
        "unet_parameters": sum(p.numel() for p in net.unet.parameters()),
        "state_dict_mb": state_dict_mb(net),
        **flop_rate(flops, forward_s),
    }


def train_phase(iters: int) -> dict:
    from lesiondiffusion.demo import build_demo_cases

    with tempfile.TemporaryDirectory(prefix="bench-lmnet-") as tmp:
        demo = build_demo_cases(DEMO, Path(tmp) / "demo")
        parser = parser_for(
            "train.json",
            datalist=str(demo / "datalist.json"),
            output_dir=str(Path(tmp) / "out"),
            iter_num=iters,
            max_epochs=1,
        )
        parser["train#handlers"] = [h for h in parser["train#handlers"] if "ProgressBar" not in str(h)]
        parser.get_parsed_content("initialize")  # seeds, as a bundle run does
        t0 = time.perf_counter()
        trainer = parser.get_parsed_content("train#trainer")  # builds the cached dataset
        build_s = time.perf_counter() - t0
        timing = time_iterations(trainer)
        return {
            "cases": len(json.loads((demo / "datalist.json").read_text())["training"]),
            "batch_size": parser.get_parsed_content("batch_size"),
            "crop": parser.get_parsed_content("crop_size"),
            "spacing_mm": parser.get_parsed_content("spacing"),
            "iterations": timing["iterations"],
            "iterations_per_s": round(timing["iterations_per_s"], 3),
            "s_per_iteration": round(timing["seconds_per_iteration"], 2),
            "first_iteration_s": round(timing["first_iteration_s"], 2),
            "config_and_cache_s": round(build_s, 2),
        }


def sample_phase(steps: int) -> dict:
    import numpy as np
    import torch

    parser = parser_for("inference.json", steps=steps)
    parser["diffusion_sampler#progress"] = False
    net = parser.get_parsed_content("network_def").eval()
    sampler = parser.get_parsed_content("diffusion_sampler")
    crop = parser.get_parsed_content("crop_size")
    import lesiondiffusion.pipelines.mask_postprocess as post

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
    return {
        "steps": steps,
        "crop": list(crop),
        "network_evaluations": steps,
        "sample_s": round(sample_s, 2),
        "postprocess_s": round(post_s, 3),
    }


def markdown(report: dict) -> str:
    n, t = report["network"], report["training"]
    md = [
        "# LMNet benchmark (`cpu` preset)",
        "",
        f"Network: DiffusionModelUNet + `vocab` condition encoder, {n['parameters']:,} parameters "
        f"(UNet {n['unet_parameters']:,}), state dict {n['state_dict_mb']} MB; crop {n['crop']} working voxels. "
        "Freshly initialised weights: timing does not depend on their values.",
        "",
        "| measure | value | peak RSS (MiB) |",
        "|---|---|---|",
        f"| FLOPs per forward (batch 1, crop {n['crop']}) | {n['gflop_per_forward']} GFLOP | {n['peak_rss_mib']} |",
        f"| forward wall time (best of {report['repeats']}, {n['torch_threads']} thread(s)) | {n['forward_s']} s = "
        f"{n['achieved_gflops']} GFLOP/s, {n['fraction_of_cpu_rate'] * 100:.1f}% of the CPU's ~{CPU_GFLOPS:.0f} GFLOP/s | |",
        f"| training (batch {t['batch_size']}, crop {t['crop']} at {t['spacing_mm']} mm, {t['cases']} demo cases) | "
        f"{t['iterations_per_s']} it/s ({t['s_per_iteration']} s/it over {t['iterations'] - 1} intervals; first iteration "
        f"{t['first_iteration_s']} s; config + cached dataset build {t['config_and_cache_s']} s) | {t['peak_rss_mib']} |",
    ]  # fmt: skip
    for s in report["sampling"]:
        md.append(
            f"| one sampled mask, DDIM {s['steps']} steps ({s['network_evaluations']} network evaluations, crop {s.get('crop', n['crop'])}) | "
            f"{s['sample_s']} s ({s['sample_s'] / s['network_evaluations']:.2f} s per evaluation) + post-processing "
            f"{s['postprocess_s']} s | {s['peak_rss_mib']} |"
        )
    md += [
        "",
        "Each step count is its own process, run one after the other: where the machine's load changed between them, "
        "the seconds per network evaluation differ; compare them with the load in mind.",
        "",
        machine_note(report["machine"]),
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=6, help="training iterations timed (the first is excluded)")
    ap.add_argument("--steps", type=int, nargs="+", default=(10, 25, 50))
    ap.add_argument("--repeats", type=int, default=2, help="timed forwards for the FLOP rate (best kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement process (0: torch's default)")
    ap.add_argument("--markdown_only", action="store_true", help="rewrite lmnet.md from an existing lmnet.json")
    ap.add_argument("--phase", choices=("network", "train", "sample"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        set_threads(args.threads)
        phases = {
            "network": lambda: network_phase(args.repeats),
            "train": lambda: train_phase(args.iters),
            "sample": lambda: sample_phase(args.steps[0]),
        }
        finish_child(phases[args.phase](), args.result)
        return
    if args.markdown_only:
        rewrite_markdown("lmnet", markdown)
        return
    before = snapshot()
    report: dict = {"benchmark": "LMNet bundle, cpu preset", "repeats": args.repeats}
    report["network"] = run_child(
        __file__, ["--phase", "network", "--repeats", str(args.repeats)], threads=args.threads
    )
    print("network", report["network"], flush=True)
    report["training"] = run_child(__file__, ["--phase", "train", "--iters", str(args.iters)], threads=args.threads)
    print("training", report["training"], flush=True)
    report["sampling"] = []
    for steps in args.steps:
        report["sampling"].append(
            run_child(__file__, ["--phase", "sample", "--steps", str(steps)], threads=args.threads)
        )
        print("sampling", report["sampling"][-1], flush=True)
    finish_report("lmnet", __file__, report, before, args.threads, markdown)


if __name__ == "__main__":
    main()
