"""Benchmark: the LINet bundle's ``cpu`` preset (training speed, seconds per inpainted lesion, memory, FLOPs).

Networks are built from the bundle's own configs (``configs/train.json``, ``configs/inference.json``,
``--preset``) with random weights (a random ``cpu`` VQ-GAN too): speed and memory do not depend on
the weights' values. Data: the demo phantom cases at 1 mm.

- training: ``SupervisedTrainer`` iterations per second (first iteration excluded: it pays for lazy
  initialisation), batch size and crop of the preset, on 96^3 demo cases;
- inference: one lesion of the demo liver case painted into the whole 280^3 phantom CT at 10, 25 and 50
  DDIM steps (guidance on: each network call evaluates two passes, batched), with encode (the crop,
  the intensity prior and its calibration), sample, decode and paste timed separately, plus the whole
  case (reading, label maps, writing the CT and preview); network calls as the sampler counted them;
- peak memory: each part runs in its own child process; its peak RSS (and CUDA max allocated on GPU);
- FLOPs per UNet forward (``torch.utils.flop_counter.FlopCounterMode``, batch 1) on the preset's latent,
  and the achieved FLOP rate of a timed forward; also the ``paper`` preset's count (meta tensors, not run).

    python benchmarks/linet.py [--preset cpu] [--iterations 20] [--threads N] [--device cpu]

Writes ``benchmarks/results/linet.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    DEMO,
    REPO,
    RESULTS,
    bundle_parser,
    command_line,
    count_flops,
    cuda_peak_mib,
    finish_child,
    load_avg,
    peak_rss_mib,
    run_child,
    set_threads,
    time_iterations,
    write_report,
)

BUNDLE = REPO / "bundles" / "linet"
STEPS = (10, 25, 50)


def parser_for(config: str, overrides: dict[str, Any]):
    """A ``ConfigParser`` of one of the bundle's configs with command-line style overrides."""
    return bundle_parser(BUNDLE, config, overrides)


def random_vqgan(path: Path) -> Path:
    import torch

    from lesiondiffusion import autoencoder as ae

    torch.manual_seed(0)
    torch.save(ae.build_vqvae("cpu").state_dict(), path)
    return path


# ---- parts (each in its own process) ---------------------------------------------------------------
def part_train(work: Path, preset: str, iterations: int, device: str) -> dict[str, Any]:
    import torch

    from lesiondiffusion.demo import build_demo_cases

    demo = build_demo_cases(DEMO, work / "demo96", crop=96, overwrite=True)
    overrides = {
        "datalist": str(demo / "datalist.json"), "vqgan_weights": str(random_vqgan(work / "vqgan.pt")), "output_dir": str(work / "train"),
        "preset": preset, "iter_num": iterations + 1, "max_epochs": 1, "num_workers": 0, "device": device, "log_every": 1000,
    }  # fmt: skip
    parser = parser_for("train.json", overrides)
    trainer = parser.get_parsed_content("train#trainer")
    timing = time_iterations(trainer, sync=torch.cuda.synchronize if torch.device(device).type == "cuda" else None)
    return {
        "iterations_timed": timing["iterations"] - 1,
        "iterations_per_s": timing["iterations_per_s"],
        "seconds_per_iteration": timing["seconds_per_iteration"],
        "first_iteration_s": timing["first_iteration_s"],
        "run_wall_s": timing["run_wall_s"],
        "batch_size": parser.get_parsed_content("batch_size"),
        "crop_size": list(parser.get_parsed_content("crop_size")),
        "unet_parameters": sum(p.numel() for p in parser.get_parsed_content("network").unet.parameters()),
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": cuda_peak_mib(device),
    }


