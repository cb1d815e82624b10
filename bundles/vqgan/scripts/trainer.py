"""VQ-GAN training: a MONAI ``SupervisedTrainer`` whose iteration is one generator and one discriminator step.

MONAI's ``GanTrainer`` draws generator inputs from random latents and ``AdversarialTrainer`` expects a
network returning one tensor; the ``VQVAE`` returns ``(reconstruction, quantisation loss)`` and the
adversarial term starts only after a warm-up, hence this small subclass. Everything else (device
moves, AMP, handlers, checkpoints, state) is the engine's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.losses import PatchAdversarialLoss
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer

from lesiondiffusion.errors import InputError, LesionDiffusionError

logger = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "recon_loss", "quant_loss", "perceptual_loss", "g_adv_loss", "d_loss")


class VQGANTrainer(SupervisedTrainer):
    """One iteration: update the autoencoder on L1 + commitment (+ perceptual) (+ adversarial), then the discriminator.

    Args:
        network: the ``VQVAE`` (or its DDP wrapper); returns ``(reconstruction, quantisation loss)``.
        optimizer: the autoencoder's optimiser.
        loss_function: reconstruction loss (L1).
        discriminator: ``PatchDiscriminator`` (or its DDP wrapper); its last output is the patch logits.
        d_optimizer: the discriminator's optimiser.
        adv_loss: patch adversarial loss (MONAI ``PatchAdversarialLoss``).
        adv_weight: weight of the adversarial terms (generator and discriminator).
        adv_start: the adversarial terms and discriminator updates start after this many iterations.
        perceptual_loss: optional perceptual loss module (``None``: no perceptual term).
        perceptual_weight: its weight.
        Other arguments are ``SupervisedTrainer``'s.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        discriminator: nn.Module,
        d_optimizer: Optimizer,
        adv_loss: Callable | None = None,
        adv_weight: float = 0.01,
        adv_start: int = 0,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)  # the output is a dict of tensors and loss floats
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        self.discriminator = discriminator
        self.d_optimizer = d_optimizer
        self.adv_loss = adv_loss if adv_loss is not None else PatchAdversarialLoss(criterion="least_squares")
        self.adv_weight = float(adv_weight)
        self.adv_start = int(adv_start)
        self.perceptual_loss = perceptual_loss.to(device) if perceptual_loss is not None else None
        self.perceptual_weight = float(perceptual_weight)
        self.d_scaler = torch.amp.GradScaler("cuda") if self.amp else None

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x.contiguous().float())[-1]

    def _iteration(self, engine: VQGANTrainer, batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("must provide batch data for the current iteration")
        images = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)[0]
        adversarial = engine.adv_weight > 0 and engine.state.iteration > engine.adv_start
        engine.network.train()
        engine.discriminator.train()
        terms: dict[str, torch.Tensor] = {}
        autocast = torch.autocast(torch.device(engine.state.device).type, enabled=engine.amp, **engine.amp_kwargs)

        # autoencoder step
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast:
            recon, quant_loss = engine.network(images)
            terms["recon_loss"] = engine.loss_function(recon.float(), images)
            terms["quant_loss"] = quant_loss.float()
            loss = terms["recon_loss"] + terms["quant_loss"]
            if engine.perceptual_loss is not None and engine.perceptual_weight > 0:
                terms["perceptual_loss"] = engine.perceptual_loss(recon.float(), images)
                loss = loss + engine.perceptual_weight * terms["perceptual_loss"]
            if adversarial:
                terms["g_adv_loss"] = engine.adv_loss(
                    engine._logits(recon), target_is_real=True, for_discriminator=False
                )
                loss = loss + engine.adv_weight * terms["g_adv_loss"]
        _step(loss, engine.optimizer, engine.scaler if engine.amp else None)

        # discriminator step
        if adversarial:
            engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with autocast:
                fake = engine.adv_loss(engine._logits(recon.detach()), target_is_real=False, for_discriminator=True)
                real = engine.adv_loss(engine._logits(images), target_is_real=True, for_discriminator=True)
                terms["d_loss"] = 0.5 * (fake + real)
            _step(engine.adv_weight * terms["d_loss"], engine.d_optimizer, engine.d_scaler)

        out: dict[str, Any] = {Keys.IMAGE: images, Keys.PRED: recon.detach(), Keys.LOSS: float(loss.detach())}
        out.update({k: float(v.detach()) for k, v in terms.items()})
        engine.state.output = out
        return out


def _step(loss: torch.Tensor, optimizer: Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def loss_terms(output: Mapping[str, Any]) -> dict[str, float]:
    """The loss values of one iteration's output (for ``StatsHandler``/``TensorBoardStatsHandler``)."""
    return {k: output[k] for k in LOSS_TERMS if k in output}


def perceptual_loss(weights: str | Path | None, state_dict_key: str | None = None) -> nn.Module | None:
    """MONAI's 2.5D ``PerceptualLoss`` on a ResNet-50 loaded from local ``weights``; ``None`` without weights.

    Never downloads: no path means no perceptual term. A missing file, or a missing ``torchvision``
    (which the ResNet-50 comes from), is one clear error saying what to set.
    """
    if not weights:
        return None
    path = Path(weights)
    if not path.is_file():
        raise InputError(
            path,
            "perceptual loss weights not found; set perceptual_weights to a local ResNet-50 state dict, or to null",
        )
    try:
        import torchvision  # noqa: F401
    except ImportError:
        raise LesionDiffusionError(
            "the perceptual loss needs torchvision (pip install torchvision), or set perceptual_weights to null"
        ) from None
    from monai.losses import PerceptualLoss

    return PerceptualLoss(
        spatial_dims=3,
        network_type="resnet50",
        is_fake_3d=True,
        fake_3d_ratio=0.2,
        pretrained=True,
        pretrained_path=str(path),
        pretrained_state_dict_key=state_dict_key,
    )
