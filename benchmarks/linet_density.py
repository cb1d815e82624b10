"""Benchmark: does LINet paint the density it is asked for? (trained weights, ground-truth lesion masks)

LINet alone, without LMNet and without the paste-back: for each phantom case of a datalist split (whose
lesion masks are known), the lesion is painted three times into the case's own CT (standardised
grid), once per requested density class, with the CT value such a request gets (the organ's
reference HU plus the middle of the class's offset range of ``lesiondiffusion.phantom_dataset``, hypodense
never below its floor) and everything else of the case's true report kept. The painted lesion
replaces the mask's voxels and is measured as ``lesiondiffusion evaluate`` measures outputs
(``attributes.measure_lesion`` / ``density_class``): class accuracy, whether the three lesions' mean
HU follow hypo < iso < hyper, the error against the requested CT value, the lesion-minus-organ
difference per requested class. One run per guidance scale. As a baseline, the VQ-GAN alone renders
each true lesion (encode, decode): how far the autoencoder itself keeps the lesion's density.

    python benchmarks/linet_density.py --weights W --vqgan_weights V [--datalist D] [--split validation]
        [--cases 8] [--steps 25] [--guidance 1.0,2.0] [--name linet_density]

Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from common import REPO, bundle_parser, finish_report, set_threads, snapshot

BUNDLE = REPO / "bundles" / "linet"


def requested_ct_values(reference: float) -> dict[str, float]:
    """The CT value asked for per density class, as the phantom requests set it."""
    from lesiondiffusion.phantom_dataset import HYPO, HYPO_MIN_HU, OFFSET_HU, REQUEST_DENSITIES

    out = {}
    for density in REQUEST_DENSITIES:
        lo, hi = OFFSET_HU[density]
        value = reference + (lo + hi) / 2
        out[density] = max(value, HYPO_MIN_HU) if density == HYPO else value
    return out


def replace_lesion(image: Any, lesion: Any, patch: Any, start: Any) -> Any:
    """A copy of ``image`` whose ``lesion`` voxels come from ``patch``, a crop whose first voxel is ``start``."""
    out = image.copy()
    dst = tuple(slice(max(int(a), 0), min(int(a) + n, s)) for a, n, s in zip(start, patch.shape, image.shape))
    src = tuple(slice(d.start - int(a), d.stop - int(a)) for d, a in zip(dst, start))
    region, inside = out[dst], lesion[dst]
    region[inside] = patch[src][inside]
    return out


def paint(inpainter, image: Any, lesion: Any, attributes: dict[str, str], seed: int) -> Any:
    """The case's image (standardised grid, HU) with the lesion's voxels replaced by LINet's."""
    import numpy as np

    condition = inpainter.spec.encode(attributes)[None]
    patch, patch_affine, _ = inpainter.inpaint_lesion(image, np.eye(4), lesion, condition, seed)
    return replace_lesion(image, lesion, patch, np.rint(patch_affine[:3, 3]).astype(int))


