"""Diffusion machinery: schedulers, prepare-batch, inferer, loss, sampler (DDIM / rectified flow), weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.handlers import EMAHandler
from monai.engines import SupervisedTrainer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler
from torch import nn

from lesiondiffusion import vocabulary as V
from lesiondiffusion.conditioning import ConditionSpec, IntensityHint, VocabConditionEncoder
from lesiondiffusion.diffusion import (
    PREDICTION_TYPES,
    SAMPLERS,
    ConditionedDiffusionInferer,
    ConditionedDiffusionModel,
    ConditionedDiffusionPrepareBatch,
    DiffusionSampler,
    WeightedLoss,
    training_scheduler,
)
from lesiondiffusion.errors import InputError, LesionDiffusionError
from lesiondiffusion.networks.weights import load_weights
from lesiondiffusion.training import LastCheckpointSaver

T = 1000


def tiny_model(dim: int = 8, extra: int = 3) -> ConditionedDiffusionModel:
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=1 + extra,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=4,
        with_conditioning=True,
        cross_attention_dim=dim,
    )
    return ConditionedDiffusionModel(with_live_output(unet), VocabConditionEncoder(dim=dim))


def with_live_output(unet: DiffusionModelUNet) -> DiffusionModelUNet:
    """MONAI zero-initialises the UNet's last convolution (all outputs 0): give it weights, so inputs show."""
    with torch.no_grad():
        for p in unet.out.parameters():
            p.normal_(0.0, 0.1)
    return unet


def condition(shape: str = "round-like") -> torch.Tensor:
    return ConditionSpec().encode({V.SHAPE: shape, V.LOCATION: "liver"})[None]


def test_training_scheduler_matches_the_original_schedule():
    sched = training_scheduler("epsilon")
    assert isinstance(sched, DDPMScheduler) and sched.num_train_timesteps == T
    betas = sched.betas.double()
    assert betas[0].item() == pytest.approx(0.0015, rel=1e-5) and betas[-1].item() == pytest.approx(0.0195, rel=1e-5)
    steps = np.diff(betas.sqrt().numpy())  # the original's "linear" is linear in sqrt(beta)
    assert np.allclose(steps, steps[0], rtol=1e-3)
    assert training_scheduler("v_prediction").prediction_type == "v_prediction"
    assert isinstance(training_scheduler("rflow"), RFlowScheduler)
    with pytest.raises(LesionDiffusionError, match="prediction_type"):
        training_scheduler("x0")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prepare_batch_targets_weight_extra_and_condition(prediction_type):
    sched = training_scheduler(prediction_type)
    prepare = ConditionedDiffusionPrepareBatch(sched, image_key="x", extra_keys=("a", "b"), weight_key="w")
    torch.manual_seed(0)
    batch = {
        "x": torch.rand(2, 1, 4, 4, 4) * 2 - 1,
        "a": torch.rand(2, 1, 4, 4, 4),
        "b": torch.rand(2, 2, 4, 4, 4),
        "w": torch.rand(2, 1, 4, 4, 4),
        "condition": torch.cat([condition(), condition("punctate")]),
    }
    x0, target, args, kwargs = prepare(batch)
    noise, t = kwargs["noise"], kwargs["timesteps"]
    assert torch.equal(x0, batch["x"]) and args == ()
    assert torch.equal(kwargs["extra"], torch.cat([batch["a"], batch["b"]], dim=1))
    assert torch.equal(kwargs["condition"], batch["condition"])
    assert torch.equal(target[:, 1:], batch["w"])  # the weight rides along as the last channel
    expected = {
        "epsilon": noise,
        "v_prediction": sched.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else None,
        "sample": x0,
        "rflow": x0 - noise,
    }[prediction_type]
    assert torch.allclose(target[:, :1], expected)
    assert t.shape == (2,) and int(t.min()) >= 0 and int(t.max()) < T


