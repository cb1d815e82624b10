"""Trained weights from a local file into a network: the one loader every network, bundle and pipeline uses."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lesiondiffusion.errors import InputError
from lesiondiffusion.io import user_path

#: the entries of a training checkpoint that hold a network's weights, in order of preference: the EMA
#: network (LMNet, LINet), the raw network, the autoencoder (VQ-GAN)
CHECKPOINT_KEYS = ("ema", "network", "autoencoder")


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def load_weights(
    network: nn.Module,
    path: str | os.PathLike[str] | None,
    setting: str = "weights",
    what: str = "",
    checkpoint_keys: Sequence[str] = CHECKPOINT_KEYS,
) -> nn.Module:
    """Load trained weights from a local file (``weights_only=True``) into ``network`` and return it.

    ``path`` is a bare state dict (``model.pt``) or a training checkpoint, whose first entry among
    ``checkpoint_keys`` is used; a ``DistributedDataParallel`` prefix or wrapper is dropped. A missing,
    unreadable or ill-fitting file is one :class:`InputError` naming the file, ``what`` network it was
    for and the ``setting`` to change.
    """
    label = f"{what} weights" if what else "weights"
    p = user_path(path) if path else None
    if p is None or not p.is_file():
        raise InputError(
            p or path,
            f"{label} file not found; set {setting} to a trained model.pt (each training run writes <output_dir>/model.pt)",
        )
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise InputError(p, f"not a loadable {label} file ({type(e).__name__}: {e})") from None
    if isinstance(state, Mapping):
        for key in checkpoint_keys:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    target = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    try:
        target.load_state_dict(_strip_prefix(state))
    except (RuntimeError, TypeError, AttributeError) as e:
        # PyTorch lists every mismatch on its own line: keep the first few, on one line
        lines = [line.strip() for line in str(e).strip().splitlines()[1:] if line.strip()]
        detail = "; ".join(lines)[:300] if lines else (str(e).strip() or type(e).__name__)
        raise InputError(
            p, f"{label} do not fit this network (different preset or architecture? check {setting}: {detail})"
        ) from None
    return network


def require_weights(path: str | os.PathLike[str] | None, setting: str, what: str) -> None:
    """A one-line error naming the file and the option to pass when a stage's weights file is missing (checked
    before any work starts)."""
    if not path or not user_path(path).is_file():
        raise InputError(
            path or None,
            f"{what} weights not found; pass --{setting} FILE (a {what} training run writes <output_dir>/model.pt)",
        )
