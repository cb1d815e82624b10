"""The 3D VQ-GAN autoencoder (MONAI ``VQVAE``): presets, weights loading and the encode/decode API.

Intensities are the [0, 1] map of :mod:`lesiondiffusion.transforms`. Any spatial size works: inputs are
padded at their far end (edge values repeated) up to a multiple of the downsampling factor and the
padding is cropped away after decoding, so no voxel is ever dropped. Latent voxel ``i`` covers input
voxels ``[i * f, (i + 1) * f)`` along each axis (``f`` = :func:`downsample_factor`).

The latent LINet diffuses in
----------------------------
:func:`encode` returns the *quantised* codebook embedding (``VQVAE.encode_stage_2_inputs``), shape
``[B, embedding_dim, *ceil(S / f)]``, standardised per channel by the mean and standard deviation of
the codebook entries weighted by how often training used them (the quantiser's EMA cluster sizes), so
each channel has about unit variance over the data the VQ-GAN saw (:func:`latent_stats`). The
diffusion schedules assume data of that scale: the original's single min/max rescale left the
channels with standard deviations of 0.03-0.24, drowned in unit noise long before the last timestep.
The statistics depend only on the weights, so training and sampling agree. :func:`decode` undoes the
scale, snaps the latent to the nearest codes (``VQVAE.decode_stage_2_outputs``) and decodes: a sampled
latent decodes exactly like an encoded one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from math import ceil, prod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import VQVAE, PatchDiscriminator
from torch import nn

from lesiondiffusion.errors import LesionDiffusionError
from lesiondiffusion.networks import presets
from lesiondiffusion.networks.weights import load_weights

logger = logging.getLogger(__name__)


def preset_config(preset: str) -> dict[str, Any]:
    """The VQ-GAN's preset (:mod:`lesiondiffusion.networks.presets`): VQVAE and discriminator arguments, crop."""
    return presets.preset("vqgan", preset)


def build_vqvae(preset: str = "cpu", **overrides: Any) -> VQVAE:
    """A new MONAI ``VQVAE`` with the preset's arguments, any of them replaced by ``overrides``."""
    kwargs = preset_config(preset)["vqvae"]
    kwargs.update(overrides)
    return VQVAE(**kwargs)


def build_discriminator(preset: str = "cpu", **overrides: Any) -> PatchDiscriminator:
    """A new MONAI ``PatchDiscriminator`` with the preset's arguments (``overrides`` replace them)."""
    kwargs = preset_config(preset)["discriminator"]
    kwargs.update(overrides)
    return PatchDiscriminator(**kwargs)


def _unwrap(net: nn.Module) -> VQVAE:
    """The VQVAE inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or ``net`` itself)."""
    return net.module if isinstance(getattr(net, "module", None), nn.Module) else net  # type: ignore[return-value]


def downsample_factor(net_or_preset: nn.Module | str) -> int:
    """The VQVAE's total downsampling factor (product of its encoder strides), e.g. 4 for ``cpu``."""
    if isinstance(net_or_preset, str):
        params = preset_config(net_or_preset)["vqvae"]["downsample_parameters"]
        strides = [p[0] for p in params]
    else:
        strides = []
        for m in _unwrap(net_or_preset).encoder.modules():
            if isinstance(m, nn.Conv3d | nn.Conv2d):
                strides.append(int(m.stride[0]))
    return int(prod(strides))