class Probe(nn.Module):
    """Records what a diffusion model is called with; returns a fixed field."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(value))
        self.calls: list[dict] = []

    def forward(self, x, timesteps, context=None, extra=None):
        self.calls.append(
            {
                "x": x.clone(),
                "t": timesteps.clone(),
                "context": None if context is None else context.clone(),
                "extra": extra,
            }
        )
        return torch.zeros_like(x) + self.w


def test_inferer_noises_only_inside_the_noise_mask():
    sched = training_scheduler("epsilon")
    inferer = ConditionedDiffusionInferer(sched)
    probe = Probe()
    x0 = torch.rand(1, 1, 6, 6, 6)
    noise = torch.randn_like(x0)
    mask = torch.zeros_like(x0)
    mask[..., :3] = 1
    t = torch.tensor([700])
    inferer(x0, probe, noise=noise, timesteps=t, condition=condition(), extra=torch.ones_like(x0), noise_mask=mask)
    seen = probe.calls[0]["x"]
    assert torch.equal(seen[..., 3:], x0[..., 3:])  # known region: clean
    assert torch.allclose(seen[..., :3], sched.add_noise(x0, noise, t)[..., :3])
    assert torch.equal(probe.calls[0]["context"], condition())


def test_wrapper_concatenates_extra_channels_and_embeds_the_condition():
    model = tiny_model()
    x = torch.randn(2, 1, 8, 8, 8)
    extra = torch.rand(2, 3, 8, 8, 8)
    cond = torch.cat([condition(), condition("punctate")])
    out = model(x, timesteps=torch.tensor([10, 500]), context=cond, extra=extra)
    assert out.shape == x.shape and out.abs().max() > 0
    direct = model.unet(torch.cat([x, extra], 1), timesteps=torch.tensor([10, 500]), context=model.encoder(cond))
    assert torch.allclose(out, direct)


def test_wrapper_appends_the_hint_channels_after_extra():
    torch.manual_seed(0)
    unet = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=1 + 1 + IntensityHint.channels,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_head_channels=8,
        norm_num_groups=4,
        with_conditioning=True,
        cross_attention_dim=8,
    )
    model = ConditionedDiffusionModel(
        with_live_output(unet), VocabConditionEncoder(V.IMAGE_FIELDS, dim=8), hint=IntensityHint(V.IMAGE_FIELDS)
    )
    spec = ConditionSpec(V.IMAGE_FIELDS)
    cond = torch.stack([spec.encode({V.CT_VALUE: f"approximately {hu} HU"}) for hu in (10, 80)])
    x, mask = torch.randn(2, 1, 8, 8, 8), torch.zeros(2, 1, 8, 8, 8)
    mask[..., 2:6, 2:6, 2:6] = 1
    t = torch.tensor([10, 10])
    out = model(x, timesteps=t, context=cond, extra=mask)
    inputs = torch.cat([x, mask, model.hint(cond, mask)], 1)
    assert torch.allclose(out, model.unet(inputs, timesteps=t, context=model.encoder(cond)))
    # the CT value reaches the first convolution, not only the cross-attention
    same_tokens = model.unet(
        torch.cat([x, mask, model.hint(cond.flip(0), mask)], 1), timesteps=t, context=model.encoder(cond)
    )
    assert not torch.allclose(out, same_tokens)


def test_weighted_loss():
    pred, target = torch.randn(2, 1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)
    assert torch.allclose(WeightedLoss()(pred, target), ((pred - target) ** 2).mean())
    assert torch.allclose(WeightedLoss("l1")(pred, target), (pred - target).abs().mean())
    region = torch.zeros_like(pred)
    region[..., :2] = 1
    inside = ((pred - target) ** 2)[..., :2].mean()
    assert torch.allclose(WeightedLoss()(pred, torch.cat([target, region], 1)), inside)  # 0/1 weight: mean inside
    box = 1 + 999 * region
    weighted = (((pred - target) ** 2) * box).sum() / box.sum()
    assert torch.allclose(WeightedLoss()(pred, torch.cat([target, box], 1)), weighted)


class Oracle(nn.Module):
    """A perfect network for a one-point data distribution ``x0``: predicts the exact noise/velocity."""

    def __init__(self, x0: torch.Tensor, prediction_type: str) -> None:
        super().__init__()
        self.x0, self.kind = x0, prediction_type
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        ac = DDPMScheduler(T, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195).alphas_cumprod.double()
        self.log_snr = (ac.sqrt() / (1 - ac).sqrt()).log().numpy()

    def scales(self, t: float) -> tuple[float, float]:
        if self.kind == "rflow":
            return 1 - t / T, t / T
        log_snr = np.interp(t, np.arange(T), self.log_snr)
        alpha = (1 / (1 + np.exp(-2 * log_snr))) ** 0.5
        return alpha, (1 - alpha**2) ** 0.5

    def forward(self, x, timesteps, context=None, extra=None):
        alpha, sigma = self.scales(float(timesteps[0]))
        x0 = self.x0.expand_as(x)
        eps = (x - alpha * x0) / sigma
        if self.kind == "epsilon":
            return eps
        if self.kind == "v_prediction":
            return alpha * eps - sigma * x0
        if self.kind == "sample":
            return x0
        return x0 - eps


@pytest.mark.parametrize("method", SAMPLERS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_samplers_reach_the_data_from_any_parametrisation(method, prediction_type):
    x0 = torch.linspace(-0.8, 0.8, 64).reshape(1, 1, 4, 4, 4)
    sampler = DiffusionSampler(method, steps=8, prediction_type=prediction_type, progress=False)
    out = sampler(Oracle(x0, prediction_type), (1, 1, 4, 4, 4), seed=5)
    assert torch.allclose(out, x0, atol=2e-2), float((out - x0).abs().max())


@pytest.mark.parametrize("method", SAMPLERS)
def test_sampler_is_deterministic_for_a_seed(method):
    model = tiny_model()
    extra = torch.rand(1, 3, 8, 8, 8)
    sampler = DiffusionSampler(method, steps=4, guidance_scale=2.0, progress=False)
    a = sampler(model, (1, 1, 8, 8, 8), condition=condition(), extra=extra, seed=11)
    b = sampler(model, (1, 1, 8, 8, 8), condition=condition(), extra=extra, seed=11)
    c = sampler(model, (1, 1, 8, 8, 8), condition=condition(), extra=extra, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_guidance_batches_null_and_real_condition():
    probe = Probe()
    cond = condition()
    DiffusionSampler("ddim", steps=3, guidance_scale=1.0, progress=False)(probe, (1, 1, 4, 4, 4), condition=cond)
    assert len(probe.calls) == 3 and all(c["x"].shape[0] == 1 for c in probe.calls)  # one evaluation per step
    probe.calls.clear()
    guided = DiffusionSampler("ddim", steps=3, guidance_scale=3.0, progress=False)
    guided(probe, (1, 1, 4, 4, 4), condition=cond, extra=torch.ones(1, 2, 4, 4, 4))
    assert len(probe.calls) == 3 and guided.network_calls == 3  # the sampler counts what it called
    guided(probe, (1, 1, 4, 4, 4), condition=cond, extra=torch.ones(1, 2, 4, 4, 4))
    assert guided.network_calls == 6 == len(probe.calls)  # counted across samples
    first = probe.calls[0]
    assert first["x"].shape[0] == 2 and first["extra"].shape[0] == 2
    assert not first["context"][0].any() and torch.equal(first["context"][1:], cond)


class SplitModel(nn.Module):
    """Predicts noise ``u`` without a condition and ``c`` with one, to check the guidance arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.outputs: list[torch.Tensor] = []

    def forward(self, x, timesteps, context=None, extra=None):
        has = context.flatten(1).any(1).float().view(-1, 1, 1, 1, 1)
        return 0.1 * (1 - has) + 0.3 * has + 0 * x


