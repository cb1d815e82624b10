"""Diffusion machinery shared by LMNet (mask diffusion) and LINet (latent inpainting), on MONAI's modules.

Training (one MONAI ``SupervisedTrainer`` iteration):

- :func:`training_scheduler` builds the noise schedule the network is trained with: MONAI's
  ``DDPMScheduler`` (1000 steps, the original's betas 0.0015..0.0195; ``epsilon``, ``v_prediction``, or
  ``sample``: the network predicts ``x0`` itself, which LMNet uses so that its masks come out smooth)
  or ``RFlowScheduler`` (``prediction_type="rflow"``: the network predicts the velocity ``x0 - noise``).
- :class:`ConditionedDiffusionPrepareBatch` (a ``DiffusionPrepareBatch``) draws noise and timesteps and
  returns ``(x0, target, (), kwargs)``; ``kwargs`` carry the noise, timesteps, the attribute condition,
  extra input channels (LMNet: organ map, organ mask, box; LINet: the lesion mask) and optionally a
  ``noise_mask`` (LINet: only the lesion region is noised). A per-voxel loss weight (LMNet: the box
  weighted up; LINet: 1 inside the lesion, 0 elsewhere) is appended to the target as one more channel,
  which :class:`WeightedLoss` splits off again.
- :class:`ConditionedDiffusionInferer` (a ``DiffusionInferer``) noises ``x0`` and calls the network.
- :class:`ConditionedDiffusionModel` wraps a ``DiffusionModelUNet`` and a condition encoder
  (:mod:`lesiondiffusion.conditioning`): ``model(x, timesteps, context=condition, extra=channels)``.
- EMA weights: ignite's ``EMAHandler`` (stock; it unwraps DDP and its ``ema_model`` is a plain copy of
  the network, so its state dict loads into the network for inference).
- Checkpoints: :class:`lesiondiffusion.training.LastCheckpointSaver` (every network's trainer).

Sampling: :class:`DiffusionSampler` runs DDIM (``DDIMScheduler``) or rectified flow (``RFlowScheduler``)
with a ``steps`` parameter on a network trained with any of the four objectives (the sampler's state is
mapped to the network's parametrisation at equal signal-to-noise ratio), with classifier-free guidance,
an optional known region reset at every step (LINet), a seeded generator and a tqdm bar. Same seed and
inputs, same output. Trained weights load through :func:`lesiondiffusion.networks.weights.load_weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler
from torch import nn
from tqdm import tqdm

from lesiondiffusion.errors import LesionDiffusionError

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "rflow")
SAMPLERS = ("ddim", "rflow")

# The original (an LDM code base) uses linear_start=0.0015, linear_end=0.0195 with LDM's "linear"
# schedule, which is linear in sqrt(beta): MONAI calls that "scaled_linear_beta".
DEFAULT_SCHEDULE = "scaled_linear_beta"
BETA_START = 0.0015
BETA_END = 0.0195


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise LesionDiffusionError(
            f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}"
        )


def training_scheduler(
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 1000,
    schedule: str = DEFAULT_SCHEDULE,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> Scheduler:
    """The scheduler a network is trained with: DDPM (``epsilon``/``v_prediction``/``sample``) or rectified flow (``rflow``)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "rflow":
        return RFlowScheduler(
            num_train_timesteps=num_train_timesteps, use_discrete_timesteps=True, sample_method="uniform"
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        schedule=schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=False,
    )


