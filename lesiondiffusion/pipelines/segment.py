"""Organ segmentation of the standardised CT: TotalSegmentator, or the user's own organ map.

TotalSegmentator is an optional extra (``pip install '.[totalseg]'``). It is used only when it is
installed *and* its weights for the chosen task are already on this machine: nothing is downloaded
and no usage statistics are sent (its weights folder is ``$TOTALSEG_WEIGHTS_PATH``, else ``$TOTALSEG_HOME_DIR/nnunet/results``, else
``~/.totalsegmentator/nnunet/results``, as TotalSegmentator itself resolves it). It runs on the
standardised image, so its labels share the standardised grid (the original segmented with the
pre-resampling affine).

Which map a case gets: the user's ``organ_seg`` when given (unless ``prefer_totalseg``), else
TotalSegmentator when available, else the user's map, else one error naming both options. Every map
comes out in TotalSegmentator v1 numbering, which reports and the networks use: v2 maps (TotalSegmentator
2.x, or a user map declared or detected ``v2``) are converted with :func:`lesiondiffusion.labels.convert_ids`.
A user's map is read in the numbering ``organ_seg_version`` names, or with "auto" (the default) the one
:func:`lesiondiffusion.labels.detect_version` tells from its labels and anatomy; a map it cannot place
is one error asking for the flag, never read in a guessed numbering.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.extras import install_hint
from lesiondiffusion.labels import (
    AUTO,
    VERSION_CHOICES,
    VERSIONS,
    choose_version,
    convert_ids,
    label_ids,
    label_table,
    present_ids,
    relabel,
    resolve_version,
)
from lesiondiffusion.settings import flag

logger = logging.getLogger(__name__)

# nnU-Net datasets TotalSegmentator 2.x loads per task and mode (folders ``Dataset<id>_*`` in its weights dir).
TASK_WEIGHTS: dict[str, dict[bool, tuple[int, ...]]] = {
    "total": {False: (291, 292, 293, 294, 295), True: (297,)},
    "total_mr": {False: (850, 851), True: (852,)},
}
INSTALL_HINT = install_hint("totalseg")


def totalseg_weights_dir() -> Path:
    """Where TotalSegmentator keeps its weights (same resolution order as TotalSegmentator)."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    if os.environ.get("TOTALSEG_HOME_DIR"):
        return Path(os.environ["TOTALSEG_HOME_DIR"]) / "nnunet" / "results"
    home = Path("/tmp") if str(Path.home()) == "/" else Path.home()
    return home / ".totalsegmentator" / "nnunet" / "results"


def totalseg_device(device: Any = "auto") -> str:
    """TotalSegmentator's device string ("gpu", "gpu:1", "cpu", "mps") for a torch device or "auto"."""
    if device is None or str(device) == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        return "gpu" if dev.index is None else f"gpu:{dev.index}"
    return dev.type


@contextmanager
def _offline(api: Any) -> Iterator[None]:
    """Keep TotalSegmentator's run local: no usage statistics posted to its server, no weights download.

    Its API sends statistics after every prediction (unless its own config.json says otherwise) and
    fetches missing weights; both names are replaced in its module for the duration of the call.
    """

    def no_stats(*args: Any, **kwargs: Any) -> None:
        logger.debug("TotalSegmentator usage statistics not sent")

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise LesionDiffusionError(
            f"TotalSegmentator wanted to download weights; put them in {totalseg_weights_dir()} first"
        )

    saved = {
        name: getattr(api, name) for name in ("send_usage_stats", "download_pretrained_weights") if hasattr(api, name)
    }
    api.send_usage_stats, api.download_pretrained_weights = no_stats, no_download
    try:
        yield
    finally:
        for name in ("send_usage_stats", "download_pretrained_weights"):
            if name in saved:
                setattr(api, name, saved[name])
            else:
                delattr(api, name)


class TotalSegmentatorAdapter:
    """TotalSegmentator's Python API on a standardised image; returns a v1-numbered organ map."""

    def __init__(self, task: str = "total", fast: bool = False, device: Any = "auto", numbering: str = "v2") -> None:
        if task not in TASK_WEIGHTS:
            raise LesionDiffusionError(f"unknown TotalSegmentator task {task!r}; use one of: {', '.join(TASK_WEIGHTS)}")
        if numbering not in VERSIONS:
            raise LesionDiffusionError(
                f"unknown TotalSegmentator numbering {numbering!r}; use one of: {', '.join(VERSIONS)}"
            )
        self.task, self.fast, self.device, self.numbering = task, flag(fast), device, numbering

    def unavailable_reason(self) -> str | None:
        """None when TotalSegmentator can run offline now; else why not (one line)."""
        if importlib.util.find_spec("totalsegmentator") is None:
            return f"TotalSegmentator is not installed ({INSTALL_HINT})"
        folder = totalseg_weights_dir()
        missing = [i for i in TASK_WEIGHTS[self.task][self.fast] if not any(folder.glob(f"Dataset{i}_*"))]
        if missing:
            mode = " --fast" if self.fast else ""
            names = ", ".join(f"Dataset{i}_*" for i in missing)
            return f"TotalSegmentator weights for task {self.task}{mode} are not in {folder} ({names}; set TOTALSEG_HOME_DIR or TOTALSEG_WEIGHTS_PATH)"
        return None

    def __call__(self, image: nib.Nifti1Image) -> np.ndarray:
        """Segment ``image`` (HU, standardised grid); the organ map on the same grid, v1 ids, uint8."""
        from totalsegmentator import python_api  # optional extra: imported only when used

        device = totalseg_device(self.device)
        logger.info("TotalSegmentator: task %s%s on %s", self.task, " (fast)" if self.fast else "", device)
        with _offline(python_api):
            result = python_api.totalsegmentator(
                image, None, ml=True, task=self.task, fast=self.fast, device=device, quiet=True
            )
        return self._labels(result, image)

    def _labels(self, result: Any, image: nib.Nifti1Image) -> np.ndarray:
        """Check TotalSegmentator's output image against its input and convert it to v1 ids."""
        if not hasattr(result, "dataobj") or not hasattr(result, "affine"):
            raise LesionDiffusionError(f"TotalSegmentator returned {type(result).__name__}, not a NIfTI image")
        data = np.asanyarray(result.dataobj)
        if data.shape[:3] != image.shape[:3] or data.ndim != 3:
            raise LesionDiffusionError(
                f"TotalSegmentator returned shape {data.shape}, expected the input's {image.shape[:3]}"
            )
        if not np.allclose(result.affine, image.affine, atol=1e-3):
            raise LesionDiffusionError("TotalSegmentator returned a different affine than its input's")
        return to_v1(data, self._numbering(), source="TotalSegmentator output")

    def _numbering(self) -> str | dict[int, int]:
        if self.task == "total":
            return self.numbering
        # other tasks have their own class list: map it onto v1 by organ name
        from totalsegmentator.map_to_binary import class_map

        table = label_table("v1")
        lut = {}
        for i, name in class_map[self.task].items():
            try:
                lut[int(i)] = table.id(name)
            except LesionDiffusionError:
                continue
        return lut