def test_guidance_scale_combines_outputs():
    model = SplitModel()
    seen: list[torch.Tensor] = []
    sampler = DiffusionSampler("ddim", steps=1, guidance_scale=2.5, clip_sample=False, progress=False)
    original = sampler.model_space.to_x0_eps

    def spy(out, x, t):
        seen.append(out)
        return original(out, x, t)

    sampler.model_space.to_x0_eps = spy  # type: ignore[method-assign]
    sampler(model, (1, 1, 2, 2, 2), condition=condition())
    assert torch.allclose(seen[0], torch.full((1, 1, 2, 2, 2), 0.1 + 2.5 * (0.3 - 0.1)))


def test_known_region_is_kept_and_shown_to_the_network():
    probe = Probe(0.2)
    known = torch.rand(1, 1, 4, 4, 4)
    mask = torch.zeros_like(known)
    mask[..., 2:] = 1
    out = DiffusionSampler("rflow", steps=4, progress=False)(
        probe, (1, 1, 4, 4, 4), known=known, known_mask=mask, seed=0
    )
    assert torch.equal(out[..., 2:], known[..., 2:])
    assert not torch.equal(out[..., :2], known[..., :2])
    assert all(torch.equal(c["x"][..., 2:], known[..., 2:]) for c in probe.calls)


