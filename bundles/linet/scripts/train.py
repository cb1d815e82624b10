"""LINet training pieces that JSON cannot express: latent prepare-batch, the original's loss, data plumbing.

One iteration (MONAI ``SupervisedTrainer``):

1. the data pipeline gives a CT crop around a lesion (``image``, [0, 1]), its lesion mask (``label``)
   and the attribute condition (``condition``);
2. :class:`LatentPrepareBatch` encodes the crop with the frozen VQ-GAN, and encodes it once more with
   the lesion filled flat at the lesion's mean intensity (:func:`intensity_prior`): the *prior* latent.
   The network learns the *residual* ``latent - prior``: a network that has learnt nothing yet already
   paints a lesion of the asked-for mean HU, and what it learns is the lesion's structure (edges,
   texture, heterogeneity). The residual is noised only inside the lesion mask; the mask and the prior
   latent are extra input channels; the mask is the loss weight. It hands over to the shared
   :class:`~lesiondiffusion.diffusion.ConditionedDiffusionPrepareBatch`;
3. :class:`LINetLoss` is the original's L1 inside the mask, normalised by the mask's voxel count per
   sample, plus an optional Dice term on a predicted mask logit.

At inference the prior's fill is the report's CT value (reports extracted from labelled scans state
the lesion's mean HU as their CT value, so training and inference fill alike), calibrated through the
VQ-GAN so that the prior is rendered at that value (``scripts.inpaint.LesionInpainter.prior_fill``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import DistributedWeightedRandomSampler
from monai.networks.schedulers import Scheduler
from monai.utils import convert_to_tensor
from torch import nn
from torch.utils.data import Dataset, RandomSampler, Sampler

from lesiondiffusion import autoencoder as ae
from lesiondiffusion.dataset import read_datalist
from lesiondiffusion.diffusion import ConditionedDiffusionPrepareBatch
from lesiondiffusion.errors import InputError
from lesiondiffusion.transforms import CTIntensityMap

logger = logging.getLogger(__name__)
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


def intensity_prior(image: torch.Tensor, mask: torch.Tensor, value_hu: torch.Tensor | float | None = None) -> torch.Tensor:
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
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
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


class NoiseOnly(nn.Module):
    """The network with its mask-logit channel dropped: what the sampler needs from a mask-head model."""

    def __init__(self, network: nn.Module, channels: int) -> None:
        super().__init__()
        self.network = network
        self.channels = channels

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(x, timesteps=timesteps, context=context, extra=extra)[:, : self.channels]


def split_datalist(path: str, val_fraction: float = 0.0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(training, validation)`` cases of a datalist JSON (paths resolved, checked by :mod:`lesiondiffusion.dataset`).

    Every case needs ``image``, ``label`` and ``report``. When the datalist has no ``validation`` split,
    the last ``val_fraction`` of the training cases (at least one, when positive and two or more cases
    exist) are held out for validation.
    """
    if not path:
        raise InputError(None, "no datalist given; set datalist to a datalist JSON (--datalist FILE)")
    splits = read_datalist(path)
    train = [case.to_dict() for case in splits.get("training", [])]
    val = [case.to_dict() for case in splits.get("validation", [])]
    if not train:
        raise InputError(path, "no 'training' cases")
    for split, cases in (("training", train), ("validation", val)):
        for i, case in enumerate(cases):
            for key in ("image", "label", "report"):
                if key not in case:
                    raise InputError(path, f"entry {split}[{i}] lacks {key!r} (LINet needs image, label and report)")
                if not Path(case[key]).is_file():
                    raise InputError(case[key], f"{key} file not found (listed in {path})")
    if not val and float(val_fraction) > 0 and len(train) > 1:
        n = min(len(train) - 1, max(1, round(float(val_fraction) * len(train))))
        train, val = train[:-n], train[-n:]
    logger.info("LINet data: %d training case(s), %d validation case(s)", len(train), len(val))
    return train, val


def epoch_sampler(dataset: Dataset, iter_num: int, batch_size: int, distributed: bool = False, seed: int = 0) -> Sampler:
    """Draw ``iter_num * batch_size`` cases at random (with replacement) per epoch (per rank when distributed).

    The epoch length is independent of the dataset size (the original's ``random_sample`` + ``iter_num``).
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise InputError(None, "the training split is empty; check datalist")
    count = int(iter_num) * int(batch_size)
    generator = torch.Generator().manual_seed(int(seed))
    if distributed:
        return DistributedWeightedRandomSampler(dataset, weights=[1.0] * n, num_samples_per_rank=count, generator=generator)
    return RandomSampler(dataset, replacement=True, num_samples=count, generator=generator)


def existing(path: str | None) -> bool:
    """True when ``path`` names an existing file (for ``_disabled_`` switches of loaders)."""
    return bool(path) and Path(str(path)).is_file()


def require_file(path: str | None, setting: str, what: str) -> str:
    """``path`` when it is an existing file; otherwise an :class:`InputError` saying which setting to fix."""
    if not existing(path):
        raise InputError(path or None, f"{what} not found; pass --{setting} FILE")
    return str(path)


def check_training_inputs(settings: Mapping[str, Sequence[str]]) -> None:
    """Check every named file before anything is built: ``{setting: (path, description)}``."""
    for setting, (path, what) in settings.items():
        require_file(path, setting, what)


def finetune(network: nn.Module, ema_network: nn.Module | None, weights: str | None) -> None:
    """Start from trained weights (the original's ``*_ft`` configs): new optimiser, new data.

    Loads the EMA weights of a LINet checkpoint (else its raw network) into the network and its EMA
    copy; nothing happens when ``weights`` is empty.
    """
    if not weights:
        return
    from lesiondiffusion.diffusion import load_weights

    target = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    load_weights(target, weights, setting="finetune_from")
    if ema_network is not None:
        ema_network.load_state_dict(target.state_dict())
    logger.info("fine-tuning from %s", weights)
