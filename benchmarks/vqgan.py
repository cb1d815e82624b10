"""Benchmark: the VQ-GAN bundle's ``cpu`` preset (training speed, encode/decode time and memory, FLOPs).

Each measurement runs in its own child process so that its peak resident memory is its own:

- ``network``: parameters and state-dict size of the preset's VQVAE and PatchDiscriminator, FLOPs of one
  autoencoder forward on a training crop (``torch.utils.flop_counter``) and the FLOP rate it reaches;
- ``train``: the bundle's own ``train.json`` (parsed with MONAI's ``ConfigParser``, the demo cases of
  ``shared/data/demo`` at 1 mm as datalist, cached loading, no validation) runs ``--iters`` iterations,
  once before the adversarial warm-up ends (autoencoder step only) and once after (autoencoder +
  discriminator steps); iterations/s are taken between the first and the last iteration;
- ``crop``: encode + decode of one 64^3 crop (``lesiondiffusion.autoencoder.encode``/``decode``);
- ``volume``: a 280^3 volume reconstructed tile by tile (``reconstruct_tiled``, the inference config's
  sliding window: preset crop tiles, 25% overlap, gaussian blending).

Network weights are freshly initialised: timing does not depend on their values.

    python benchmarks/vqgan.py [--iters 8] [--volume 280]

Writes ``benchmarks/results/vqgan.{json,md}``.
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
BUNDLE = REPO / "bundles" / "vqgan"
RESULTS = REPO / "benchmarks" / "results"
DEMO = REPO.parent / "shared" / "data" / "demo"
CPU_GFLOPS = 145.0  # this machine's fp32 matrix-product rate (2 cores), SPEC section 8


def _size_mb(module) -> float:
    import torch

    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return round(buffer.getbuffer().nbytes / 1e6, 2)


def network_phase() -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lesiondiffusion import autoencoder as ae

    net = ae.build_vqvae("cpu").eval()
    disc = ae.build_discriminator("cpu").eval()
    crop = list(ae.PRESETS["cpu"]["crop_size"])
    x = torch.rand(1, 1, *crop)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            net(x)
        flops = counter.get_total_flops()
        net(x)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - start)
    forward_s = min(times)
    return {
        "crop": crop,
        "downsample_factor": ae.downsample_factor(net),
        "latent_shape": list(ae.latent_shape(crop, ae.downsample_factor(net))),
        "vqvae_parameters": sum(p.numel() for p in net.parameters()),
        "vqvae_state_dict_mb": _size_mb(net),
        "discriminator_parameters": sum(p.numel() for p in disc.parameters()),
        "discriminator_state_dict_mb": _size_mb(disc),
        "gflop_per_forward": round(flops / 1e9, 2),
        "forward_s": round(forward_s, 3),
        "achieved_gflops": round(flops / 1e9 / forward_s, 1),
        "fraction_of_cpu_rate": round(flops / 1e9 / forward_s / CPU_GFLOPS, 3),
        "threads": torch.get_num_threads(),
    }


def train_phase(iters: int, adversarial: bool) -> dict:
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    from lesiondiffusion.demo import build_demo_cases

    with tempfile.TemporaryDirectory(prefix="bench-vqgan-") as tmp:
        demo = build_demo_cases(DEMO, Path(tmp) / "demo")
        os.chdir(BUNDLE)
        sys.path.insert(0, str(BUNDLE))  # the bundle's scripts, as `monai.bundle run` finds them
        parser = ConfigParser(globals={"monai": "monai", "torch": "torch", "np": "numpy", "numpy": "numpy", "scripts": "scripts"})
        parser.read_config(str(BUNDLE / "configs" / "train.json"))
        overrides = {
            "bundle_root": str(BUNDLE), "datalist": str(demo / "datalist.json"), "output_dir": str(Path(tmp) / "out"),
            "iter_num": iters, "max_epochs": 1, "adv_start": 0 if adversarial else 10**9, "num_workers": 0,
            "progress": False, "val_interval": 10**9,
        }  # fmt: skip
        for k, v in overrides.items():
            parser[k] = v
        parser.get_parsed_content("initialize")
        t0 = time.perf_counter()
        trainer = parser.get_parsed_content("train#trainer")  # builds the cached dataset
        build_s = time.perf_counter() - t0
        stamps: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
        start = time.perf_counter()
        trainer.run()
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        return {
            "adversarial": adversarial,
            "batch_size": parser.get_parsed_content("batch_size"),
            "crop": parser.get_parsed_content("crop_size"),
            "iterations": len(stamps),
            "iterations_per_s": round(rate, 3),
            "s_per_iteration": round(1 / rate, 2),
            "first_iteration_s": round(stamps[0] - start, 2),
            "config_and_cache_s": round(build_s, 2),
        }


def crop_phase(size: int) -> dict:
    import torch

    from lesiondiffusion import autoencoder as ae

    net = ae.build_vqvae("cpu").eval()
    x = torch.rand(1, 1, size, size, size)
    with torch.no_grad():
        ae.decode(net, ae.encode(net, x), x.shape[2:])  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            z = ae.encode(net, x)
            y = ae.decode(net, z, x.shape[2:])
            times.append(time.perf_counter() - start)
    assert y.shape == x.shape
    return {"shape": [size] * 3, "latent_shape": list(z.shape[1:]), "encode_decode_s": round(min(times), 3)}


def volume_phase(size: int) -> dict:
    import torch

    from lesiondiffusion import autoencoder as ae

    net = ae.build_vqvae("cpu").eval()
    roi = list(ae.PRESETS["cpu"]["crop_size"])
    x = torch.rand(1, 1, size, size, size)
    start = time.perf_counter()
    with torch.no_grad():
        y = ae.reconstruct_tiled(net, x, roi_size=roi, overlap=0.25)
    seconds = time.perf_counter() - start
    assert y.shape == x.shape
    return {"shape": [size] * 3, "roi_size": roi, "overlap": 0.25, "encode_decode_s": round(seconds, 2)}


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
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--volume", type=int, default=280)
    ap.add_argument("--phase", choices=("network", "train", "train_adv", "crop", "volume"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        phases = {
            "network": network_phase,
            "train": lambda: train_phase(args.iters, adversarial=False),
            "train_adv": lambda: train_phase(args.iters, adversarial=True),
            "crop": lambda: crop_phase(args.crop),
            "volume": lambda: volume_phase(args.volume),
        }
        print(json.dumps(phases[args.phase]()))
        return
    results = {}
    for phase in ("network", "train", "train_adv", "crop", "volume"):
        value, rss = child(["--phase", phase, "--iters", str(args.iters), "--crop", str(args.crop), "--volume", str(args.volume)])
        results[phase] = {**value, "peak_rss_mib": rss}
        print(phase, results[phase], flush=True)
    result = {
        "benchmark": "VQ-GAN bundle, cpu preset",
        **results,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": [round(v, 2) for v in os.getloadavg()]},
        "command": "python benchmarks/vqgan.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vqgan.json").write_text(json.dumps(result, indent=2) + "\n")
    n, t, ta, c, v = (results[k] for k in ("network", "train", "train_adv", "crop", "volume"))
    md = [
        "# VQ-GAN benchmark (`cpu` preset)",
        "",
        f"VQVAE: {n['vqvae_parameters']:,} parameters, state dict {n['vqvae_state_dict_mb']} MB (the shipped `model.pt`); "
        f"x{n['downsample_factor']} downsampling, latent {n['latent_shape']} for a {n['crop']} crop. "
        f"PatchDiscriminator (training only): {n['discriminator_parameters']:,} parameters, {n['discriminator_state_dict_mb']} MB.",
        "",
        "| measure | value | peak RSS (MiB) |",
        "|---|---|---|",
        f"| FLOPs per autoencoder forward ({n['crop']} crop, batch 1) | {n['gflop_per_forward']} GFLOP; "
        f"{n['forward_s']} s = {n['achieved_gflops']} GFLOP/s ({n['fraction_of_cpu_rate'] * 100:.1f}% of ~{CPU_GFLOPS:.0f}) | {n['peak_rss_mib']} |",
        f"| training, autoencoder step only (batch {t['batch_size']}, {t['crop']} crops) | {t['iterations_per_s']} it/s "
        f"({t['s_per_iteration']} s/it, {t['iterations']} iterations; cache build {t['config_and_cache_s']} s) | {t['peak_rss_mib']} |",
        f"| training, autoencoder + discriminator steps (after `adv_start`) | {ta['iterations_per_s']} it/s "
        f"({ta['s_per_iteration']} s/it, {ta['iterations']} iterations) | {ta['peak_rss_mib']} |",
        f"| encode + decode, {c['shape']} crop (latent {c['latent_shape']}) | {c['encode_decode_s']} s | {c['peak_rss_mib']} |",
        f"| encode + decode, {v['shape']} volume, tiled ({v['roi_size']} tiles, overlap {v['overlap']}) | {v['encode_decode_s']} s | {v['peak_rss_mib']} |",
        "",
        f"Machine: {os.cpu_count()} CPUs shared with other work while this ran (load average at the end "
        f"{result['machine']['load_avg']}), so the figures are upper bounds for an idle machine. "
        f"Command: `{result['command']}`.",
        "",
    ]
    (RESULTS / "vqgan.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