def latent_shape(spatial_shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Spatial latent shape for an input of ``spatial_shape``: ``ceil(s / factor)`` (inputs are padded)."""
    return tuple(ceil(int(s) / factor) for s in spatial_shape)


def latent_stats(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean, std)`` of the codebook, each entry weighted by its training usage.

    The weights are the quantiser's EMA cluster sizes: entries never selected during training weigh
    nothing (they keep a random initialisation that the EMA update shrank, or blew up early on). An
    untrained codebook weighs every entry equally. Shapes ``[embedding_dim]``; :func:`encode` maps
    the embedding ``e`` to ``(e - mean) / std``.
    """
    quantizer = _unwrap(net).quantizer.quantizer
    codes = quantizer.embedding.weight.detach().double()
    usage = quantizer.ema_cluster_size.detach().double().clamp_min(0)
    if float(usage.sum()) <= 0:
        usage = torch.ones_like(usage)
    p = (usage / usage.sum())[:, None]
    mean = (p * codes).sum(0)
    std = (p * (codes - mean) ** 2).sum(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def _channel_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device).view(1, -1, *([1] * (like.ndim - 2)))


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[VQVAE]:
    """Run with the network in eval mode (no EMA codebook updates), restoring its mode afterwards."""
    vq = _unwrap(net)
    was_training = vq.training
    vq.eval()
    try:
        with torch.no_grad():
            yield vq
    finally:
        vq.train(was_training)


def _pad_to_factor(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad the spatial dims of ``[B, C, *S]`` at their far end up to multiples of ``factor`` (edge values)."""
    spatial = x.shape[2:]
    extra = [(-int(s)) % factor for s in spatial]
    if not any(extra):
        return x
    pad: list[int] = []
    for e in reversed(extra):  # F.pad lists the last dim first
        pad += [0, e]
    return F.pad(x, pad, mode="replicate")


def _check_input(x: torch.Tensor, what: str = "input") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LesionDiffusionError(
            f"autoencoder {what} must be a [B, C, *spatial] tensor with 2 or 3 spatial dims, got {shape}"
        )


def encode(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encode ``x`` (``[B, 1, *S]``, intensities in [0, 1], any ``S``) to the scaled quantised latent.

    Returns ``[B, embedding_dim, *latent_shape(S, f)]``, standardised (see the module docstring).
    Deterministic: the network runs in eval mode under ``torch.no_grad``.
    """
    _check_input(x)
    with _eval_mode(net) as vq:
        x = x.to(next(vq.parameters()).device, torch.float32)
        e = vq.encode_stage_2_inputs(_pad_to_factor(x, downsample_factor(vq)))
        mean, std = latent_stats(vq)
        return (e - _channel_view(mean, e)) / _channel_view(std, e)


def decode(net: nn.Module, z: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Decode a latent from :func:`encode` (or a sampled one) back to ``[B, 1, *spatial_shape]``.

    ``z`` must have the latent shape of ``spatial_shape``; the padding added by :func:`encode` is
    cropped away. The latent is snapped to the nearest codebook entries before decoding.
    """
    _check_input(z, "latent")
    spatial_shape = tuple(int(s) for s in spatial_shape)
    with _eval_mode(net) as vq:
        f = downsample_factor(vq)
        expected = latent_shape(spatial_shape, f)
        if tuple(z.shape[2:]) != expected:
            raise LesionDiffusionError(
                f"latent of spatial shape {tuple(z.shape[2:])} does not match an image of shape {spatial_shape} "
                f"(expected {expected} for downsampling x{f})"
            )
        mean, std = latent_stats(vq)
        z = z.to(next(vq.parameters()).device, torch.float32)
        e = z * _channel_view(std, z) + _channel_view(mean, z)
        out = vq.decode_stage_2_outputs(e)
        return out[(..., *(slice(0, s) for s in spatial_shape))]


def reconstruct(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Encode and decode ``x`` in one go (pads, reconstructs, crops back to ``x``'s shape)."""
    return decode(net, encode(net, x), x.shape[2:])


class Reconstructor(nn.Module):
    """``forward(x)`` = :func:`reconstruct`: lets MONAI inferers and evaluators use the autoencoder.

    The wrapped network is shared, not copied (its weights follow training).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reconstruct(self.net, x)


def reconstruct_tiled(
    net: nn.Module,
    volume: torch.Tensor,
    roi_size: Sequence[int] | int,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    progress: bool = False,
) -> torch.Tensor:
    """Reconstruct a whole volume ``[B, 1, *S]`` tile by tile (MONAI sliding window, blended overlap).

    Memory is bounded by the tile size, not the volume; the output is on ``volume``'s device with
    ``volume``'s exact shape. Volumes smaller than a tile are padded by the sliding window and cropped back.
    """
    _check_input(volume, "volume")
    vq = _unwrap(net)
    device = next(vq.parameters()).device
    out = sliding_window_inference(
        volume.float(),
        roi_size=roi_size,
        sw_batch_size=sw_batch_size,
        predictor=Reconstructor(vq),
        overlap=overlap,
        mode=mode,
        padding_mode="replicate",
        sw_device=device,
        device=volume.device,
        progress=progress,
    )
    return torch.as_tensor(out)


def load_vqvae(
    weights: str | Path,
    preset: str = "cpu",
    device: str | torch.device = "cpu",
    key: str = "autoencoder_weights",
    **overrides: Any,
) -> VQVAE:
    """Build the preset's VQVAE, load ``weights`` (local file only) and return it in eval mode on ``device``."""
    net = build_vqvae(preset, **overrides)
    load_weights(net, weights, key, "VQ-GAN")
    return net.to(device).eval()