# ---- network wrapper ------------------------------------------------------------------------------
class ConditionedDiffusionModel(nn.Module):
    """A diffusion UNet plus its condition encoder, called as MONAI's inferers call a diffusion model.

    ``forward(x, timesteps, context=None, extra=None)``: ``extra`` channels (known inputs such as organ
    maps) are concatenated after ``x``; ``context`` is the raw condition tensor ``[B, n, width]`` of
    :class:`lesiondiffusion.conditioning.ReportConditiond`, embedded by ``encoder`` into ``[B, n, D]``
    for cross-attention (with ``encoder=None`` it is passed to the UNet unchanged). ``hint`` (optional,
    e.g. :class:`lesiondiffusion.conditioning.IntensityHint`) turns the raw condition and ``extra`` into
    more input channels, appended after ``extra``.
    """

    def __init__(self, unet: nn.Module, encoder: nn.Module | None = None, hint: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.encoder = encoder
        self.hint = hint

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if extra is not None and self.hint is not None:
            extra = torch.cat([extra.to(x.dtype), self.hint(context, extra.to(x.dtype))], dim=1)
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        if context is not None and self.encoder is not None:
            context = self.encoder(context)
        return self.unet(x=x, timesteps=timesteps, context=context)


# ---- training -------------------------------------------------------------------------------------
class ConditionedDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Diffusion prepare-batch with a condition, extra input channels, a loss weight and a noise mask.

    Returns ``(x0, target, (), kwargs)`` for :class:`ConditionedDiffusionInferer`, where ``kwargs`` has
    ``noise``, ``timesteps`` and, when configured, ``condition``, ``extra`` and ``noise_mask``.

    Args:
        scheduler: the training scheduler (:func:`training_scheduler`); its ``prediction_type`` decides
            the target (noise, DDPM velocity, or rectified-flow velocity ``x0 - noise``).
        image_key: the clean sample ``x0`` (LMNet: lesion mask in {-1, 1}; LINet: the latent).
        condition_key: the condition tensor (``None``: unconditioned).
        extra_keys: keys concatenated (channel axis, in order) as extra network input.
        weight_key: per-voxel loss weight ``[B, 1, ...]``; appended to the target as its last channel.
        noise_mask_key: ``[B, 1, ...]``, 1 where ``x0`` is noised; elsewhere the network sees clean ``x0``.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        image_key: str = "image",
        condition_key: str | None = "condition",
        extra_keys: Sequence[str] = (),
        weight_key: str | None = None,
        noise_mask_key: str | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps, condition_name=condition_key)
        self.scheduler = scheduler
        self.prediction_type = str(getattr(scheduler, "prediction_type", "epsilon"))
        self.rflow = isinstance(scheduler, RFlowScheduler)
        self.image_key = image_key
        self.extra_keys = tuple(extra_keys)
        self.weight_key = weight_key
        self.noise_mask_key = noise_mask_key

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        if self.rflow:
            return self.scheduler.sample_timesteps(images)  # type: ignore[operator]
        return super().get_timesteps(images)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.rflow:
            return images - noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        if self.prediction_type == "sample":
            return images
        return noise

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        def get(key: str) -> torch.Tensor:
            return torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking, **kwargs)

        images = get(self.image_key).float()
        noise = self.get_noise(images)
        timesteps = self.get_timesteps(images).to(images.device)
        target = self.get_target(images, noise, timesteps)
        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps}
        if self.condition_name is not None:
            infer_kwargs["condition"] = get(self.condition_name).float()
        if self.extra_keys:
            infer_kwargs["extra"] = torch.cat([get(k).float() for k in self.extra_keys], dim=1)
        if self.noise_mask_key is not None:
            infer_kwargs["noise_mask"] = get(self.noise_mask_key).float()
        if self.weight_key is not None:
            target = torch.cat([target, get(self.weight_key).float()], dim=1)
        return images, target, (), infer_kwargs