def to_v1(data: np.ndarray, numbering: str | dict[int, int], source: str | Path = "organ map") -> np.ndarray:
    """An organ map in ``numbering`` ("v1", "v2" or an id -> v1 id dict) as v1 ids, uint8.

    Labels with no v1 counterpart become background (and are counted in the log).
    """
    ids = label_ids(data)
    if ids.size and (ids.min() < 0 or ids.max() > 10_000):
        raise InputError(source, f"organ map labels must be small non-negative integers, got {ids.min()}..{ids.max()}")
    if numbering == "v1":
        known = set(label_table("v1").names) | {0}
        # v1 ids are 0..104 without gaps: a map within that range holds no unknown id (no count of a whole CT)
        within = known == set(range(max(known) + 1)) and (ids.size == 0 or int(ids.max()) <= max(known))
        unknown = [] if within else sorted(set(present_ids(ids).tolist()) - known)
        if unknown:
            raise InputError(
                source,
                f"labels {unknown[:5]} are not TotalSegmentator v1 ids (is it a v2 map? set organ_seg_version v2 or auto)",
            )
        return ids.astype(np.uint8)
    mapping = convert_ids("v2", "v1") if numbering == "v2" else dict(numbering)
    out = relabel(ids, mapping)
    dropped = int(((ids > 0) & (out == 0)).sum())
    if dropped:
        logger.info("%s: %d voxels carry labels without a v1 counterpart; set to background", source, dropped)
    return out


class OrganSegmenter:
    """Chooses the organ map of each case: the user's, TotalSegmentator's, or a clear error.

    ``given_version`` is the numbering of the user's maps: "v1", "v2", or "auto" (told per map from
    its labels and their anatomy, :func:`lesiondiffusion.labels.detect_version`).
    """

    def __init__(
        self,
        totalseg: TotalSegmentatorAdapter | None = None,
        given_version: str = AUTO,
        prefer_totalseg: bool = False,
    ) -> None:
        if given_version not in VERSION_CHOICES:
            raise LesionDiffusionError(
                f"organ_seg_version must be one of {', '.join(VERSION_CHOICES)}, not {given_version!r}"
            )
        self.totalseg, self.given_version, self.prefer_totalseg = totalseg, given_version, flag(prefer_totalseg)

    def __call__(
        self, image: np.ndarray, affine: np.ndarray, given: np.ndarray | None, image_path: Path, given_path: Path | None
    ) -> tuple[np.ndarray, str]:
        """The v1 organ map on the standardised grid and its source ("given" or "totalsegmentator")."""
        seg, source, _ = self.segment(image, affine, given, image_path, given_path)
        return seg, source

    def segment(
        self,
        image: np.ndarray,
        affine: np.ndarray,
        given: np.ndarray | None,
        image_path: Path,
        given_path: Path | None,
        declared: str | None = None,
    ) -> tuple[np.ndarray, str, str]:
        """The v1 organ map on the standardised grid, its source ("given" or "totalsegmentator") and the
        numbering it came in ("v1", "v2", or TotalSegmentator's task numbering).

        ``image`` is the standardised CT (HU, 3D) with its ``affine``; ``given`` the user's map already
        resampled onto the same grid (nearest neighbour), or None. ``declared`` is the numbering the
        case's requests file or dataset declares for ``given``: used unless ``given_version`` names one.
        """
        reason = self.totalseg.unavailable_reason() if self.totalseg is not None else "TotalSegmentator is disabled"
        use_totalseg = reason is None and (given is None or self.prefer_totalseg)
        if use_totalseg:
            assert self.totalseg is not None
            ct = nib.Nifti1Image(np.asarray(image, dtype=np.float32), np.asarray(affine, dtype=np.float64))
            numbering = self.totalseg.numbering if self.totalseg.task == "total" else f"task {self.totalseg.task}"
            return self.totalseg(ct), "totalsegmentator", numbering
        if given is not None:
            where = given_path or "organ_seg"
            wanted = choose_version(self.given_version, declared)
            version = resolve_version(wanted, given, affine, where, image_hu=image)
            if wanted == AUTO:
                logger.info("%s: TotalSegmentator %s numbering (detected)", where, version)
            return to_v1(given, version, source=where), "given", version
        raise InputError(
            image_path,
            f"no organ segmentation: give one (organ_seg / --organ_seg, or organ_seg_list) or make TotalSegmentator available offline: {reason}",
        )
