"""``lesiondiffusion downstream``: what synthetic lesions are worth to a lesion-segmentation network.

One organ's lesions (liver first) are segmented by the same small MONAI ``BasicUNet``, trained with the
same iterations and seeds in four arms:

1. ``real``: the few labelled training scans only;
2. ``offline``: plus a fixed synthetic set made beforehand by ``lesiondiffusion synthesize`` on those scans;
3. ``online``: plus online synthesis, :class:`lesiondiffusion.augment.RandLesionSynthesisd` (fast mode);
4. ``flat``: plus the flat-fill baseline (the same transform, LMNet's masks filled at the report's CT value).

Test sets, reported apart: the held-out scans of a real-CT dataset (``make-dataset --source real``: lesions
of known attributes written into real CT by parametric shapes, not by this project's networks) and the
held-out (validation) cases of a phantom dataset (``make-dataset``). Every scan is brought to RAS at
``spacing`` mm and cropped to ``crop`` voxels around the organ. Per scan: Dice, normalised surface Dice
(MONAI ``SurfaceDiceMetric``, ``nsd_tolerance_mm``), lesion-wise sensitivity by equivalent diameter
(< 20 mm, >= 20 mm) and false-positive components. Mean +- std over seeds; an arm's gain over arm 1 counts
only when it exceeds the larger of the two arms' seed spreads.

Writes ``<out>/downstream.json``, ``downstream.md`` and ``downstream_dsc.png`` (DSC against iterations per arm).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import atomic_path, save_nifti, user_path, write_json
from lesiondiffusion.labels import label_table, to_v1_map

logger = logging.getLogger(__name__)

ARMS = ("real", "offline", "online", "flat")
SIZE_SPLIT_MM = 20.0
PRESETS = {
    # CPU: small crops, a small network, a few hundred iterations at most (design: <= 2 h in all)
    "cpu": {"crop": 64, "patch": 48, "spacing": 2.0, "features": (8, 8, 16, 32, 64, 8), "batch": 2, "iterations": 400,
            "eval_every": 100, "seeds": 3, "online_prob": 0.25, "offline_per_case": 2, "hu_shift": 60.0},
    "gpu": {"crop": 96, "patch": 96, "spacing": 1.5, "features": (16, 16, 32, 64, 128, 16), "batch": 4,
            "iterations": 2000,
            "eval_every": 200, "seeds": 3, "online_prob": 0.5, "offline_per_case": 8, "hu_shift": 60.0},
}  # fmt: skip


# ---- data -----------------------------------------------------------------------------------------------
def _datalist(path: Path) -> tuple[dict[str, Any], Path]:
    file = path / "datalist.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(path, "no datalist.json here (make one with lesiondiffusion make-dataset)")
    try:
        return json.loads(file.read_text()), file.parent
    except json.JSONDecodeError as e:
        raise InputError(file, f"not JSON ({e.msg})", e.lineno) from None


def organ_cases(dataset: Path, split: str, organ: str) -> list[dict[str, str]]:
    """Cases of ``split`` ("training" / "validation") whose lesion lies in ``organ`` (their report says so)."""
    data, root = _datalist(dataset)
    version = data.get("organ_seg_version", "v1")
    organ_id = label_table(version).id(organ)
    out = []
    for entry in data.get(split, []):
        report = json.loads((root / entry["report"]).read_text())
        if str(organ_id) in report:
            out.append({k: str(root / entry[k]) for k in ("image", "label", "organ_seg")} | {"version": version})
    return out


def load_case(case: dict[str, str], organ: str, spacing: float, crop: int) -> dict[str, torch.Tensor]:
    """One scan on RAS ``spacing`` mm, cropped to ``crop``^3 around the organ: image (HU), lesion (0/1) and
    the organ map (v1 ids); the label map becomes 0 background, 1 organ, 2 lesion."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    keys = ["image", "label", "organ_seg"]
    load = Compose([
        LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, "RAS"),
        Spacingd(keys, (spacing,) * 3, mode=("bilinear", "nearest", "nearest")),
    ])  # fmt: skip
    d = load({k: case[k] for k in keys})
    seg = torch.as_tensor(to_v1_map(np.rint(d["organ_seg"][0].numpy()).astype(np.int32), case["version"]))[None]
    organ_mask = seg == label_table("v1").id(organ)
    if not organ_mask.any():
        raise InputError(case["organ_seg"], f"no {organ} in the organ map")
    idx = torch.nonzero(organ_mask[0])
    centre = ((idx.min(0).values + idx.max(0).values) // 2).tolist()
    from monai.transforms import SpatialCropd, SpatialPadd

    d["organ_seg"] = d["organ_seg"].clone()
    d["organ_seg"][0] = seg[0].to(d["organ_seg"].dtype)
    cut = Compose(
        [SpatialCropd(keys, roi_center=centre, roi_size=(crop,) * 3), SpatialPadd(keys, (crop,) * 3, mode="edge")]
    )
    d = cut(d)
    label = torch.round(d["label"]).to(torch.uint8)
    d["label"] = label
    return d


# ---- offline synthetic set (lesiondiffusion synthesize) ------------------------------------------------
def offline_set(
    train: list[dict[str, torch.Tensor]], work: Path, organ: str, per_case: int, seed: int, distribution: dict[str, Any]
) -> list[dict[str, torch.Tensor]]:
    """``per_case`` synthetic copies of each training crop, made by the ``synthesize`` command."""
    folder = work / "offline_inputs"
    rng = np.random.RandomState(seed)
    requests = []
    for i, d in enumerate(train):
        affine = d["image"].affine.numpy()
        img = save_nifti(folder / f"case{i}_image.nii.gz", d["image"][0].numpy().astype(np.float32), affine)
        seg = save_nifti(
            folder / f"case{i}_seg.nii.gz", d["organ_seg"][0].numpy().astype(np.uint8), affine, dtype=np.uint8
        )
        for k in range(per_case):
            lo, hi = distribution["size_mm"]
            attrs = {"organ type": organ, "lesion type": str(rng.choice(distribution["lesion_types"])),
                     "size": f"{rng.uniform(lo, hi):.0f} mm"}  # fmt: skip
            requests.append({"case": f"case{i}_{k}", "image": img.name, "organ_seg": seg.name, "attributes": attrs})
    write_json(folder / "requests.json", {"organ_seg_version": "v1", "requests": requests})
    out = work / "offline"
    cmd = [sys.executable, "-m", "lesiondiffusion_tools.cli", "synthesize", "--requests", str(folder / "requests.json"),
           "--out", str(out), "--seed", str(seed), "--overwrite", "true"]  # fmt: skip
    logger.info("offline set: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        logger.warning(
            "synthesize exit %d for the offline set: %s", proc.returncode, proc.stderr.strip().splitlines()[-1:]
        )
    samples = []
    import nibabel as nib
    from monai.data import MetaTensor

    for r in requests:
        case_dir = out / r["case"]
        if not (case_dir / "image.nii.gz").is_file():
            logger.warning("offline case %s failed; left out", r["case"])
            continue
        base = train[int(r["case"].split("_")[0][4:])]
        image = np.asarray(nib.load(case_dir / "image.nii.gz").dataobj, dtype=np.float32)
        new = np.asarray(nib.load(case_dir / "label.nii.gz").dataobj) == 2
        label = base["label"].clone()
        label[0][torch.as_tensor(new)] = 2
        samples.append({"image": MetaTensor(torch.as_tensor(image)[None], meta=base["image"].meta), "label": label,
                        "organ_seg": base["organ_seg"]})  # fmt: skip
    return samples


def offline_set_in_process(
    train: list[dict[str, torch.Tensor]], per_case: int, seed: int, distribution: dict[str, Any]
) -> list[dict[str, torch.Tensor]]:
    """The fixed synthetic set made in this process by the same chain at the bundles' full settings (25 steps,
    guidance): used when ``synthesize`` made no case, and said so in the report."""
    from lesiondiffusion.augment import RandLesionSynthesisd

    synth = RandLesionSynthesisd(prob=1.0, distribution=distribution, organ_seg_version="v1", fast=False)
    synth.set_random_state(seed)
    samples = []
    for d in train:
        for _ in range(per_case):
            s = synth(dict(d))
            if json.loads(s["image"].meta["lesion_synthesis"]):
                samples.append(s)
    return samples


# ---- metrics -----------------------------------------------------------------------------------------
def lesion_scores(pred: np.ndarray, truth: np.ndarray, spacing: float, nsd_mm: float) -> dict[str, Any]:
    """Dice, normalised surface Dice, lesion-wise detection by size and false-positive components of one scan."""
    from monai.metrics import DiceMetric, SurfaceDiceMetric
    from scipy import ndimage

    p = torch.as_tensor(pred)[None, None].float()
    t = torch.as_tensor(truth)[None, None].float()
    onehot_p, onehot_t = torch.cat([1 - p, p], 1), torch.cat([1 - t, t], 1)
    dice = float(DiceMetric(include_background=False, ignore_empty=False)(onehot_p, onehot_t)[0, 0])
    nsd = SurfaceDiceMetric([nsd_mm], include_background=False)(onehot_p, onehot_t, spacing=spacing)
    nsd = float(nsd[0, 0]) if torch.isfinite(nsd[0, 0]) else (1.0 if not truth.any() and not pred.any() else 0.0)
    truth_cc, n_truth = ndimage.label(truth)
    pred_cc, n_pred = ndimage.label(pred)
    lesions = []
    for i in range(1, n_truth + 1):
        comp = truth_cc == i
        diameter = (6.0 * comp.sum() * spacing**3 / math.pi) ** (1.0 / 3.0)
        lesions.append({"diameter_mm": round(diameter, 1), "detected": bool(pred[comp].any())})
    false_pos = sum(1 for j in range(1, n_pred + 1) if not truth[pred_cc == j].any())
    return {"dice": dice, "nsd": nsd, "lesions": lesions, "false_positives": false_pos}


# ---- training ----------------------------------------------------------------------------------------
def _network(features: Sequence[int]) -> torch.nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=tuple(features))


