"""The VQ-GAN autoencoder API (lesiondiffusion.autoencoder): presets, padding, latent scale, tiling, weights."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import SimpleInferer
from monai.networks.nets import VQVAE, PatchDiscriminator

from lesiondiffusion import autoencoder as ae
from lesiondiffusion.errors import InputError, LesionDiffusionError


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A [1, 1, *shape] volume in [0, 1] with structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((1, 1, *(max(2, s // 8) for s in shape)), generator=g)
    return torch.nn.functional.interpolate(low, size=shape, mode="trilinear", align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def net() -> VQVAE:
    """A cpu-preset VQVAE whose codebook is spread over its encoder's outputs, as after training.

    (An untrained codebook maps every encoding to one code, which would hide what the tests look for.)
    """
    torch.manual_seed(0)
    net = ae.build_vqvae("cpu").eval()
    with torch.no_grad():
        enc = net.encode(torch.cat([smooth_volume((64, 64, 64), seed) for seed in range(4)]))
        flat = enc.permute(0, 2, 3, 4, 1).reshape(-1, net.embedding_dim)
        q = net.quantizer.quantizer
        q.embedding.weight.copy_(flat[torch.randperm(len(flat))[: net.num_embeddings]])
        q.ema_cluster_size.fill_(1.0)
    return net


def test_presets_build_monai_networks_with_the_documented_sizes() -> None:
    paper, cpu = ae.build_vqvae("paper"), ae.build_vqvae("cpu")
    assert isinstance(paper, VQVAE) and isinstance(ae.build_discriminator("paper"), PatchDiscriminator)
    assert paper.channels == (96, 96) and paper.num_embeddings == 2048 and paper.embedding_dim == 4
    assert ae.downsample_factor(paper) == ae.downsample_factor("paper") == 2
    assert ae.downsample_factor(cpu) == ae.downsample_factor("cpu") == 4
    assert ae.preset_config("paper")["crop_size"] == (128, 128, 128) and ae.preset_config("cpu")["crop_size"] == (
        64,
        64,
        64,
    )
    n_params = sum(p.numel() for p in paper.parameters())
    assert 5e6 < n_params < 9e6  # the original's VQ-GAN has about 7 M parameters
    assert ae.build_vqvae("cpu", num_embeddings=64).num_embeddings == 64  # overrides replace preset values


def test_unknown_preset_is_a_one_line_error() -> None:
    with pytest.raises(LesionDiffusionError, match="unknown VQ-GAN preset 'gpu'.*'cpu', 'paper'"):
        ae.build_vqvae("gpu")


def test_latent_shape_rounds_up() -> None:
    assert ae.latent_shape((67, 70, 45), 4) == (17, 18, 12)
    assert ae.latent_shape((64, 64, 64), 4) == (16, 16, 16)
    assert ae.latent_shape((129, 128, 1), 2) == (65, 64, 1)


def test_encode_decode_odd_shape_keeps_every_voxel(net: VQVAE) -> None:
    x = smooth_volume((67, 70, 45))
    z = ae.encode(net, x)
    assert z.shape == (1, net.embedding_dim, 17, 18, 12)
    y = ae.decode(net, z, x.shape[2:])
    assert y.shape == x.shape
    # the last plane of each axis reaches the latent (the original lost a voxel on odd sizes)
    for axis in (2, 3, 4):
        x2 = x.clone()
        x2.select(axis, x.shape[axis] - 1).fill_(1.0)
        assert not torch.equal(ae.encode(net, x2), z), f"last plane of axis {axis} ignored"


def test_encode_is_deterministic_and_leaves_the_network_untouched() -> None:
    torch.manual_seed(1)
    net = ae.build_vqvae("cpu").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = smooth_volume((32, 32, 32))
    z1, z2 = ae.encode(net, x), ae.encode(net, x)
    assert torch.equal(z1, z2) and not z1.requires_grad
    assert net.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no EMA codebook update


def test_decode_of_encode_matches_the_vqvae_forward(net: VQVAE) -> None:
    x = smooth_volume((32, 48, 40))
    with torch.no_grad():
        expected, _ = net(x)
    assert torch.allclose(ae.decode(net, ae.encode(net, x), x.shape[2:]), expected, atol=1e-5)
    assert torch.allclose(ae.reconstruct(net, x), expected, atol=1e-5)
    assert torch.allclose(SimpleInferer()(x, ae.Reconstructor(net)), expected, atol=1e-5)


def test_latent_is_standardised_by_the_codes_training_used() -> None:
    torch.manual_seed(2)
    net = ae.build_vqvae("cpu").eval()
    q = net.quantizer.quantizer
    with torch.no_grad():
        q.embedding.weight[0] = 1e4  # an unused code with a runaway value must not set the scale
        q.ema_cluster_size.zero_()
        q.ema_cluster_size[1:] = torch.rand(net.num_embeddings - 1) + 0.5  # uneven usage
    mean, std = ae.latent_stats(net)
    used, p = q.embedding.weight[1:].double(), (q.ema_cluster_size[1:] / q.ema_cluster_size[1:].sum()).double()
    expected_mean = (p[:, None] * used).sum(0)
    assert torch.allclose(mean.double(), expected_mean, atol=1e-5)
    assert torch.allclose(std.double(), (p[:, None] * (used - expected_mean) ** 2).sum(0).sqrt(), atol=1e-5)
    # codes drawn as often as training used them come out with zero mean and unit variance per channel
    draws = torch.multinomial(
        q.ema_cluster_size.double(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    codes = q.embedding.weight[draws].T.reshape(1, net.embedding_dim, 200_000, 1, 1)
    z = (codes - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    assert torch.allclose(z.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=0.02)
    assert torch.allclose(z.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=0.02)
    # encode applies exactly that map to the quantised embedding, and decode inverts it
    x = smooth_volume((32, 32, 32))
    e = net.encode_stage_2_inputs(x)
    assert torch.allclose(ae.encode(net, x), (e - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), atol=1e-5)
    z = ae.encode(net, x)
    assert torch.allclose(ae.decode(net, z, (32, 32, 32)), net.decode_stage_2_outputs(e), atol=1e-5)
    # a latent perturbed by less than half a code spacing decodes to the same image (snaps to the codebook)
    assert torch.allclose(ae.decode(net, z + 1e-6, (32, 32, 32)), ae.decode(net, z, (32, 32, 32)))


def test_an_untrained_codebook_weighs_every_code_equally() -> None:
    torch.manual_seed(3)
    net = ae.build_vqvae("cpu").eval()
    net.quantizer.quantizer.ema_cluster_size.zero_()
    codes = net.quantizer.quantizer.embedding.weight.detach()
    mean, std = ae.latent_stats(net)
    assert torch.allclose(mean, codes.mean(0), atol=1e-5)
    assert torch.allclose(std, codes.std(0, unbiased=False), atol=1e-5)


def test_decode_rejects_a_latent_of_the_wrong_shape(net: VQVAE) -> None:
    with pytest.raises(LesionDiffusionError, match=r"does not match an image of shape \(67, 70, 45\)"):
        ae.decode(net, torch.zeros(1, 4, 16, 18, 12), (67, 70, 45))
    with pytest.raises(LesionDiffusionError, match="must be a \\[B, C, \\*spatial\\] tensor"):
        ae.encode(net, torch.zeros(64, 64, 64))


def test_tiled_reconstruction_keeps_odd_shapes(net: VQVAE) -> None:
    x = smooth_volume((67, 70, 45))
    y = ae.reconstruct_tiled(net, x, roi_size=(48, 48, 48), overlap=0.25)  # 2 x 2 x 1 tiles
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    small = smooth_volume((20, 30, 25))  # smaller than one tile
    assert ae.reconstruct_tiled(net, small, roi_size=32).shape == small.shape


def test_tiles_without_overlap_equal_per_block_reconstructions(net: VQVAE) -> None:
    x = smooth_volume((64, 32, 32))
    tiled = ae.reconstruct_tiled(net, x, roi_size=(32, 32, 32), overlap=0.0, mode="constant")
    for i in (0, 32):
        block = x[..., i : i + 32, :, :]
        assert torch.allclose(tiled[..., i : i + 32, :, :], ae.reconstruct(net, block), atol=1e-5)


def test_load_vqvae_round_trip_and_errors(net: VQVAE, tmp_path) -> None:
    plain = tmp_path / "model.pt"
    torch.save(net.state_dict(), plain)
    ckpt = tmp_path / "checkpoint_last.pt"
    torch.save({"autoencoder": net.state_dict(), "trainer": {"iteration": 3}}, ckpt)
    x = smooth_volume((32, 32, 32))
    for path in (plain, str(ckpt)):
        loaded = ae.load_vqvae(path, "cpu")
        assert not loaded.training
        saved, got = net.state_dict(), loaded.state_dict()
        assert set(got) == set(saved) and all(torch.equal(got[k], saved[k]) for k in saved)  # every tensor, as saved
        assert torch.equal(ae.encode(loaded, x), ae.encode(net, x))
    with pytest.raises(InputError, match=r"missing\.pt: VQ-GAN weights file not found; set vqgan_weights"):
        ae.load_vqvae(tmp_path / "missing.pt", key="vqgan_weights")
    with pytest.raises(
        InputError,
        match=r"model\.pt: VQ-GAN weights do not fit this network \(different preset.*check autoencoder_weights",
    ):
        ae.load_vqvae(plain, "paper")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"bad\.pt: not a loadable VQ-GAN weights file"):
        ae.load_vqvae(bad)