class ConditionedDiffusionInferer(DiffusionInferer):
    """``DiffusionInferer`` whose training call also takes extra input channels and a noise mask.

    ``inferer(x0, model, noise, timesteps, condition=None, extra=None, noise_mask=None)`` noises ``x0``
    with the scheduler (only where ``noise_mask`` is 1, if given) and returns the network's prediction.
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        if noise_mask is not None:
            noisy = noise_mask * noisy + (1 - noise_mask) * inputs
        return diffusion_model(noisy, timesteps=timesteps, context=condition, extra=extra)


class WeightedLoss(nn.Module):
    """MSE (or L1) with an optional per-voxel weight carried as the target's last channel.

    When ``target`` has one channel more than ``pred``, that channel is the weight ``w`` and the loss is
    ``sum(w * err) / (sum(w) * C)`` per batch (a weighted mean: its scale does not depend on how strongly
    the box is weighted, and a 0/1 weight gives the mean over the weighted region). Otherwise the plain mean.
    """

    def __init__(self, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "l1"):
            raise LesionDiffusionError(f"loss kind must be 'mse' or 'l1', not {kind!r}")
        self.kind = kind

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None
        if target.shape[1] == pred.shape[1] + 1:
            target, weight = target[:, :-1], target[:, -1:]
        diff = pred.float() - target.float()
        err = diff.square() if self.kind == "mse" else diff.abs()
        if weight is None:
            return err.mean()
        return (err * weight).sum() / (weight.sum() * err.shape[1]).clamp_min(1e-8)


# ---- sampling -------------------------------------------------------------------------------------
class _Parametrisation:
    """Signal/noise scales ``x_t = alpha(t) x0 + sigma(t) eps`` of a trained model, and their inverse."""

    def __init__(self, prediction_type: str, num_train_timesteps: int, alphas_cumprod: torch.Tensor | None) -> None:
        self.kind = prediction_type
        self.T = num_train_timesteps
        if prediction_type != "rflow":
            assert alphas_cumprod is not None
            self.alpha_table = alphas_cumprod.double().sqrt()
            self.sigma_table = (1 - alphas_cumprod.double()).sqrt()
            self.log_snr = (self.alpha_table / self.sigma_table).log()  # decreasing in t

    def scales(self, t: float) -> tuple[float, float]:
        """``(alpha, sigma)`` at model timestep ``t`` (fractional t interpolates the DDPM table)."""
        if self.kind == "rflow":
            s = t / self.T
            return 1.0 - s, s
        t = min(max(t, 0.0), self.T - 1.0)
        lo = int(t)
        hi = min(lo + 1, self.T - 1)
        f = t - lo
        log_snr = (1 - f) * float(self.log_snr[lo]) + f * float(self.log_snr[hi])
        alpha = float(torch.sigmoid(torch.tensor(2 * log_snr, dtype=torch.float64)).sqrt())
        return alpha, (1 - alpha**2) ** 0.5

    def timestep_for(self, alpha: float, sigma: float) -> float:
        """The model timestep with the signal-to-noise ratio ``alpha / sigma``."""
        if self.kind == "rflow":
            return self.T * sigma / (alpha + sigma)
        if sigma <= 0:
            return 0.0
        if alpha <= 0:
            return self.T - 1.0
        target = torch.tensor(alpha / sigma, dtype=torch.float64).log()
        # log_snr decreases with t: search the reversed (increasing) table
        rev = self.log_snr.flip(0)
        i = int(torch.searchsorted(rev, target).clamp(1, self.T - 1))
        lo, hi = float(rev[i - 1]), float(rev[i])
        f = 0.0 if hi == lo else (float(target) - lo) / (hi - lo)
        t_rev = (i - 1) + min(max(f, 0.0), 1.0)
        return (self.T - 1) - t_rev

    def to_x0_eps(self, out: torch.Tensor, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Network output at state ``x`` (model space, timestep ``t``) -> predicted ``(x0, eps)``."""
        alpha, sigma = self.scales(t)
        if self.kind == "epsilon":
            return (x - sigma * out) / max(alpha, 1e-8), out
        if self.kind == "v_prediction":  # v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1
            return alpha * x - sigma * out, sigma * x + alpha * out
        if self.kind == "sample":
            return out, (x - alpha * out) / max(sigma, 1e-8)
        return x + sigma * out, x - alpha * out  # rflow: v = x0 - eps


