"""Training glue every network's ``train.json`` calls: the datalist split, the epoch sampler, input checks,
fine-tuning, and the last checkpoint, written atomically and found for resuming (design 5). One behaviour
for every bundle."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import DistributedWeightedRandomSampler
from torch import nn
from torch.utils.data import Dataset, RandomSampler, Sampler

from lesiondiffusion.dataset import holdout_indices, read_datalist
from lesiondiffusion.errors import InputError
from lesiondiffusion.io import PathLike, atomic_path
from lesiondiffusion.networks.weights import load_weights
from lesiondiffusion.settings import flag

logger = logging.getLogger(__name__)


def split_datalist(
    datalist: PathLike | None,
    needed: Sequence[str],
    network: str = "the network",
    val_fraction: float = 0.0,
    train_key: str = "training",
    val_key: str = "validation",
    seed: int = 0,
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(training, validation)`` cases of a datalist, as dicts of absolute paths.

    Every case needs the ``needed`` keys, each an existing file. When the datalist has no ``val_key``
    split, ``val_fraction`` of the training cases are held out for validation
    (:func:`lesiondiffusion.dataset.holdout_indices` with ``seed``).
    """
    if not datalist:
        raise InputError(None, "no datalist given; set datalist to a datalist JSON (--datalist FILE)")
    splits = read_datalist(datalist)
    train = [c.to_dict() for c in splits.get(train_key, [])]
    val = [c.to_dict() for c in splits.get(val_key, [])]
    if not train:
        raise InputError(datalist, f"no {train_key!r} cases")
    for where, cases in ((train_key, train), (val_key, val)):
        for i, case in enumerate(cases):
            missing = [k for k in needed if k not in case]
            if missing:
                raise InputError(
                    datalist, f"entry {where}[{i}] lacks {', '.join(missing)} ({network} needs {', '.join(needed)})"
                )
            for key in needed:
                if not existing(case[key]):
                    raise InputError(case[key], f"{key} file not found (listed in {datalist})")
    if not val:
        kept, held = holdout_indices(len(train), val_fraction, seed)
        train, val = [train[i] for i in kept], [train[i] for i in held]
    logger.info("%s data: %d training case(s), %d validation case(s)", network, len(train), len(val))
    return train, val


def epoch_sampler(
    dataset: Dataset, iter_num: int, batch_size: int, distributed: bool = False, seed: int = 0
) -> Sampler:
    """Draw ``iter_num * batch_size`` cases at random (with replacement) per epoch (per rank when distributed).

    The epoch length is independent of the dataset size (the original's ``random_sample`` + ``iter_num``).
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise InputError(None, "the training split is empty; check datalist")
    count = int(iter_num) * int(batch_size)
    generator = torch.Generator().manual_seed(int(seed))
    if distributed:
        return DistributedWeightedRandomSampler(
            dataset, weights=[1.0] * n, num_samples_per_rank=count, generator=generator
        )
    return RandomSampler(dataset, replacement=True, num_samples=count, generator=generator)


def existing(path: PathLike | None) -> bool:
    """True when ``path`` names an existing file."""
    return bool(path) and Path(str(path)).is_file()


def require_file(path: PathLike | None, setting: str, what: str) -> str:
    """``path`` when it is an existing file; otherwise an :class:`InputError` saying which setting to fix."""
    if not existing(path):
        raise InputError(path or None, f"{what} not found; pass --{setting} FILE")
    return str(path)


def check_training_inputs(settings: Mapping[str, Sequence[str]]) -> None:
    """Check every named file before anything is built: ``{setting: (path, description)}``."""
    for setting, (path, what) in settings.items():
        require_file(path, setting, what)


def finetune(network: nn.Module, ema_network: nn.Module | None, weights: PathLike | None) -> None:
    """Start from trained weights (the original's ``*_ft`` configs): new optimiser, new data.

    Loads the EMA weights of a checkpoint (else its raw network) into the network and its EMA copy;
    nothing happens when ``weights`` is empty.
    """
    if not weights:
        return
    target = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    load_weights(target, weights, "finetune_from")
    if ema_network is not None:
        ema_network.load_state_dict(target.state_dict())
    logger.info("fine-tuning from %s", weights)


class LastCheckpointSaver:
    """Save ``save_dict`` (objects with ``state_dict``) to ``save_dir/filename`` atomically, every ``interval``
    epochs (``epoch_level``) or iterations, then at each epoch's end and when the run completes.

    The file is replaced only once fully written, so a run killed at any moment leaves the previous
    checkpoint intact (MONAI's ``CheckpointSaver`` deletes the old file before writing the new one);
    ``CheckpointLoader(load_path=..., load_dict=same keys)`` resumes from it. A single module instead of
    a dict is saved as its plain state dict (a ``model.pt`` weights file). Networks wrapped in
    ``DistributedDataParallel`` are saved bare.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        save_dict: Mapping[str, Any] | nn.Module,
        interval: int = 1,
        epoch_level: bool = True,
        filename: str = "checkpoint_last.pt",
    ) -> None:
        self.path = Path(save_dir) / filename
        self.module = save_dict if isinstance(save_dict, nn.Module) else None
        self.save_dict = {} if self.module is not None else dict(save_dict)
        self.interval = interval
        self.epoch_level = epoch_level
        self._saved_at = -1

    def attach(self, engine: Engine) -> None:
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.interval), self)
        if not self.epoch_level:  # an epoch's length need not be a multiple of the interval
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration == self._saved_at:  # an interval save that also ended an epoch or the run
            return

        def unwrap(v: Any) -> Any:
            return v.module if isinstance(v, nn.parallel.DistributedDataParallel) else v

        if self.module is not None:
            state = unwrap(self.module).state_dict()
        else:
            state = {k: unwrap(v).state_dict() for k, v in self.save_dict.items()}
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self._saved_at = engine.state.iteration
        logger.info("saved %s at iteration %d", self.path, engine.state.iteration)


def resume_path(path: PathLike, resume: bool | str) -> str | None:
    """``path`` when resuming is asked for and the checkpoint exists (logged), else ``None``: a fresh start."""
    if flag(resume) and existing(path):
        logger.info("resuming from %s", path)
        return str(path)
    return None