def intensity_augmentation(hu_shift: float) -> Any:
    """The same augmentation in every arm: flips and a random HU offset (up to ``hu_shift``) and contrast.

    The offset makes the network read a lesion against its organ rather than by absolute HU: training
    and test scans differ in contrast phase (a portal-venous liver is about 90 HU, an unenhanced one 45).
    """
    from monai.transforms import Compose, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "label"]
    return Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandShiftIntensityd("image", offsets=hu_shift, prob=0.9), RandScaleIntensityd("image", factors=0.1, prob=0.5),
    ])  # fmt: skip


def _to_input(image: torch.Tensor) -> torch.Tensor:
    return ((torch.as_tensor(image).float().clamp(-200.0, 300.0) + 200.0) / 500.0).as_subclass(torch.Tensor)


def evaluate(
    net: torch.nn.Module, tests: dict[str, list[dict]], spacing: float, nsd_mm: float
) -> dict[str, list[dict]]:
    net.eval()
    out = {}
    with torch.no_grad():
        for name, cases in tests.items():
            rows = []
            for d in cases:
                logits = net(_to_input(d["image"])[None])
                pred = logits.argmax(1)[0].numpy().astype(bool)
                rows.append(lesion_scores(pred, d["label"][0].numpy() == 2, spacing, nsd_mm))
            out[name] = rows
    net.train()
    return out