class DiffusionSampler:
    """Sample with DDIM or rectified flow from a network trained with any of :data:`PREDICTION_TYPES`.

    Args:
        method: ``ddim`` (MONAI ``DDIMScheduler``, eta 0: deterministic) or ``rflow`` (``RFlowScheduler``,
            Euler steps along the straight noise-to-data path).
        steps: number of sampling steps (= network evaluations, twice that batched with guidance).
        prediction_type: what the network was trained to predict (``epsilon``, ``v_prediction``, ``rflow``).
        num_train_timesteps, schedule, beta_start, beta_end: the training schedule (DDPM kinds).
        guidance_scale: classifier-free guidance; 1 = conditional only, 0 = unconditional,
            > 1 strengthens the attributes (the null condition is all zeros, as attribute dropout writes).
        clip_sample: clamp the predicted ``x0`` to [-1, 1] (right for masks in {-1, 1}; off for latents).
        progress: show a tqdm bar.

    The sampler's own state is mapped to the network's parametrisation at equal signal-to-noise ratio
    (same ``x0`` and ``eps``, rescaled), so e.g. a DDPM ``epsilon`` network samples with rectified flow.
    ``network_calls`` counts the network evaluations made so far (one per step; guidance batches the
    unconditional and the conditional pass into one call).
    """

    def __init__(
        self,
        method: str = "ddim",
        steps: int = 50,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        schedule: str = DEFAULT_SCHEDULE,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
        guidance_scale: float = 1.0,
        clip_sample: bool = True,
        progress: bool = True,
    ) -> None:
        if method not in SAMPLERS:
            raise LesionDiffusionError(f"unknown sampler {method!r}; use one of {', '.join(SAMPLERS)}")
        _check_prediction_type(prediction_type)
        if not 1 <= int(steps) <= num_train_timesteps:
            raise LesionDiffusionError(f"steps must be between 1 and {num_train_timesteps}, not {steps}")
        self.method = method
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.clip_sample = clip_sample
        self.progress = progress
        self.T = num_train_timesteps
        ddpm = DDPMScheduler(num_train_timesteps, schedule=schedule, beta_start=beta_start, beta_end=beta_end)
        self.model_space = _Parametrisation(prediction_type, num_train_timesteps, ddpm.alphas_cumprod)
        if method == "ddim":
            self.scheduler: Scheduler = DDIMScheduler(
                num_train_timesteps,
                schedule=schedule,
                beta_start=beta_start,
                beta_end=beta_end,
                clip_sample=clip_sample,
                prediction_type="epsilon",
            )
            self.state_space = _Parametrisation("epsilon", num_train_timesteps, ddpm.alphas_cumprod)
        else:
            self.scheduler = RFlowScheduler(num_train_timesteps, use_discrete_timesteps=True)
            self.state_space = _Parametrisation("rflow", num_train_timesteps, None)
        self.scheduler.set_timesteps(self.steps)
        self.network_calls = 0

    def _model_output(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: int,
        condition: torch.Tensor | None,
        extra: torch.Tensor | None,
        known: torch.Tensor | None,
        known_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted ``(x0, eps)`` at sampler state ``x`` and sampler timestep ``t``."""
        a_s, s_s = self.state_space.scales(float(t))
        same_clock = (self.state_space.kind == "rflow") == (self.model_space.kind == "rflow")
        t_m: int | float = t if same_clock else self.model_space.timestep_for(a_s, s_s)
        a_m, s_m = self.model_space.scales(float(t_m))
        scale = a_m / a_s if a_s >= s_s else s_m / s_s
        x_m = x * scale
        if known is not None and known_mask is not None:
            x_m = known_mask * known + (1 - known_mask) * x_m
        g = self.guidance_scale
        batch = x.shape[0]
        if condition is not None and g != 1.0:
            from lesiondiffusion.conditioning import null_condition

            inputs = torch.cat([x_m, x_m])
            cond = torch.cat([null_condition(condition), condition])
            ext = None if extra is None else torch.cat([extra, extra])
        else:
            inputs, cond, ext = x_m, condition, extra
        timesteps = torch.full(
            (inputs.shape[0],), t_m, device=x.device, dtype=torch.float32 if isinstance(t_m, float) else torch.long
        )
        out = model(inputs, timesteps=timesteps, context=cond, extra=ext)
        self.network_calls += 1
        if out.shape[0] != batch:
            uncond, cond_out = out[:batch], out[batch:]
            out = uncond + g * (cond_out - uncond)
        return self.model_space.to_x0_eps(out, x_m, float(t_m))

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        shape: Sequence[int] | None = None,
        condition: torch.Tensor | None = None,
        extra: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Draw samples ``[B, C, ...]`` (``shape``) from pure noise, or from the given ``noise``.

        ``condition``: raw condition tensors ``[B, n, width]``; ``extra``: the extra input channels;
        ``known`` / ``known_mask`` (1 = known): the known region is set to ``known`` before every network
        call and in the result (inpainting; matches training with a ``noise_mask`` of ``1 - known_mask``).
        Noise comes from ``generator``, or a new one seeded with ``seed`` (default 0).
        """
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        if noise is None:
            if shape is None:
                raise LesionDiffusionError("give the sample shape or the starting noise")
            if generator is None:
                generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else int(seed))
            noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
        x = noise.to(dev)
        move = {
            k: (None if v is None else v.to(dev).float())
            for k, v in {"c": condition, "e": extra, "k": known, "m": known_mask}.items()
        }
        timesteps = [int(t) for t in self.scheduler.timesteps]
        nexts = timesteps[1:] + [0]
        was_training = model.training
        model.eval()
        try:
            for t, t_next in tqdm(
                list(zip(timesteps, nexts)), desc=f"{self.method} sampling", disable=not self.progress, leave=False
            ):
                x0, eps = self._model_output(model, x, t, move["c"], move["e"], move["k"], move["m"])
                if self.method == "ddim":
                    x, _ = self.scheduler.step(eps, t, x)  # type: ignore[call-arg]
                else:
                    if self.clip_sample:
                        x0 = x0.clamp(-1, 1)
                    x, _ = self.scheduler.step(x0 - eps, t, x, t_next)  # type: ignore[call-arg]
        finally:
            model.train(was_training)
        if move["k"] is not None and move["m"] is not None:
            x = move["m"] * move["k"] + (1 - move["m"]) * x
        return x
