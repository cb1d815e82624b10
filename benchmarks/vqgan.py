"""Benchmark: the VQ-GAN bundle's ``cpu`` preset (training speed, encode/decode time and memory, FLOPs).

Each measurement runs in its own child process (``common.run_child``) so that its peak resident memory is
its own, with ``--threads`` torch threads (default 1: the development machine is shared):

- ``network``: parameters and state-dict size of the preset's VQVAE and PatchDiscriminator, FLOPs of one
  autoencoder forward on a training crop (``torch.utils.flop_counter``) and the FLOP rate it reaches;
- ``train``: the bundle's own ``train.json`` (parsed with MONAI's ``ConfigParser``, the demo cases of
  ``data/demo`` at 1 mm as datalist, cached loading, no validation) runs ``--iters`` iterations,
  once before the adversarial warm-up ends (autoencoder step only) and once after (autoencoder +
  discriminator steps); iterations/s are taken between the first and the last iteration;
- ``crop``: encode + decode of one 64^3 crop (``lesiondiffusion.autoencoder.encode``/``decode``);
- ``volume``: a 280^3 volume reconstructed tile by tile (``reconstruct_tiled``, the inference config's
  sliding window: preset crop tiles, 25% overlap, gaussian blending).

Network weights are freshly initialised: timing does not depend on their values.

    python benchmarks/vqgan.py [--iters 6] [--volume 280] [--repeats 2] [--threads 1]

Writes ``benchmarks/results/vqgan.{json,md}``.
"""

from __future__ import annotations

import argparse
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

BUNDLE = REPO / "bundles" / "vqgan"
PHASES = ("network", "train", "train_adv", "crop", "volume")


def network_phase(repeats: int) -> dict:
    import torch

    from lesiondiffusion import autoencoder as ae

    net = ae.build_vqvae("cpu").eval()
    disc = ae.build_discriminator("cpu").eval()
    crop = list(ae.preset_config("cpu")["crop_size"])
    x = torch.rand(1, 1, *crop)
    with torch.no_grad():
        flops = count_flops(lambda: net(x))  # also the warm-up
        forward_s = best_time(lambda: net(x), repeats)
    return {
        "crop": crop,
        "downsample_factor": ae.downsample_factor(net),
        "latent_shape": list(ae.latent_shape(crop, ae.downsample_factor(net))),
        "vqvae_parameters": sum(p.numel() for p in net.parameters()),
        "vqvae_state_dict_mb": state_dict_mb(net),
        "discriminator_parameters": sum(p.numel() for p in disc.parameters()),
        "discriminator_state_dict_mb": state_dict_mb(disc),
        **flop_rate(flops, forward_s),
    }


def train_phase(iters: int, adversarial: bool) -> dict:
    from lesiondiffusion.demo import build_demo_cases

    with tempfile.TemporaryDirectory(prefix="bench-vqgan-") as tmp:
        demo = build_demo_cases(DEMO, Path(tmp) / "demo")
        overrides = {
            "datalist": str(demo / "datalist.json"), "output_dir": str(Path(tmp) / "out"),
            "iter_num": iters, "max_epochs": 1, "adv_start": 0 if adversarial else 10**9, "num_workers": 0,
            "progress": False, "val_interval": 10**9,
        }  # fmt: skip
        globals_ = {"monai": "monai", "torch": "torch", "np": "numpy", "numpy": "numpy"}
        parser = bundle_parser(BUNDLE, "train.json", overrides, chdir=True, globals=globals_)
        parser.get_parsed_content("initialize")
        t0 = time.perf_counter()
        trainer = parser.get_parsed_content("train#trainer")  # builds the cached dataset
        build_s = time.perf_counter() - t0
        timing = time_iterations(trainer)
        return {
            "adversarial": adversarial,
            "batch_size": parser.get_parsed_content("batch_size"),
            "crop": parser.get_parsed_content("crop_size"),
            "iterations": timing["iterations"],
            "iterations_per_s": round(timing["iterations_per_s"], 3),
            "s_per_iteration": round(timing["seconds_per_iteration"], 2),
            "first_iteration_s": round(timing["first_iteration_s"], 2),
            "config_and_cache_s": round(build_s, 2),
        }


def crop_phase(size: int, repeats: int) -> dict:
    import torch

    from lesiondiffusion import autoencoder as ae

    net = ae.build_vqvae("cpu").eval()
    x = torch.rand(1, 1, size, size, size)
    out = {}

    def round_trip() -> None:
        out["z"] = ae.encode(net, x)
        out["y"] = ae.decode(net, out["z"], x.shape[2:])

    with torch.no_grad():
        seconds = best_time(round_trip, repeats, warmup=1)
    assert out["y"].shape == x.shape
    return {
        "shape": [size] * 3,
        "latent_shape": list(out["z"].shape[1:]),
        "encode_decode_s": round(seconds, 3),
        "repeats": repeats,
    }