def train_arm(
    arm: str, seed: int, train: list[dict], offline: list[dict], tests: dict[str, list[dict]], p: dict[str, Any],
    organ: str, distribution: dict[str, Any], nsd_mm: float,
) -> dict[str, Any]:  # fmt: skip
    """Train one arm with one seed; returns the scores at each evaluation and the time spent."""
    from monai.losses import DiceCELoss
    from monai.transforms import RandCropByPosNegLabeld
    from monai.utils import set_determinism

    from lesiondiffusion.augment import RandLesionSynthesisd

    set_determinism(seed=seed)
    net = _network(p["features"])
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    pool = train + (offline if arm == "offline" else [])
    synth = None
    if arm in ("online", "flat"):
        synth = RandLesionSynthesisd(prob=p["online_prob"], distribution=distribution, organ_seg_version="v1",
                                     intensity="linet" if arm == "online" else "flat")  # fmt: skip
        synth.set_random_state(seed)
    patch = RandCropByPosNegLabeld(["image", "label"], "label", (p["patch"],) * 3, pos=1, neg=1, num_samples=1)
    patch.set_random_state(seed)
    augment = intensity_augmentation(p["hu_shift"])
    augment.set_random_state(seed)
    rng = np.random.RandomState(seed)
    history, synth_s, start = [], 0.0, time.perf_counter()
    for it in tqdm(range(1, p["iterations"] + 1), desc=f"{arm} seed {seed}", leave=False, disable=None):
        images, labels = [], []
        for _ in range(p["batch"]):
            d = dict(pool[int(rng.randint(len(pool)))])
            if synth is not None:
                t0 = time.perf_counter()
                d = synth(d)
                synth_s += time.perf_counter() - t0
            d["label"] = (d["label"] == 2).to(torch.uint8)
            c = augment(patch(d)[0])
            images.append(_to_input(c["image"]))
            labels.append(torch.as_tensor(c["label"]).as_subclass(torch.Tensor).long())
        x, y = torch.stack(images), torch.stack(labels)
        optimiser.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimiser.step()
        if it % p["eval_every"] == 0 or it == p["iterations"]:
            history.append(
                {"iteration": it, "loss": float(loss.detach()), "scores": evaluate(net, tests, p["spacing"], nsd_mm)}
            )
    return {
        "arm": arm,
        "seed": seed,
        "history": history,
        "seconds": time.perf_counter() - start,
        "synthesis_seconds": synth_s,
    }


