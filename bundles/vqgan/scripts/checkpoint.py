"""The last training checkpoint: written atomically so a run killed at any moment resumes from it.

MONAI's ``CheckpointSaver`` writes the best model (``model_best.pt``); for periodic saves it deletes the
previous file before writing the next, non-atomically, so a kill in between loses the checkpoint.
This handler writes ``checkpoint_last.pt`` through a temporary file and a rename instead; resuming
uses MONAI's ``CheckpointLoader``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from lesiondiffusion.io import atomic_path
from lesiondiffusion.settings import flag

logger = logging.getLogger(__name__)


def _state(obj: Any) -> Any:
    module = getattr(obj, "module", None)  # DistributedDataParallel: save the wrapped network
    return (module if isinstance(module, torch.nn.Module) else obj).state_dict()


class SaveLastCheckpoint:
    """Save ``{name: obj.state_dict()}`` to ``path`` every ``every`` iterations, each epoch end and at completion.

    The engine it is attached to is saved too, under ``trainer_key`` (its iteration and epoch), so that
    MONAI's ``CheckpointLoader`` with the same keys resumes where the run stopped.
    """

    def __init__(
        self, path: str | Path, save_dict: Mapping[str, Any], every: int = 50, trainer_key: str = "trainer"
    ) -> None:
        self.path = Path(path)
        self.save_dict = dict(save_dict)
        self.every = int(every)
        self.trainer_key = trainer_key
        self._saved_at = -1

    def attach(self, engine: Engine) -> None:
        if self.every > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration == self._saved_at:  # e.g. an interval save that ended an epoch
            return
        state = {name: _state(obj) for name, obj in self.save_dict.items()}
        state[self.trainer_key] = engine.state_dict()
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self._saved_at = engine.state.iteration
        logger.info("saved %s at iteration %d", self.path, engine.state.iteration)


def resume_path(path: str | Path, resume: bool | str) -> str | None:
    """``path`` when resuming is asked for and the checkpoint exists, else ``None`` (a fresh start)."""
    if flag(resume) and Path(path).is_file():
        logger.info("resuming from %s", path)
        return str(path)
    return None
