"""``lesiondiffusion train``: train the networks by running the bundles' ``train.json`` in order.

Each network trains in its own bundle process; ``<out>/<network>/model.pt`` is what training leaves,
the layout ``lesiondiffusion synthesize --weights <out>`` reads. LINet encodes its crops with the VQ-GAN,
so it trains after it, on the VQ-GAN weights of the same run (or ``--vqgan_weights``). With
``--prepare`` a raw labelled dataset (CT, 0/1/2 label, organ map) first goes through the preprocess
bundle's ``train.json`` (standardised grid, a report extracted per case) into ``<out>/prepared``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lesiondiffusion.dataset import datalist_version
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.io import output_lock, user_path
from lesiondiffusion.labels import VERSION_CHOICES, choose_version
from lesiondiffusion.settings import flag
from lesiondiffusion_tools.bundle_runner import BUNDLES_DIR, check_overrides, run_bundle

logger = logging.getLogger(__name__)

ORDER = ("vqgan", "lmnet", "linet")
PRESETS = ("cpu", "paper")


def stages_for(stage: str) -> tuple[str, ...]:
    """The networks ``--stage`` names, in training order."""
    if stage == "all":
        return ORDER
    if stage not in ORDER:
        raise LesionDiffusionError(f"--stage must be one of {', '.join(ORDER)} or all, not {stage!r}")
    return (stage,)


def train(
    stage: str = "all",
    datalist: str | None = None,
    out: str | None = None,
    preset: str = "cpu",
    max_epochs: int | None = None,
    iter_num: int | None = None,
    seed: int = 0,
    vqgan_weights: str | None = None,
    resume: bool = False,
    device: str | None = None,
    prepare: bool = False,
    val_fraction: float = 0.2,
    organ_seg_version: str = "auto",
    bundle_overrides: Any = None,
    **overrides: Any,
) -> dict[str, Path]:
    """Train ``stage`` (vqgan, lmnet, linet or all) on ``datalist``; weights land in ``out/<network>/model.pt``.

    Other keys of the bundles' ``train.json`` pass through (e.g. ``--lr 1e-4``); they go to every
    stage trained in this run; ``bundle_overrides`` (a JSON object by network) sets keys of one
    network's ``train.json`` only. ``organ_seg_version`` (v1, v2 or auto: told per map) is the organ
    maps' numbering (auto: the one the datalist declares, else told per map); ``--prepare`` converts them to v1, which the networks train on. Returns the weights
    written, by network.
    """
    from lesiondiffusion_tools.synthesize import stage_overrides

    per_stage = stage_overrides(bundle_overrides, ORDER)
    stages = stages_for(stage)
    if preset not in PRESETS:
        raise LesionDiffusionError(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    if not datalist:
        raise LesionDiffusionError("give the training data: --datalist FILE (add --prepare for a raw labelled dataset)")
    data = user_path(datalist).resolve()
    if not data.is_file():
        raise InputError(data, "datalist not found")
    if not out:
        raise LesionDiffusionError("give the output folder: --out DIR")
    out_dir = user_path(out).resolve()
    if organ_seg_version not in VERSION_CHOICES:
        raise LesionDiffusionError(
            f"--organ_seg_version must be one of {', '.join(VERSION_CHOICES)}, not {organ_seg_version!r}"
        )
    organ_seg_version = choose_version(
        organ_seg_version, datalist_version(data)
    )  # the flag, else the datalist's declaration
    if organ_seg_version == "v2" and not flag(prepare):
        raise LesionDiffusionError("the networks train on v1 organ maps: add --prepare to convert v2 maps")
    with output_lock(out_dir, False, "train"):  # one training run per output folder
        return _train(
            stages,
            data,
            out_dir,
            preset,
            max_epochs,
            iter_num,
            seed,
            vqgan_weights,
            resume,
            device,
            prepare,
            val_fraction,
            organ_seg_version,
            per_stage,
            overrides,
        )


def _train(
    stages: tuple[str, ...], data: Path, out_dir: Path, preset: str, max_epochs: int | None, iter_num: int | None, seed: int,
    vqgan_weights: str | None, resume: bool, device: str | None, prepare: bool, val_fraction: float, organ_seg_version: str,
    per_stage: dict[str, dict[str, Any]], overrides: dict[str, Any],
) -> dict[str, Path]:  # fmt: skip
    if flag(prepare):
        prepared = out_dir / "prepared"
        logger.info("preparing the training set -> %s", prepared)
        run_bundle(
            "preprocess",
            {
                "datalist": str(data),
                "output_dir": str(prepared),
                "val_fraction": float(val_fraction),
                "split_seed": int(seed),
                "overwrite": True,
                "organ_seg_version": organ_seg_version,
            },
            configs=("train.json",),
        )
        data = prepared / "datalist.json"

    if "linet" in stages:
        if "vqgan" in stages:
            vq = out_dir / "vqgan" / "model.pt"
        else:
            vq = user_path(vqgan_weights).resolve() if vqgan_weights else BUNDLES_DIR / "vqgan" / "models" / "model.pt"
            if not vq.is_file():
                raise InputError(
                    vq,
                    "VQ-GAN weights not found; LINet trains on its latents: train it first (--stage vqgan) or pass --vqgan_weights FILE",
                )
    common: dict[str, Any] = {
        "datalist": str(data),
        "preset": preset,
        "seed": int(seed),
        "resume": flag(resume),
        **overrides,
    }
    for key, value in (("max_epochs", max_epochs), ("iter_num", iter_num), ("device", device)):
        if value is not None:
            common[key] = value

    if "help" in overrides:
        raise LesionDiffusionError("for the options, run: lesiondiffusion train -- --help")
    for name in stages:  # every setting must be a key of every network trained with it
        check_overrides(name, ("train.json",), overrides)
        check_overrides(name, ("train.json",), per_stage[name], "--bundle_overrides: ")

    written: dict[str, Path] = {}
    for name in stages:
        settings = {**common, **per_stage[name], "output_dir": str(out_dir / name)}
        if name == "linet":
            settings["vqgan_weights"] = str(vq)
            settings["vqgan_preset"] = preset
        logger.info("training %s (%s preset) -> %s", name, preset, out_dir / name)
        t0 = time.perf_counter()
        run_bundle(name, settings, configs=("train.json",))
        weights = out_dir / name / "model.pt"
        if not weights.is_file():
            raise LesionDiffusionError(f"{name} training ended without writing {weights}")
        logger.info("%s trained in %.0f s: %s", name, time.perf_counter() - t0, weights)
        written[name] = weights
    for name, path in written.items():
        print(f"{name}: {path}")
    if set(written) == set(ORDER):
        print(f"use them with: lesiondiffusion synthesize --weights {out_dir} ...")
    return written
