"""Datalist reading for the LMNet configs: training/validation splits as lists of absolute-path dicts."""

from __future__ import annotations

import logging

from lesiondiffusion.dataset import read_datalist
from lesiondiffusion.errors import InputError
from lesiondiffusion.io import PathLike

logger = logging.getLogger(__name__)

NEEDED = ("label", "report", "organ_seg")


def split_datalist(
    datalist: PathLike, train_key: str = "training", val_key: str = "validation", val_fraction: float = 0.0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(training, validation)`` cases of a datalist; each case needs a label map, report and organ map.

    When the datalist has no ``val_key`` split, the last ``val_fraction`` of the training cases
    (at least one, if the fraction is positive and two or more cases exist) become the validation split.
    """
    splits = read_datalist(datalist)
    if not splits.get(train_key):
        raise InputError(datalist, f"no {train_key!r} cases")
    train = [c.to_dict() for c in splits[train_key]]
    val = [c.to_dict() for c in splits.get(val_key, [])]
    for where, cases in ((train_key, train), (val_key, val)):
        for i, case in enumerate(cases):
            missing = [k for k in NEEDED if k not in case]
            if missing:
                raise InputError(datalist, f"entry {where}[{i}] lacks {', '.join(missing)} (LMNet needs label, report and organ_seg)")
    if not val and val_fraction > 0 and len(train) > 1:
        n = min(len(train) - 1, max(1, round(val_fraction * len(train))))
        train, val = train[:-n], train[-n:]
    logger.info("LMNet data: %d training case(s), %d validation case(s)", len(train), len(val))
    return train, val
