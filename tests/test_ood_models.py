"""Tests of the OOD reconstruction models: ALI and the plain autoencoder (64 px, tiny widths)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cxrbench.models.ali import (
    ALI,
    FAKE_TARGET_RANGE,
    REAL_TARGET_RANGE,
    ali_train_step,
    chance_discriminator_loss,
    make_ali_optimizers,
    sample_smoothed_labels,
)
from cxrbench.models.autoencoder import ConvAutoencoder, ae_train_step, autoencoder_loss
from cxrbench.ood.scoring import OODModel

WIDTH = 8  # tiny conv trunks keep the tests fast



def smooth_blobs(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 64, 64) float32 in [0, 1]: one or two Gaussian blobs per image."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, 64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = torch.zeros(n, 1, 64, 64)
    for i in range(n):
        for _ in range(2):
            cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
            width = 0.2 + 0.3 * float(torch.rand(1, generator=g))
            images[i, 0] += torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
    return (images / images.amax(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)


def tiny_ali(latent_dim: int = 16, **kwargs) -> ALI:
    torch.manual_seed(0)
    return ALI(latent_dim=latent_dim, base_channels=WIDTH, disc_hidden=32, **kwargs)


def tiny_ae(latent_dim: int = 16) -> ConvAutoencoder:
    torch.manual_seed(0)
    return ConvAutoencoder(latent_dim=latent_dim, base_channels=WIDTH)


def test_autoencoder_shapes_ranges_and_protocol() -> None:
    model = tiny_ae().eval()
    x = smooth_blobs(3)
    z = model.encode(x)
    recon = model.reconstruct(x)
    assert z.shape == (3, 16)
    assert recon.shape == (3, 1, 64, 64)
    recon = recon.detach()
    assert 0.0 <= float(recon.min()) and float(recon.max()) <= 1.0
    assert torch.equal(model.latent_mean(x), z)
    assert model.latent_dim == 16 and model.image_size == 64
    assert isinstance(model, OODModel)


@pytest.mark.parametrize("latent_dim", [64, 512])
def test_ali_shapes_and_ranges(latent_dim: int) -> None:
    model = tiny_ali(latent_dim).eval()
    x = smooth_blobs(2)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, latent_dim)
    decoded = model.decode(torch.randn(2, latent_dim)).detach()
    assert decoded.shape == (2, 1, 64, 64)
    assert 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0
    assert model.discriminate(x, mu).shape == (2,)
    assert torch.equal(model.latent_mean(x), mu)
    assert isinstance(model, OODModel) and model.image_size == 64


def test_ali_reconstruct_is_deterministic_and_sample_is_not() -> None:
    model = tiny_ali().eval()
    x = smooth_blobs(2)
    first, second = model.reconstruct(x), model.reconstruct(x)
    assert torch.equal(first, second)
    assert torch.equal(first, model.decode(model.encode(x)[0]))
    sampled = model.reconstruct(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, first)


def test_ali_spectral_norm_option_wraps_discriminator_layers() -> None:
    plain, normed = tiny_ali(), tiny_ali(spectral_norm=True)
    assert not any("parametrizations" in name for name, _ in plain.discriminator.named_parameters())
    assert any("parametrizations" in name for name, _ in normed.discriminator.named_parameters())
    assert normed.discriminate(smooth_blobs(2), torch.randn(2, 16)).shape == (2,)


@pytest.mark.parametrize("model_factory", [tiny_ae, tiny_ali])
def test_models_reject_wrong_input(model_factory) -> None:
    model = model_factory().eval()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.reconstruct(smooth_blobs(2) * 255)
    with pytest.raises(ValueError, match="shape"):
        model.reconstruct(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        model.reconstruct(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        model.reconstruct(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="latent_dim"):
        type(model)(latent_dim=0)


def test_autoencoder_train_step_reduces_loss() -> None:
    model = tiny_ae()
    x = smooth_blobs(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = [ae_train_step(model, opt, x) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3


def test_autoencoder_mse_ssim_loss_is_zero_for_perfect_recon() -> None:
    x = smooth_blobs(2)
    assert float(autoencoder_loss(x, x, kind="mse+ssim")) == pytest.approx(0.0, abs=1e-6)
    assert float(autoencoder_loss(x, 1 - x, kind="mse+ssim")) > 0.3
    with pytest.raises(ValueError, match="unknown autoencoder loss"):
        autoencoder_loss(x, x, kind="huber")


def test_ali_train_step_reduces_reconstruction_error() -> None:
    model = tiny_ali()
    x = smooth_blobs(8)
    opt_d, opt_g = make_ali_optimizers(model, lr=2e-3)
    g = torch.Generator().manual_seed(0)
    history = [ali_train_step(model, opt_d, opt_g, x, halt_threshold=None, generator=g) for _ in range(30)]
    assert set(history[0]) >= {"d_loss", "g_adv_loss", "recon_l1", "g_loss", "g_step_taken"}
    assert all(math.isfinite(h["d_loss"]) and math.isfinite(h["g_loss"]) for h in history)
    model.eval()
    with torch.no_grad():
        final = float((model.reconstruct(x) - x).abs().mean())
    assert final < 0.6 * history[0]["recon_l1"]


def test_smoothed_labels_lie_in_chester_ranges() -> None:
    g = torch.Generator().manual_seed(0)
    real = sample_smoothed_labels(20000, True, generator=g)
    fake = sample_smoothed_labels(20000, False, generator=g)
    assert REAL_TARGET_RANGE == (0.7, 1.1) and FAKE_TARGET_RANGE == (-0.1, 0.3)
    assert 0.7 <= float(real.min()) < 0.71 and 1.09 < float(real.max()) <= 1.1
    assert -0.1 <= float(fake.min()) < -0.09 and 0.29 < float(fake.max()) <= 0.3
    assert float(real.mean()) == pytest.approx(0.9, abs=0.01)
    assert float(fake.mean()) == pytest.approx(0.1, abs=0.01)


def test_chance_discriminator_loss_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    real = sample_smoothed_labels(100000, True, generator=g)
    fake = sample_smoothed_labels(100000, False, generator=g)
    monte_carlo = 0.5 * (float(((0.5 - real) ** 2).mean()) + float(((0.5 - fake) ** 2).mean()))
    assert chance_discriminator_loss("least_squares") == pytest.approx(monte_carlo, rel=0.01)
    assert chance_discriminator_loss("least_squares", smooth=False) == pytest.approx(0.25)
    assert chance_discriminator_loss("bce") == pytest.approx(math.log(2))


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def _step_copy(model: ALI, x: torch.Tensor, threshold) -> tuple[ALI, dict[str, float]]:
    clone = copy.deepcopy(model)
    opt_d, opt_g = make_ali_optimizers(clone)
    torch.manual_seed(1)
    out = ali_train_step(clone, opt_d, opt_g, x, halt_threshold=threshold, generator=torch.Generator().manual_seed(2))
    return clone, out


def test_halting_skips_generator_update_exactly_when_d_loss_exceeds_threshold() -> None:
    model, x = tiny_ali(), smooth_blobs(4)
    enc, dec, disc = _params(model.encoder), _params(model.decoder), _params(model.discriminator)
    _, reference = _step_copy(model, x, None)
    d_loss = reference["d_loss"]

    halted, out = _step_copy(model, x, d_loss - 1e-6)
    assert out["g_step_taken"] == 0.0 and math.isnan(out["g_loss"])
    assert out["d_loss"] == pytest.approx(d_loss)
    assert not _changed(enc, halted.encoder) and not _changed(dec, halted.decoder)
    assert _changed(disc, halted.discriminator)

    trained, out = _step_copy(model, x, d_loss + 1e-6)
    assert out["g_step_taken"] == 1.0 and math.isfinite(out["g_loss"])
    assert _changed(enc, trained.encoder) and _changed(dec, trained.decoder)
    assert all(p.requires_grad for p in trained.discriminator.parameters())


def test_ali_bce_loss_option_and_bad_options() -> None:
    model, x = tiny_ali(), smooth_blobs(4)
    opt_d, opt_g = make_ali_optimizers(model)
    out = ali_train_step(model, opt_d, opt_g, x, gan_loss="bce", halt_threshold=None)
    assert math.isfinite(out["d_loss"]) and out["d_loss"] > 0
    with pytest.raises(ValueError, match="gan_loss"):
        ali_train_step(model, opt_d, opt_g, x, gan_loss="wasserstein")
    with pytest.raises(ValueError, match="weights"):
        ali_train_step(model, opt_d, opt_g, x, recon_weight=-1.0)


def test_ali_optimizers_use_beta1_half_and_split_parameters() -> None:
    model = tiny_ali()
    opt_d, opt_g = make_ali_optimizers(model)
    assert opt_d.defaults["betas"] == (0.5, 0.999) == opt_g.defaults["betas"]
    d_ids = {id(p) for group in opt_d.param_groups for p in group["params"]}
    g_ids = {id(p) for group in opt_g.param_groups for p in group["params"]}
    assert not d_ids & g_ids
    assert d_ids | g_ids == {id(p) for p in model.parameters()}