def _train_saved(job: tuple[Any, ...]) -> dict[str, Any]:
    """:func:`train_arm` in a worker process; its result is written at once (``downstream_runs/<arm>_seed<k>.json``)."""
    (arm, seed), train, offline, tests, p, organ, distribution, nsd_mm, folder, threads = job
    torch.set_num_threads(int(threads))
    run = train_arm(arm, seed, train, offline, tests, p, organ, distribution, nsd_mm)
    write_json(folder / f"{arm}_seed{seed}.json", {"settings": _run_key(p, organ, tests), **run})
    logger.info("%s seed %d: %.0f s (synthesis %.0f s)", arm, seed, run["seconds"], run["synthesis_seconds"])
    return run


def _run_key(p: dict[str, Any], organ: str, tests: dict[str, list[dict]]) -> dict[str, Any]:
    """What a saved run must agree on to be reused: the settings, the organ and the test sets' sizes."""
    return json.loads(json.dumps({**p, "organ": organ, "tests": {k: len(v) for k, v in tests.items()}}))


def run_arms(
    pairs: Sequence[tuple[str, int]], train: list[dict], offline: list[dict], tests: dict[str, list[dict]],
    p: dict[str, Any], organ: str, distribution: dict[str, Any], nsd_mm: float, folder: Path, jobs: int = 1,
    threads: int = 1,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every (arm, seed) run, ``jobs`` at a time in worker processes; a run saved in ``folder`` by an earlier,
    interrupted call with the same settings is read back instead of trained again."""
    key = _run_key(p, organ, tests)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for arm, seed in pairs:
        saved = folder / f"{arm}_seed{seed}.json"
        if saved.is_file():
            record = json.loads(saved.read_text())
            if record.pop("settings", None) == key:
                logger.info("%s seed %d: reused from %s", arm, seed, saved)
                done[(arm, seed)] = record
    todo = [(pair, train, offline, tests, p, organ, distribution, nsd_mm, folder, threads) for pair in pairs
            if pair not in done]  # fmt: skip
    if todo and int(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(int(jobs), len(todo))) as pool:
            for job, run in zip(todo, pool.imap(_train_saved, todo), strict=True):
                done[job[0]] = run
    else:
        for job in todo:
            done[job[0]] = _train_saved(job)
    return [done[pair] for pair in pairs]


# ---- summary -----------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return (float(a.mean()), float(a.std())) if a.size else (float("nan"), float("nan"))


def summarise(runs: list[dict[str, Any]], tests: Sequence[str]) -> dict[str, Any]:
    """Per test set and arm: mean +- std over seeds (of the per-seed mean over scans) at the last evaluation."""
    out: dict[str, Any] = {}
    for test in tests:
        per_arm = {}
        for arm in dict.fromkeys(r["arm"] for r in runs):
            seeds = [r for r in runs if r["arm"] == arm]
            last = [r["history"][-1]["scores"][test] for r in seeds]
            entry = {}
            for metric in ("dice", "nsd", "false_positives"):
                entry[metric] = _mean_std([float(np.mean([row[metric] for row in rows])) for rows in last])
            for name, test_size in (("small", lambda d: d < SIZE_SPLIT_MM), ("large", lambda d: d >= SIZE_SPLIT_MM)):
                rates = []
                for rows in last:
                    hits = [les["detected"] for row in rows for les in row["lesions"] if test_size(les["diameter_mm"])]
                    rates.append(float(np.mean(hits)) if hits else float("nan"))
                entry[f"sensitivity_{name}"] = _mean_std(rates)
            entry["dice_curve"] = [
                {"iteration": h["iteration"], **dict(zip(("mean", "std"), _mean_std(
                    [float(np.mean([row["dice"] for row in r["history"][i]["scores"][test]])) for r in seeds]),
                    strict=False))}
                for i, h in enumerate(seeds[0]["history"])
            ]  # fmt: skip
            per_arm[arm] = entry
        base = per_arm.get("real")
        for arm, entry in per_arm.items():
            if base is None or arm == "real":
                continue
            gain = entry["dice"][0] - base["dice"][0]
            spread = max(entry["dice"][1], base["dice"][1])
            entry["dice_gain_over_real"] = gain
            entry["gain_exceeds_seed_spread"] = bool(gain > spread)
        out[test] = per_arm
    return out


def _fmt(ms: tuple[float, float], scale: float = 100.0) -> str:
    m, s = ms
    return "n/a" if not np.isfinite(m) else f"{m * scale:.1f} +- {s * scale:.1f}"


COLOURS = {"real": (60, 60, 60), "offline": (31, 119, 180), "online": (214, 39, 40), "flat": (44, 160, 44)}


def plot_curves(summary: dict[str, Any], width: int = 420, height: int = 300) -> Any:
    """DSC (%) against iterations per arm, one panel per test set (mean over seeds; bars: +- std)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width * max(1, len(summary)), height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 45, 90, 25, 35
    for k, (test, arms) in enumerate(summary.items()):
        x0 = k * width
        iters = [c["iteration"] for e in arms.values() for c in e["dice_curve"]] or [1]
        xmax = max(iters)

        def xy(it: float, dsc: float, x0: int = x0, xmax: int = xmax) -> tuple[float, float]:
            x = x0 + left + (width - left - right) * it / xmax
            return x, top + (height - top - bottom) * (1.0 - max(0.0, min(100.0, dsc)) / 100.0)

        draw.rectangle([x0 + left, top, x0 + width - right, height - bottom], outline="black")
        draw.text((x0 + left, 5), f"{test}: lesion DSC (%) vs iterations", fill="black")
        for v in (0, 50, 100):
            draw.text((x0 + 15, xy(0, v)[1] - 5), str(v), fill="black")
        draw.text((x0 + width - right - 20, height - bottom + 5), str(xmax), fill="black")
        for j, (arm, e) in enumerate(arms.items()):
            colour = COLOURS.get(arm, (0, 0, 0))
            pts = [xy(c["iteration"], c["mean"] * 100) for c in e["dice_curve"] if np.isfinite(c["mean"])]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for c in e["dice_curve"]:
                if np.isfinite(c["mean"]):
                    (x, y), (_, y_lo), (_, y_hi) = (
                        xy(c["iteration"], c["mean"] * 100),
                        xy(0, (c["mean"] - c["std"]) * 100),
                        xy(0, (c["mean"] + c["std"]) * 100),
                    )
                    draw.line([(x, y_lo), (x, y_hi)], fill=colour)
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            draw.text((x0 + width - right + 8, top + 15 * j), arm, fill=colour)
    return img


def write_outputs(out: Path, report: dict[str, Any]) -> None:
    """``downstream.json``, ``downstream.md`` and ``downstream_dsc.png`` in ``out``, written atomically."""
    write_json(out / "downstream.json", report)
    summary = report["summary"]
    with atomic_path(out / "downstream_dsc.png") as tmp:
        plot_curves(summary).save(tmp, format="PNG")

    p = report["settings"]
    lines = [
        "# Downstream: lesion segmentation with and without synthetic lesions", "",
        f"Command: `{report['command']}`", "",
        f"Organ: {p['organ']}. Network: MONAI BasicUNet {list(p['features'])}, {p['iterations']} iterations, batch "
        f"{p['batch']}, {p['patch']}^3 patches from {p['crop']}^3 crops at {p['spacing']} mm, seeds {p['seed_list']}. "
        f"Training scans: {report['data']['train']}; offline synthetic cases: {report['data']['offline']} "
        f"({report['data']['offline_source']}); online "
        f"probability {p['online_prob']} per sample. Wall time {report['seconds'] / 60:.1f} min "
        f"({report['machine']}).", "",
        "Metrics at the last iteration, mean +- std over seeds (of each seed's mean over test scans), in %; "
        "FP = false-positive components per scan. A gain counts when it exceeds the larger seed spread.", "",
    ]  # fmt: skip
    for test, arms in summary.items():
        lines += [f"## {test} test set ({report['data']['tests'][test]} scans)", "",
                  "| arm | DSC | NSD | sens. < 20 mm | sens. >= 20 mm | FP / scan | DSC gain over real "
                  "| beyond seed spread |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for arm, e in arms.items():
            gain = e.get("dice_gain_over_real")
            lines.append(
                f"| {arm} | {_fmt(e['dice'])} | {_fmt(e['nsd'])} | {_fmt(e['sensitivity_small'])} | "
                f"{_fmt(e['sensitivity_large'])} | {_fmt(e['false_positives'], 1.0)} | "
                f"{'-' if gain is None else f'{gain * 100:+.1f}'} | "
                f"{'-' if gain is None else e['gain_exceeds_seed_spread']} |"
            )
        lines.append("")
    lines += ["## Reading", "", *report["reading"], "", "![DSC against iterations](downstream_dsc.png)", ""]
    with atomic_path(out / "downstream.md") as tmp:
        Path(tmp).write_text("\n".join(lines))


def _lesion_dice(runs: Sequence[dict[str, Any]], test: str) -> tuple[float, int]:
    """Best mean DSC over arms and seeds on the scans whose crop holds a lesion, and how many crops hold none."""
    best, empty = 0.0, 0
    for r in runs:
        rows = r["history"][-1]["scores"].get(test, [])
        empty = sum(1 for row in rows if not row["lesions"])
        with_lesion = [row["dice"] for row in rows if row["lesions"]]
        if with_lesion:
            best = max(best, float(np.mean(with_lesion)))
    return best, empty


def reading(summary: dict[str, Any], runs: Sequence[dict[str, Any]] = ()) -> list[str]:
    """Plain sentences: which arm beat arm 1 by more than the seed spread, and where it fell short."""
    lines = []
    for test, arms in summary.items():
        best, empty = _lesion_dice(runs, test) if runs else (float("nan"), 0)
        if best < 0.01:
            # an empty prediction scores DSC 1 on a crop without lesion: differences then only say which arm
            # predicted nothing there, not which segments lesions better
            scored = any(e["dice"][0] > 0.01 for e in arms.values())
            where = (
                f"; the DSC below comes from the {empty} scan(s) whose crop holds no lesion, where predicting "
                "nothing scores 1"
                if empty and scored
                else ""
            )
            lines.append(
                f"- {test}: no arm segments any lesion (best DSC on scans with a lesion {best * 100:.1f}%): the "
                f"networks have not learned the task at this size{where}."
            )
        for arm, e in arms.items():
            if arm == "real":
                continue
            gain = e["dice_gain_over_real"] * 100
            verdict = "exceeds" if e["gain_exceeds_seed_spread"] else "does not exceed"
            lines.append(
                f"- {test}: `{arm}` changes DSC by {gain:+.1f} points over `real`, which {verdict} the seed spread."
            )
        if "online" in arms and "offline" in arms:
            d = (arms["online"]["dice"][0] - arms["offline"]["dice"][0]) * 100
            lines.append(f"- {test}: online minus offline DSC: {d:+.1f} points.")
        if "real" in arms:
            r = arms["real"]
            for arm in ("offline", "online"):
                if arm in arms:
                    for size in ("small", "large"):
                        a, b = arms[arm][f"sensitivity_{size}"][0], r[f"sensitivity_{size}"][0]
                        if np.isfinite(a) and np.isfinite(b) and a < b:
                            lines.append(
                                f"- {test}: `{arm}` detects fewer {size} lesions than `real` "
                                f"({a * 100:.0f}% vs {b * 100:.0f}%)."
                            )
    return lines


# ---- entry point -------------------------------------------------------------------------------------
def run_downstream(
    real: str,
    out: str = "benchmarks/results",
    phantom: str | None = None,
    organ: str = "liver",
    arms: str | Sequence[str] = ARMS,
    preset: str = "cpu",
    seeds: int | None = None,
    iterations: int | None = None,
    eval_every: int | None = None,
    n_train_phantom: int = 2,
    nsd_tolerance_mm: float = 2.0,
    work: str | None = None,
    threads: int = 1,
    jobs: int = 1,
) -> Path:
    """Run the benchmark and write its report into ``out``; returns the markdown report's path.

    ``jobs`` (arm, seed) runs train at once, each in its own process with ``threads`` torch threads. Each run
    is saved in ``<out>/downstream_runs/`` as it ends, and a later call with the same settings reuses it, so an
    interrupted benchmark goes on where it stopped.
    """
    if preset not in PRESETS:
        raise LesionDiffusionError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    p = dict(PRESETS[preset])
    for key, value in (("seeds", seeds), ("iterations", iterations), ("eval_every", eval_every)):
        if value is not None:
            p[key] = int(value)
    arm_list = [a.strip() for a in (arms.split(",") if isinstance(arms, str) else arms) if a.strip()]
    unknown = [a for a in arm_list if a not in ARMS]
    if unknown or not arm_list:
        raise LesionDiffusionError(f"--arms takes a comma-separated subset of {', '.join(ARMS)}, not {arms!r}")
    if threads > 0:
        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    out_dir = user_path(out)
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="lesiondiffusion-downstream-"))
    distribution = {"organs": [organ], "lesion_types": ["tumor", "cyst", "metastasis"], "size_mm": (8.0, 30.0),
                    "cavity": "within the parenchymal organ"}  # fmt: skip

    real_path = user_path(real)
    train_cases = organ_cases(real_path, "training", organ)
    tests_cases = {"real_ct": organ_cases(real_path, "validation", organ)}
    if phantom:
        phantom_path = user_path(phantom)
        train_cases += organ_cases(phantom_path, "training", organ)[: int(n_train_phantom)]
        tests_cases["phantom"] = organ_cases(phantom_path, "validation", organ)
    if not train_cases:
        raise InputError(real_path, f"no training case with a {organ} lesion")
    load = lambda c: load_case(c, organ, p["spacing"], p["crop"])  # noqa: E731
    train = [load(c) for c in tqdm(train_cases, desc="training scans", disable=None)]
    tests = {name: [load(c) for c in cases] for name, cases in tests_cases.items() if cases}
    offline, offline_source = [], None
    if "offline" in arm_list:
        offline, offline_source = (
            offline_set(train, work_dir, organ, p["offline_per_case"], 0, distribution),
            "synthesize",
        )
        if not offline:
            logger.warning("synthesize made no offline case; making the offline set in process at full settings")
            offline = offline_set_in_process(train, p["offline_per_case"], 0, distribution)
            offline_source = "in-process chain at the bundles' full settings (synthesize made no case)"

    pairs = [(arm, seed) for seed in range(p["seeds"]) for arm in arm_list]
    saved = out_dir / "downstream_runs"
    runs = run_arms(pairs, train, offline, tests, p, organ, distribution, nsd_tolerance_mm, saved, jobs, threads)
    summary = summarise(runs, list(tests))
    report = {
        "command": " ".join(["lesiondiffusion downstream", *sys.argv[2:]]),
        "settings": {**p, "organ": organ, "arms": arm_list, "seed_list": list(range(p["seeds"])), "preset": preset,
                     "nsd_tolerance_mm": nsd_tolerance_mm, "distribution": distribution, "threads": threads},
        "data": {"train": len(train), "offline": len(offline), "offline_source": offline_source,
                 "tests": {k: len(v) for k, v in tests.items()},
                 "train_images": [c["image"] for c in train_cases],
                 "test_images": {k: [c["image"] for c in v] for k, v in tests_cases.items()}},
        "machine": f"{os.cpu_count()} CPUs shared, {jobs} run(s) at once with {threads} torch thread(s) each, load "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "seconds": time.perf_counter() - start,
        "summary": summary,
        "runs": runs,
    }  # fmt: skip
    report["reading"] = reading(summary, runs)
    write_outputs(out_dir, report)
    return out_dir / "downstream.md"
