"""LINet's model pieces (design 4.4), shared by the bundle's training and the inference pipeline.

The network learns the *residual* of a crop's VQ-GAN latent over the latent of its intensity prior (the
lesion filled flat at one HU, :func:`intensity_prior`), noised only inside the lesion's latent cells
(:func:`latent_mask`): :class:`LatentPrepareBatch` builds it, :class:`LINetLoss` is the original's masked
L1 (plus an optional Dice term on a mask logit, dropped at sampling by :class:`NoiseOnly`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.schedulers import Scheduler
from monai.utils import convert_to_tensor
from torch import nn

from lesiondiffusion import autoencoder as ae
from lesiondiffusion.diffusion import ConditionedDiffusionPrepareBatch
from lesiondiffusion.transforms import CTIntensityMap

_TO_UNIT, _TO_HU = CTIntensityMap(), CTIntensityMap(inverse=True)

LATENT = "latent"  # the residual the network diffuses: latent - prior
LATENT_MASK = "latent_mask"
PRIOR = "prior_latent"


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A voxel mask ``[B, 1, *S]`` on the latent grid: 1 where any voxel of the latent cell is set.

    Max pooling (not interpolation) so that every lesion voxel lies in a regenerated latent cell.
    """
    m = (mask > 0.5).float()
    if factor == 1:
        return m
    pool = F.max_pool3d if m.ndim == 5 else F.max_pool2d
    return pool(m, kernel_size=factor, stride=factor, ceil_mode=True)


def latent_fraction(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Fraction of each latent cell covered by the mask (the target of the optional mask head)."""
    m = (mask > 0.5).float()
    if factor == 1:
        return m
    pool = F.avg_pool3d if m.ndim == 5 else F.avg_pool2d
    return pool(m, kernel_size=factor, stride=factor, ceil_mode=True)


def intensity_prior(
    image: torch.Tensor, mask: torch.Tensor, value_hu: torch.Tensor | float | None = None
) -> torch.Tensor:
    """``image`` ([B, 1, *S] on the [0, 1] map) with the ``mask`` voxels set to one intensity per sample.

    The intensity is ``value_hu`` (HU, per sample) when given, else the mean HU of the image under the
    mask (what a report's CT value states); a sample with an empty mask is returned unchanged.
    """
    image = convert_to_tensor(image, track_meta=False)
    m = (convert_to_tensor(mask, track_meta=False) > 0.5).to(image.dtype)
    dims = tuple(range(1, image.ndim))
    if value_hu is None:
        hu = convert_to_tensor(_TO_HU(image), track_meta=False)
        value_hu = (hu * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1.0)
    value = _TO_UNIT(torch.as_tensor(value_hu, dtype=image.dtype, device=image.device).reshape(-1))
    value = convert_to_tensor(value, track_meta=False).view(-1, *([1] * (image.ndim - 1)))
    return image * (1 - m) + value * m


def frozen_autoencoder(weights: str, preset: str, device: str | torch.device) -> nn.Module:
    """The trained VQ-GAN from a local file, in eval mode with gradients off (it is never trained here)."""
    net = ae.load_vqvae(weights, preset=preset, device=device, key="vqgan_weights")
    net.requires_grad_(False)
    return net


class NoiseOnly(nn.Module):
    """The network with its mask-logit channel dropped: what the sampler needs from a mask-head model."""

    def __init__(self, network: nn.Module, channels: int) -> None:
        super().__init__()
        self.network = network
        self.channels = channels

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.network(x, timesteps=timesteps, context=context, extra=extra)[:, : self.channels]


class LatentPrepareBatch(ConditionedDiffusionPrepareBatch):
    """Diffusion prepare-batch on the residual of a crop's VQ-GAN latent over its intensity prior.

    Args:
        scheduler: the training scheduler.
        autoencoder: the frozen VQ-GAN (:func:`frozen_autoencoder`).
        image_key, mask_key: the image crop ``[B, 1, *S]`` in [0, 1] and its lesion mask.
        condition_key: the attribute condition tensor.
        mask_head: also return the latent lesion fraction as the target of a mask logit (Dice term).

    ``x0`` is ``encode(crop) - encode(intensity_prior(crop, mask))``, noised inside the lesion's latent
    cells only; the extra input channels are the latent mask and the prior latent. Latents are computed
    on the fly (the VQ-GAN is small next to the UNet). The target is ``[noise (or velocity), mask weight
    (, lesion fraction)]`` along the channels.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        autoencoder: nn.Module,
        image_key: str = "image",
        mask_key: str = "label",
        condition_key: str | None = "condition",
        mask_head: bool = False,
    ) -> None:
        super().__init__(
            scheduler,
            image_key=LATENT,
            condition_key=condition_key,
            extra_keys=(LATENT_MASK, PRIOR),
            weight_key=LATENT_MASK,
            noise_mask_key=LATENT_MASK,
        )
        self.autoencoder = autoencoder
        self.factor = ae.downsample_factor(autoencoder)
        self.source_key = image_key
        self.mask_key = mask_key
        self.mask_head = mask_head

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        batch = dict(batchdata)
        mask = torch.as_tensor(batch[self.mask_key]).to(device=device).float()
        image = torch.as_tensor(batch[self.source_key]).to(device=device).float()
        prior = ae.encode(self.autoencoder, intensity_prior(image, mask))
        batch[LATENT] = ae.encode(self.autoencoder, image) - prior
        batch[PRIOR] = prior
        batch[LATENT_MASK] = latent_mask(mask, self.factor)
        images, target, args, infer_kwargs = super().__call__(batch, device, non_blocking, **kwargs)
        if self.mask_head:
            target = torch.cat([target, latent_fraction(mask, self.factor).to(target)], dim=1)
        return images, target, args, infer_kwargs


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1e-6) -> torch.Tensor:
    """The original's soft Dice loss over the whole batch: ``1 - (2 sum(p t) + s) / (sum p + sum t + s)``."""
    inter = (probability * target).sum()
    return 1.0 - (2.0 * inter + smooth) / (probability.sum() + target.sum() + smooth)


class LINetLoss(nn.Module):
    """The original LINet loss: L1 inside the mask normalised per sample, plus optional mask Dice.

    ``sum_{c, v} w |pred - target| / (sum_v w + 1e-6)`` per sample (all latent channels summed, divided by
    the number of masked latent voxels), averaged over the batch; with ``mask_head`` the prediction's last
    channel is a mask logit and ``dice_weight * Dice(sigmoid(logit), lesion fraction)`` is added.
    The target layout is :class:`LatentPrepareBatch`'s.
    """

    def __init__(self, mask_head: bool = False, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.mask_head = mask_head
        self.dice_weight = dice_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fraction = None
        if self.mask_head:
            pred, logit = pred[:, :-1], pred[:, -1:]
            target, fraction = target[:, :-1], target[:, -1:]
        target, weight = target[:, :-1], target[:, -1:]
        dims = tuple(range(1, pred.ndim))
        err = ((pred.float() - target.float()).abs() * weight).sum(dim=dims)
        loss = (err / (weight.sum(dim=dims) + 1e-6)).mean()
        if fraction is not None:
            loss = loss + self.dice_weight * dice_loss(torch.sigmoid(logit.float()), fraction.float())
        return loss
