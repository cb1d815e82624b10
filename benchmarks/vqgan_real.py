"""Benchmark: how well the VQ-GAN reconstructs held-out REAL CT, inside organs and inside lesions.

For each case of a labelled datalist split (image, 0/1/2 label; e.g. the validation scans of
``lesiondiffusion make-dataset --source real``, which holds out whole scans), the case is brought to the
standardised grid (RAS, 1 mm, the HU map of ``lesiondiffusion.transforms``), the box around its organ
(label >= 1) grown by ``--context_mm`` is reconstructed tile by tile (``reconstruct_tiled``, the
inference config's sliding window), and the reconstruction is compared with the input:

- PSNR on the [0, 1] intensity map (peak 1) over the organ's voxels and over the lesion's voxels;
- SSIM (MONAI ``SSIMMetric``, 3D) over the organ box;
- mean absolute error in HU and the shift of the median HU, inside the lesion and inside the organ.

    python benchmarks/vqgan_real.py --datalist runs/real/datalist.json [--split validation] \
        [--weights bundles/vqgan/models/model.pt] [--name vqgan_real]

Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import REPO, finish_report, set_threads, snapshot


def standardised(image: str, label: str):
    """``(unit image, label)`` as ``[1, 1, *S]`` tensors on the 1 mm RAS grid."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    from lesiondiffusion.transforms import CTIntensityMap

    load = Compose([
        LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
        Orientationd(["image", "label"], "RAS"), Spacingd(["image", "label"], (1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
    ])  # fmt: skip
    d = load({"image": image, "label": label})
    return CTIntensityMap()(d["image"]).float()[None], d["label"].round()[None]


def organ_box(label, context: int):
    import torch

    idx = torch.nonzero(label[0, 0] >= 1)
    lo = (idx.min(0).values - context).clamp_min(0)
    hi = torch.minimum(idx.max(0).values + context + 1, torch.tensor(label.shape[2:]))
    return (slice(None), slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi)))


def psnr(a, b, mask) -> float | None:
    import math

    if not bool(mask.any()):
        return None
    mse = float(((a - b)[mask] ** 2).mean())
    return 99.0 if mse == 0 else 10 * math.log10(1.0 / mse)


def measure(case: dict, net, roi: int, context: int) -> dict:
    import torch
    from monai.metrics import SSIMMetric

    from lesiondiffusion.autoencoder import reconstruct_tiled
    from lesiondiffusion.transforms import unit_to_hu

    image, label = standardised(case["image"], case["label"])
    box = organ_box(label, context)
    x, lab = image[box], label[box]
    t0 = time.perf_counter()
    with torch.no_grad():
        y = reconstruct_tiled(net, x, roi).clamp(0, 1)
    seconds = time.perf_counter() - t0
    organ, lesion = lab >= 1, lab == 2
    hu_x, hu_y = unit_to_hu(x), unit_to_hu(y)
    out = {
        "case": Path(case["image"]).parent.name or Path(case["image"]).name,
        "box_voxels": list(x.shape[2:]),
        "seconds": round(seconds, 2),
        "psnr_organ_db": psnr(x, y, organ),
        "psnr_lesion_db": psnr(x, y, lesion),
        "ssim_organ_box": float(SSIMMetric(spatial_dims=3, data_range=1.0)(y, x).mean()),
        "mae_organ_hu": float((hu_x - hu_y).abs()[organ].mean()),
    }
    if bool(lesion.any()):
        out["mae_lesion_hu"] = float((hu_x - hu_y).abs()[lesion].mean())
        out["lesion_median_shift_hu"] = float(hu_y[lesion].median() - hu_x[lesion].median())
    return out


def summarise(cases: list[dict]) -> dict:
    keys = (
        "psnr_organ_db",
        "psnr_lesion_db",
        "ssim_organ_box",
        "mae_organ_hu",
        "mae_lesion_hu",
        "lesion_median_shift_hu",
    )
    return {k: statistics.median(v) for k in keys if (v := [c[k] for c in cases if c.get(k) is not None])}


def markdown(report: dict) -> str:
    rows = [
        "| case | box (voxels) | PSNR organ (dB) | PSNR lesion (dB) | SSIM organ box | MAE organ (HU) | MAE lesion (HU) | lesion median shift (HU) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt=".1f"):
        return "-" if v is None else format(v, fmt)

    for c in report["cases"]:
        rows.append(
            f"| {c['case']} | {'x'.join(map(str, c['box_voxels']))} | {f(c['psnr_organ_db'])} | {f(c['psnr_lesion_db'])} | "
            f"{f(c['ssim_organ_box'], '.3f')} | {f(c['mae_organ_hu'])} | {f(c.get('mae_lesion_hu'))} | {f(c.get('lesion_median_shift_hu'))} |"
        )
    m = report["median"]
    return "\n".join([
        f"# VQ-GAN reconstruction of held-out real CT ({report['weights']})",
        "",
        f"Split `{report['split']}` of `{report['datalist']}`: {len(report['cases'])} case(s); each organ box "
        f"(+{report['context_mm']} mm) reconstructed in {report['roi']}^3 tiles on the 1 mm grid.",
        "",
        *rows,
        "",
        "Medians: " + ", ".join(f"{k} {v:.3f}" if "ssim" in k else f"{k} {v:.1f}" for k, v in m.items()),
        "",
        f"Command: `{report['command']}`",
        "",
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datalist", required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--weights", default=str(REPO / "bundles" / "vqgan" / "models" / "model.pt"))
    p.add_argument("--preset", default="cpu")
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--context_mm", type=int, default=16)
    p.add_argument("--max_cases", type=int, default=0)
    p.add_argument("--name", default="vqgan_real")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    set_threads(args.threads)
    before = snapshot()

    from tqdm import tqdm

    from lesiondiffusion.autoencoder import load_vqvae
    from lesiondiffusion.dataset import read_datalist

    cases = [{"image": str(c.image), "label": str(c.label)} for c in read_datalist(args.datalist)[args.split]]
    if args.max_cases:
        cases = cases[: args.max_cases]
    net = load_vqvae(args.weights, args.preset)
    results = [measure(c, net, args.roi, args.context_mm) for c in tqdm(cases, desc="cases")]
    report = {
        "datalist": str(args.datalist), "split": args.split, "weights": str(args.weights), "roi": args.roi,
        "context_mm": args.context_mm, "cases": results, "median": summarise(results),
    }  # fmt: skip
    finish_report(args.name, __file__, report, before, args.threads, markdown)


if __name__ == "__main__":
    main()