def build_case(work: Path) -> Path:
    """A manifest with the demo liver case: the whole 280^3 phantom CT as the user's scan, one lesion."""
    import nibabel as nib
    import numpy as np
    import torch
    from monai.data import MetaTensor

    from lesiondiffusion.demo import build_demo_cases
    from lesiondiffusion.geometry import record_geometry, standardise, write_geometry
    from lesiondiffusion.io import save_nifti
    from lesiondiffusion.manifest import CaseEntry, LesionEntry, Manifest, write_manifest
    from lesiondiffusion.placement import Box

    shared = work.parent / "demo_full"  # built once, shared by the inference parts
    if not (shared / "datalist.json").is_file():
        build_demo_cases(DEMO, shared, overwrite=True)
    demo = shared / "cases" / "Liver_cancer"
    img = nib.load(demo / "image.nii.gz")
    case = work / "case"
    std = standardise(
        MetaTensor(
            torch.as_tensor(np.asarray(img.dataobj), dtype=torch.float32)[None], affine=torch.as_tensor(img.affine)
        )
    )
    label_img = nib.load(demo / "label.nii.gz")
    label = standardise(
        MetaTensor(
            torch.as_tensor(np.asarray(label_img.dataobj), dtype=torch.float32)[None],
            affine=torch.as_tensor(img.affine),
        ),
        mode="nearest",
    )
    affine = np.asarray(std.affine, dtype=np.float64)
    label_std = np.asarray(label[0]).astype(np.uint8)
    image = save_nifti(case / "image.nii.gz", np.asarray(std[0]).astype(np.int16), affine)
    label_path = save_nifti(case / "label.nii.gz", label_std, affine, dtype=np.uint8)
    organ = save_nifti(case / "organ_seg.nii.gz", (label_std > 0).astype(np.uint8) * 5, affine, dtype=np.uint8)
    geometry = write_geometry(case / "geometry.json", record_geometry(demo / "image.nii.gz", affine, label_std.shape))
    idx = np.argwhere(label_std == 2)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    lesion = LesionEntry(
        5, "within the parenchymal organ", demo / "type.json", Box(tuple((lo + hi) // 2), tuple(hi - lo))
    )
    entry = CaseEntry("liver", source_image=demo / "image.nii.gz", geometry=geometry, image=image, organ_seg=organ, lesions=(lesion,),
                      label=label_path, label_original=demo / "label.nii.gz")  # fmt: skip
    return write_manifest(work / "manifest.json", Manifest((entry,)))


def part_infer(work: Path, preset: str, steps: int, device: str) -> dict[str, Any]:
    import torch

    manifest = build_case(work)
    vqgan = random_vqgan(work / "vqgan.pt")
    parser = parser_for(
        "inference.json", {"preset": preset, "steps": steps, "device": device, "vqgan_weights": str(vqgan)}
    )
    network = parser.get_parsed_content("network_def")
    torch.manual_seed(0)
    parser["network"] = network  # random weights: speed does not depend on their values
    inpainter = parser.get_parsed_content("inpainter")
    inpainter.sampler.progress = False
    from lesiondiffusion.io import read_stored

    inpaint = importlib.import_module("lesiondiffusion.pipelines.linet")
    case = inpaint.read_manifest(manifest).cases[0]
    times = []
    for repeat in range(2):  # the first pays for lazy initialisation; report the second
        calls, t0 = inpainter.sampler.network_calls, time.perf_counter()
        inpainter.process_case(case, work / f"out{repeat}")
        times.append(time.perf_counter() - t0)
    timing = inpainter.timings[-1]
    calls = inpainter.sampler.network_calls - calls  # counted by the sampler, for the one lesion
    return {
        "steps": steps,
        "network_calls": calls,
        "network_evaluations": calls * (2 if parser.get_parsed_content("guidance_scale") != 1.0 else 1),
        "encode_s": timing.encode,
        "sample_s": timing.sample,
        "decode_s": timing.decode,
        "paste_s": timing.paste,
        "lesion_s": timing.total,
        "case_s": times[-1],
        "first_case_s": times[0],
        "ct_shape": list(read_stored(case.source_image).raw.shape),
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": cuda_peak_mib(device),
    }


def part_flops(preset: str, device: str) -> dict[str, Any]:
    import torch

    from lesiondiffusion import autoencoder as ae

    out: dict[str, Any] = {}
    for name in (preset, "paper"):
        parser = parser_for("inference.json", {"preset": name})
        crop = parser.get_parsed_content("crop_size")
        latent = [c // ae.downsample_factor(name) for c in crop]
        run = name == preset
        dev = torch.device(device) if run else torch.device("meta")
        with dev:
            try:
                network = parser.get_parsed_content("network_def")
            except Exception as e:  # noqa: BLE001 - a count we cannot make is reported, not fatal
                out[name] = {"error": f"{type(e).__name__}: {e}"}
                continue
        network = network.eval()
        channels = parser.get_parsed_content("latent_channels")
        spec = network.encoder.spec
        x = torch.randn(1, channels, *latent, device=dev)
        extra = torch.cat(
            [torch.ones(1, 1, *latent, device=dev), torch.randn(1, channels, *latent, device=dev)], dim=1
        )  # mask, prior latent
        cond = torch.zeros(1, *spec.shape, device=dev)
        t = torch.full((1,), 500, device=dev, dtype=torch.long)
        try:
            with torch.no_grad():
                flops = count_flops(
                    lambda network=network, x=x, t=t, cond=cond, extra=extra: network(
                        x, timesteps=t, context=cond, extra=extra
                    )
                )
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        entry = {"latent": latent, "crop": list(crop), "flops_per_forward": flops,
                 "unet_parameters": sum(p.numel() for p in network.unet.parameters())}  # fmt: skip
        if run:
            with torch.no_grad():
                network(x, timesteps=t, context=cond, extra=extra)
                n, t0 = 5, time.perf_counter()
                for _ in range(n):
                    network(x, timesteps=t, context=cond, extra=extra)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                per = (time.perf_counter() - t0) / n
            entry["seconds_per_forward"] = per
            entry["achieved_gflop_per_s"] = entry["flops_per_forward"] / per / 1e9
        out[name] = entry
    return out


# ---- driver ----------------------------------------------------------------------------------------
def child(args: argparse.Namespace, part: str, **extra: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        cmd = ["--part", part, "--preset", args.preset, "--device", args.device, "--iterations", str(args.iterations), "--work", tmp,
               *[f"--{k}={v}" for k, v in extra.items()]]  # fmt: skip
        return run_child(__file__, cmd, threads=args.threads, work=tmp)


def markdown(report: dict[str, Any]) -> str:
    t, f = report["training"], report["flops"]
    lines = [
        "# LINet benchmark",
        "",
        f"Preset `{report['preset']}`, device `{report['device']}`, random weights (speed does not depend on their values).",
        f"Machine: {report['machine']['cpus']} CPUs shared with other jobs while this ran (busy: load average "
        f"{report['machine']['load_before']} before, {report['machine']['load_after']} after), {report['machine']['threads']} torch thread(s) per process. "
        "Figures on a busy shared machine are upper bounds; rerun on an idle one for clean numbers.",
        "",
        "## Training",
        "",
        f"`SupervisedTrainer`, batch {t['batch_size']}, crop {t['crop_size']}, UNet {t['unet_parameters'] / 1e6:.2f} M parameters, frozen VQ-GAN encoding on the fly.",
        "",
        "| iterations timed | iterations/s | s/iteration | first iteration (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|",
        f"| {t['iterations_timed']} | {t['iterations_per_s']:.3f} | {t['seconds_per_iteration']:.2f} | {t['first_iteration_s']:.1f} | {t['peak_rss_mib']:.0f} |",
        "",
        "## Inference: one lesion painted into the whole CT",
        "",
        f"CT {report['inference'][0]['ct_shape']} (int16, 1 mm, the demo liver phantom); DDIM with guidance (each network call, one per step, "
        "evaluates the conditional and the unconditional pass as a batch of two). 'encode' includes the intensity prior and its calibration "
        "(two encode-decode rounds).",
        "",
        "| steps | network calls (per-sample passes) | encode (s) | sample (s) | decode (s) | paste (s) | lesion total (s) | whole case (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["inference"]:
        lines.append(
            f"| {r['steps']} | {r.get('network_calls', '-')} ({r['network_evaluations']}) | {r['encode_s']:.2f} | {r['sample_s']:.2f} | {r['decode_s']:.2f} | {r['paste_s']:.2f} | "
            f"{r['lesion_s']:.2f} | {r['case_s']:.2f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += ["", "'whole case' adds reading the scan and label maps, writing the synthetic CT and the preview PNG (second of two runs "
              "in one process; the first pays for lazy initialisation). The first inference process also built the 280^3 demo phantom, "
              "which its peak RSS includes. Step counts run one after the other while the machine's load changed: compare "
              "sample times per network evaluation with care.", "", "## UNet FLOPs (batch 1)", "",
              "| preset | crop | latent | parameters (M) | GFLOP per forward | s per forward | achieved GFLOP/s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, e in f.items():
        if not isinstance(e, dict):
            continue
        if "error" in e:
            lines.append(f"| {name} | - | - | - | not counted ({e['error'][:80]}) | - | - |")
            continue
        sec = f"{e['seconds_per_forward']:.3f}" if "seconds_per_forward" in e else "not run"
        rate = f"{e['achieved_gflop_per_s']:.1f}" if "achieved_gflop_per_s" in e else "-"
        lines.append(
            f"| {name} | {e['crop']} | {e['latent']} | {e['unet_parameters'] / 1e6:.2f} | {e['flops_per_forward'] / 1e9:.2f} | {sec} | {rate} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS for the child processes (0: torch's default)"
    )
    ap.add_argument("--work", default=None)
    ap.add_argument("--markdown_only", action="store_true", help="rewrite linet.md from an existing linet.json")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=25, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        set_threads(args.threads)
        work = Path(args.work)
        if args.part == "train":
            result = part_train(work, args.preset, args.iterations, args.device)
        elif args.part == "infer":
            result = part_infer(work, args.preset, args.steps, args.device)
        else:
            result = part_flops(args.preset, args.device)
        finish_child(result, args.result, args.device)
        return

    if args.markdown_only:
        report = json.loads((RESULTS / "linet.json").read_text())
        write_report("linet", report, markdown(report))
        return
    Path(args.work or tempfile.gettempdir()).mkdir(parents=True, exist_ok=True)
    load_before = load_avg()
    flops = child(args, "flops")
    training = child(args, "train")
    inference = [child(args, "infer", steps=s) for s in STEPS]
    report = {
        "preset": args.preset,
        "device": args.device,
        "training": training,
        "inference": inference,
        "flops": flops,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": training["torch_threads"],
            "load_before": load_before,
            "load_after": load_avg(),
            "python": platform.python_version(),
        },  # fmt: skip
        "command": command_line(__file__),
    }
    write_report("linet", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
