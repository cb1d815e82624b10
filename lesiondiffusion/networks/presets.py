"""Network sizes per preset, for all three networks: the one table the bundles and the package read.

``cpu`` trains and samples on a laptop CPU; ``paper`` is the original's sizes. A bundle picks an entry with
its ``preset`` key (``"network_preset": "$lesiondiffusion.networks.presets.preset('linet', @preset)"``) and
exposes each size as a top-level key of its own, so a run overrides one (``--channels "[16,16,32]"``)
without editing the table.
"""

from __future__ import annotations

import copy
from typing import Any

from lesiondiffusion.errors import LesionDiffusionError

NAMES = {"vqgan": "VQ-GAN", "lmnet": "LMNet", "linet": "LINet"}
_ONE_CHANNEL_3D = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1}
_QUANTISER = {"embedding_dim": 4, "commitment_cost": 0.25}
# the original's LMNet UNet, kept in both presets: only its grid, crop and conditioning width change
_LMNET_UNET = {
    "channels": [16, 32, 64],
    "attention_levels": [False, False, True],
    "num_res_blocks": 1,
    "num_head_channels": 16,
    "norm_num_groups": 8,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # VQ-GAN: MONAI VQVAE and PatchDiscriminator keyword arguments, the training crop and schedule
    "vqgan": {
        # the original's sizes (design 4.3): 96 channels, one x2 downsampling, codebook 2048 x 4, 128^3 crops
        "paper": {
            "vqvae": {
                **_ONE_CHANNEL_3D, **_QUANTISER, "channels": (96, 96), "num_res_layers": 3, "num_res_channels": (96, 96),
                "downsample_parameters": ((2, 4, 1, 1), (1, 3, 1, 1)), "upsample_parameters": ((1, 3, 1, 1, 0), (2, 4, 1, 1, 0)),
                "num_embeddings": 2048, "decay": 0.99,
            },
            "discriminator": {**_ONE_CHANNEL_3D, "channels": 64, "num_layers_d": 3},
            "crop_size": (128, 128, 128),
            "batch_size": 2, "iter_num": 1000, "max_epochs": 100, "lr": 0.0001, "adv_start": 10000, "num_workers": 8,
        },
        # small enough to train a few hundred iterations on a 2-core CPU: x4 downsampling, 64^3 crops
        "cpu": {
            "vqvae": {
                **_ONE_CHANNEL_3D, **_QUANTISER, "channels": (32, 64), "num_res_layers": 1, "num_res_channels": (32, 64),
                "downsample_parameters": ((2, 4, 1, 1), (2, 4, 1, 1)), "upsample_parameters": ((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
                "num_embeddings": 512, "decay": 0.9,
            },
            "discriminator": {**_ONE_CHANNEL_3D, "channels": 16, "num_layers_d": 2},
            "crop_size": (64, 64, 64),
            "batch_size": 2, "iter_num": 100, "max_epochs": 5, "lr": 0.0002, "adv_start": 300, "num_workers": 2,
        },
    },
    # LMNet: the mask diffusion UNet on a `spacing` mm grid, its crop and training schedule
    "lmnet": {
        "cpu": {
            **_LMNET_UNET, "spacing": 2.0, "crop_size": [32, 32, 16], "condition_dim": 64, "batch_size": 2, "lr": 0.0002,
            "iter_num": 100, "max_epochs": 10, "ema_momentum": 0.01,
        },
        "paper": {
            **_LMNET_UNET, "spacing": 1.0, "crop_size": [152, 152, 64], "condition_dim": 512, "batch_size": 4, "lr": 0.0001,
            "iter_num": 1000, "max_epochs": 200, "ema_momentum": 0.001,
        },
    },
    # LINet: the latent inpainting UNet and its (image-space) crop
    "linet": {
        "cpu": {
            "channels": [32, 64, 64], "attention_levels": [False, False, True], "num_res_blocks": 1, "num_head_channels": 16,
            "norm_num_groups": 16, "condition_dim": 64, "crop_size": [64, 64, 64], "batch_size": 2, "lr": 0.0002,
        },
        "paper": {
            "channels": [128, 256, 512], "attention_levels": [False, False, True], "num_res_blocks": 2,
            "num_head_channels": 32, "norm_num_groups": 32, "condition_dim": 512, "crop_size": [128, 128, 128],
            "batch_size": 1, "lr": 2e-05,
        },
    },
}  # fmt: skip


def preset(network: str, name: str) -> dict[str, Any]:
    """A deep copy of ``network``'s (``vqgan``, ``lmnet``, ``linet``) preset ``name``; an unknown one is a
    one-line error listing the known ones."""
    table = PRESETS.get(network)
    if table is None:
        raise LesionDiffusionError(f"no presets for {network!r}; the networks are {', '.join(PRESETS)}")
    if name not in table:
        known = ", ".join(repr(k) for k in sorted(table))
        raise LesionDiffusionError(f"unknown {NAMES[network]} preset {name!r}; choose one of {known}")
    return copy.deepcopy(table[name])