def round_trip(inpainter, image: Any, lesion: Any) -> Any:
    """The case's image with the lesion's voxels replaced by their VQ-GAN reconstruction (encode, decode).

    What a perfect LINet could at best return: the autoencoder's own rendering of the true lesion.
    """
    import numpy as np
    import torch

    from lesiondiffusion import autoencoder as ae
    from lesiondiffusion.pipelines.linet import crop_padded, crop_window

    start, size = crop_window(lesion, inpainter.crop_size, 8, inpainter.multiple)
    unit = torch.as_tensor(inpainter.to_unit(crop_padded(image, start, size, fill=-1000.0)))[None, None].float()
    decoded = np.asarray(inpainter.to_hu(ae.reconstruct(inpainter.autoencoder, unit)[0, 0].numpy()))
    return replace_lesion(image, lesion, decoded, start)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from monai.transforms import Compose, LoadImaged, Orientationd, Spacingd

    from lesiondiffusion import attributes as A
    from lesiondiffusion import autoencoder as ae
    from lesiondiffusion import vocabulary as V
    from lesiondiffusion.dataset import read_datalist
    from lesiondiffusion.diffusion import DiffusionSampler
    from lesiondiffusion.labels import label_table
    from lesiondiffusion.networks.weights import load_weights
    from lesiondiffusion.report import format_ct_value, read_report
    from lesiondiffusion.reports import extraction

    parser = bundle_parser(BUNDLE, "inference.json", {"preset": args.preset})
    from lesiondiffusion.pipelines.linet import LesionInpainter

    network = load_weights(parser.get_parsed_content("network_def"), args.weights)
    vq = ae.load_vqvae(args.vqgan_weights, preset=args.preset)
    prediction_type = args.prediction_type or parser["prediction_type"]
    keys = ["image", "label", "organ_seg"]
    load = Compose([
        LoadImaged(keys, image_only=True, ensure_channel_first=True), Orientationd(keys, "RAS"),
        Spacingd(keys, (1.0, 1.0, 1.0), mode=["bilinear", "nearest", "nearest"]),
    ])  # fmt: skip
    cases = [c.to_dict() for c in read_datalist(args.datalist)[args.split]][: args.cases]

    def read(case: dict[str, str]) -> tuple[Any, Any, Any, Any, str, float]:
        d = load({k: case[k] for k in keys})
        image = d["image"][0].numpy().astype(np.float32)
        label = np.rint(d["label"][0].numpy()).astype(np.uint8)
        seg = np.rint(d["organ_seg"][0].numpy()).astype(np.int32)
        report = read_report(case["report"]).lesions[0]
        return (
            image,
            label,
            seg,
            report,
            label_table().name(report.organ_id),
            extraction.measure_lesion(image, label, seg, organ_id=report.organ_id),
        )

    # the autoencoder alone, on the true lesions: the best any LINet on these weights could do
    baseline = []
    probe = LesionInpainter(
        network, vq, DiffusionSampler("ddim", 1, progress=False), crop_size=parser.get_parsed_content("crop_size")
    )
    for case in cases:
        image, label, seg, report, organ, truth = read(case)
        m = extraction.measure_lesion(round_trip(probe, image, label == 2), label, seg, organ_id=report.organ_id)
        true_class = extraction.density_class(truth, organ, truth.smoothed_std_hu <= A.HOMOGENEOUS_MAX_STD_HU)
        baseline.append({
            "case": Path(case["report"]).parent.name, "organ": organ, "true": true_class,
            "measured": extraction.density_class(m, organ, m.smoothed_std_hu <= A.HOMOGENEOUS_MAX_STD_HU),
            "true_core_hu": round(truth.core_hu, 1), "core_hu_error": round(m.core_hu - truth.core_hu, 1),
        })  # fmt: skip
    runs = []
    for guidance in args.guidance:
        sampler = DiffusionSampler(
            "ddim",
            args.steps,
            prediction_type=prediction_type,
            guidance_scale=guidance,
            clip_sample=False,
            progress=False,
        )
        inpainter = LesionInpainter(
            network, vq, sampler, crop_size=parser.get_parsed_content("crop_size"), seed=args.seed
        )
        rows, t0 = [], time.perf_counter()
        for case in cases:
            image, label, seg, report, organ, truth = read(case)
            reference = truth.reference_hu
            for density, hu in requested_ct_values(reference).items():
                attributes = {
                    **report.attributes,
                    V.DENSITY: density,
                    V.DENSITY_VARIATIONS: "homogeneous",
                    V.CT_VALUE: format_ct_value(hu),
                }
                painted = paint(inpainter, image, label == 2, attributes, args.seed)
                m = extraction.measure_lesion(painted, label, seg, organ_id=report.organ_id)
                measured = extraction.density_class(m, organ, m.smoothed_std_hu <= A.HOMOGENEOUS_MAX_STD_HU)
                rows.append({
                    "case": Path(case["report"]).parent.name, "organ": organ, "requested": density, "measured": measured,
                    "requested_hu": round(hu, 1), "mean_hu": round(m.mean_hu, 1), "delta_hu": round(m.core_hu - reference, 1),
                    "requested_delta_hu": round(hu - reference, 1), "smoothed_std_hu": round(m.smoothed_std_hu, 1),
                })  # fmt: skip
        runs.append(
            {
                "guidance_scale": guidance,
                "seconds": round(time.perf_counter() - t0, 1),
                "lesions": rows,
                "totals": totals(rows),
            }
        )
    return {
        "weights": str(Path(args.weights).resolve()), "vqgan_weights": str(Path(args.vqgan_weights).resolve()),
        "datalist": str(Path(args.datalist).resolve()), "split": args.split, "cases": len(cases), "steps": args.steps,
        "sampler": "ddim", "prediction_type": prediction_type, "preset": args.preset, "runs": runs,
        "vqgan_round_trip": {
            "lesions": baseline,
            "class_kept": sum(b["measured"] == b["true"] for b in baseline) / len(baseline),
            "median_abs_core_hu_error": round(statistics.median(abs(b["core_hu_error"]) for b in baseline), 1),
            "mean_core_hu_error": round(statistics.fmean(b["core_hu_error"] for b in baseline), 1),
        },
    }  # fmt: skip


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Class accuracy, ordered triples, CT-value error and the mean lesion-minus-organ HU per class."""
    triples = [rows[i : i + 3] for i in range(0, len(rows), 3)]
    per_class = {}
    for density in dict.fromkeys(r["requested"] for r in rows):
        mine = [r for r in rows if r["requested"] == density]
        per_class[density] = {
            "accuracy": sum(r["measured"] == density for r in mine) / len(mine),
            "mean_delta_hu": round(statistics.fmean(r["delta_hu"] for r in mine), 1),
            "mean_requested_delta_hu": round(statistics.fmean(r["requested_delta_hu"] for r in mine), 1),
        }
    return {
        "density_accuracy": sum(r["measured"] == r["requested"] for r in rows) / len(rows),
        "ordered_triples": sum(a["mean_hu"] < b["mean_hu"] < c["mean_hu"] for a, b, c in triples) / len(triples),
        "median_abs_ct_value_error_hu": round(
            statistics.median(abs(r["mean_hu"] - r["requested_hu"]) for r in rows), 1
        ),
        "per_class": per_class,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# LINet density response (ground-truth masks)", "",
        f"Weights `{report['weights']}` with VQ-GAN `{report['vqgan_weights']}`; {report['cases']} cases of the "
        f"`{report['split']}` split of `{report['datalist']}`, each painted as hypo-, iso- and hyperdense; DDIM "
        f"{report['steps']} steps, `{report['prediction_type']}`, preset `{report['preset']}`.", "",
        "| guidance | density accuracy | hypo < iso < hyper | median CT-value error | lesion - organ HU per class (requested) | seconds |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in report["runs"]:
        t = r["totals"]
        per = "; ".join(
            f"{k.split()[0]} {v['mean_delta_hu']:+.1f} ({v['mean_requested_delta_hu']:+.1f})"
            for k, v in t["per_class"].items()
        )
        lines.append(
            f"| {r['guidance_scale']:g} | {t['density_accuracy']:.1%} | {t['ordered_triples']:.1%} | {t['median_abs_ct_value_error_hu']:.1f} HU | {per} | {r['seconds']:.0f} |"
        )
    rt = report["vqgan_round_trip"]
    lines += [
        "", f"VQ-GAN round trip of the true lesions (encode, decode; what a perfect LINet could return at best): "
        f"density class kept in {rt['class_kept']:.1%}, core HU error median |{rt['median_abs_core_hu_error']:.1f}| HU, "
        f"mean {rt['mean_core_hu_error']:+.1f} HU.",
    ]  # fmt: skip
    best = max(report["runs"], key=lambda r: r["totals"]["density_accuracy"])
    lines += [
        "",
        f"## Lesions at guidance {best['guidance_scale']:g}",
        "",
        "| case | organ | requested | measured | requested HU | mean HU | lesion - organ HU |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in best["lesions"]:
        lines.append(
            f"| {row['case']} | {row['organ']} | {row['requested']} | {row['measured']} | {row['requested_hu']:.0f} | {row['mean_hu']:.0f} | {row['delta_hu']:+.1f} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--vqgan_weights", required=True)
    p.add_argument("--datalist", default=str(REPO / "runs" / "phantom_train" / "datalist.json"))
    p.add_argument("--split", default="validation")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 2.0])
    p.add_argument("--prediction_type", default=None)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="linet_density")
    args = p.parse_args()
    set_threads(args.threads)
    before = snapshot()
    finish_report(args.name, __file__, run(args), before, args.threads, markdown)


if __name__ == "__main__":
    main()