def volume_phase(size: int) -> dict:
    import torch

    from lesiondiffusion import autoencoder as ae

    net = ae.build_vqvae("cpu").eval()
    roi = list(ae.preset_config("cpu")["crop_size"])
    x = torch.rand(1, 1, size, size, size)
    start = time.perf_counter()
    with torch.no_grad():
        y = ae.reconstruct_tiled(net, x, roi_size=roi, overlap=0.25)
    seconds = time.perf_counter() - start
    assert y.shape == x.shape
    return {"shape": [size] * 3, "roi_size": roi, "overlap": 0.25, "encode_decode_s": round(seconds, 2)}


def markdown(report: dict) -> str:
    n, t, ta, c, v = (report[k] for k in PHASES)
    return "\n".join([
        "# VQ-GAN benchmark (`cpu` preset)",
        "",
        f"VQVAE: {n['vqvae_parameters']:,} parameters, state dict {n['vqvae_state_dict_mb']} MB (the shipped `model.pt`); "
        f"x{n['downsample_factor']} downsampling, latent {n['latent_shape']} for a {n['crop']} crop. "
        f"PatchDiscriminator (training only): {n['discriminator_parameters']:,} parameters, {n['discriminator_state_dict_mb']} MB. "
        "Freshly initialised weights: timing does not depend on their values.",
        "",
        "| measure | value | peak RSS (MiB) |",
        "|---|---|---|",
        f"| FLOPs per autoencoder forward ({n['crop']} crop, batch 1) | {n['gflop_per_forward']} GFLOP; best of {report['repeats']}: "
        f"{n['forward_s']} s = {n['achieved_gflops']} GFLOP/s ({n['fraction_of_cpu_rate'] * 100:.1f}% of ~{CPU_GFLOPS:.0f}) | {n['peak_rss_mib']} |",
        f"| training, autoencoder step only (batch {t['batch_size']}, {t['crop']} crops) | {t['iterations_per_s']} it/s "
        f"({t['s_per_iteration']} s/it over {t['iterations'] - 1} intervals; first iteration {t['first_iteration_s']} s; "
        f"config + cache build {t['config_and_cache_s']} s) | {t['peak_rss_mib']} |",
        f"| training, autoencoder + discriminator steps (after `adv_start`) | {ta['iterations_per_s']} it/s "
        f"({ta['s_per_iteration']} s/it over {ta['iterations'] - 1} intervals; first iteration {ta['first_iteration_s']} s) | {ta['peak_rss_mib']} |",
        f"| encode + decode, {c['shape']} crop (latent {c['latent_shape']}), best of {c['repeats']} | {c['encode_decode_s']} s | {c['peak_rss_mib']} |",
        f"| encode + decode, {v['shape']} volume, tiled ({v['roi_size']} tiles, overlap {v['overlap']}, gaussian blending) | "
        f"{v['encode_decode_s']} s | {v['peak_rss_mib']} |",
        "",
        machine_note(report["machine"]),
        "",
        f"Command: `{report['command']}`",
        "",
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=6, help="training iterations per training measurement")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--volume", type=int, default=280)
    ap.add_argument(
        "--repeats", type=int, default=2, help="timed repetitions of the forward and the crop round trip (best kept)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per measurement process (0: torch's default)")
    ap.add_argument("--markdown_only", action="store_true", help="rewrite vqgan.md from an existing vqgan.json")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        set_threads(args.threads)
        phases = {
            "network": lambda: network_phase(args.repeats),
            "train": lambda: train_phase(args.iters, adversarial=False),
            "train_adv": lambda: train_phase(args.iters, adversarial=True),
            "crop": lambda: crop_phase(args.crop, args.repeats),
            "volume": lambda: volume_phase(args.volume),
        }
        finish_child(phases[args.phase](), args.result)
        return
    if args.markdown_only:
        rewrite_markdown("vqgan", markdown)
        return
    before = snapshot()
    report: dict = {"benchmark": "VQ-GAN bundle, cpu preset", "repeats": args.repeats}
    common = [
        "--iters",
        str(args.iters),
        "--crop",
        str(args.crop),
        "--volume",
        str(args.volume),
        "--repeats",
        str(args.repeats),
    ]
    for phase in PHASES:
        report[phase] = run_child(__file__, ["--phase", phase, *common], threads=args.threads)
        print(phase, report[phase], flush=True)
    finish_report("vqgan", __file__, report, before, args.threads, markdown)


if __name__ == "__main__":
    main()