def test_sampler_argument_errors():
    with pytest.raises(LesionDiffusionError, match="unknown sampler"):
        DiffusionSampler("euler")
    with pytest.raises(LesionDiffusionError, match="steps"):
        DiffusionSampler("ddim", steps=0)
    with pytest.raises(LesionDiffusionError, match="shape"):
        DiffusionSampler("ddim", steps=2, progress=False)(tiny_model())


def test_trainer_ema_checkpoint_and_load_weights(tmp_path):
    """A real SupervisedTrainer run with the pieces wired as the bundles wire them."""
    model = tiny_model()
    sched = training_scheduler("epsilon")
    torch.manual_seed(1)
    data = [
        {
            "image": torch.rand(1, 8, 8, 8) * 2 - 1,
            "e": torch.rand(3, 8, 8, 8),
            "w": torch.ones(1, 8, 8, 8),
            "condition": condition()[0],
        }
        for _ in range(4)
    ]
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    ema = EMAHandler(model, momentum=0.5)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=model,
        optimizer=optimizer,
        loss_function=WeightedLoss(),
        inferer=ConditionedDiffusionInferer(sched),
        prepare_batch=ConditionedDiffusionPrepareBatch(sched, extra_keys=("e",), weight_key="w"),
        train_handlers=[ema],
    )
    objects = {"network": model, "optimizer": optimizer, "trainer": trainer, "ema": ema.ema_model}
    LastCheckpointSaver(tmp_path, objects).attach(trainer)
    LastCheckpointSaver(tmp_path, ema.ema_model, interval=3, epoch_level=False, filename="model.pt").attach(trainer)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.run()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4 and set(state) == set(objects)
    assert not list(tmp_path.glob(".checkpoint_last*"))  # no temporary left behind
    fresh = tiny_model()
    load_weights(fresh, tmp_path / "checkpoint_last.pt")  # prefers the EMA weights
    for a, b in zip(fresh.state_dict().values(), ema.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    plain = torch.load(tmp_path / "model.pt", weights_only=True)  # the weights file inference takes
    assert list(plain) == list(ema.ema_model.state_dict())
    fresh = load_weights(tiny_model(), tmp_path / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ema.ema_model.state_dict().values()))
    ddp_style = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"network": ddp_style}, tmp_path / "ddp.pt")
    load_weights(fresh, tmp_path / "ddp.pt", checkpoint_keys=("network",))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_load_weights_errors(tmp_path):
    with pytest.raises(InputError, match="missing.pt: weights file not found; set checkpoint"):
        load_weights(tiny_model(), tmp_path / "missing.pt", setting="checkpoint")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(InputError, match="not a loadable weights file"):
        load_weights(tiny_model(), tmp_path / "junk.pt")
    torch.save({"ema": {"w": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="do not fit this network") as err:
        load_weights(tiny_model(), tmp_path / "other.pt")
    assert 'Missing key(s) in state_dict: "' in str(err.value) and "\n" not in str(err.value)  # which keys, on one line
