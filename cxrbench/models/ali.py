"""Adversarially Learned Inference (ALI / BiGAN) at 64x64 for the OOD gate (Chester §3).

ALI (Dumoulin et al., 2017; Donahue et al., 2017 "BiGAN") trains an encoder
E: x -> z, a generator/decoder G: z -> x and a discriminator on *pairs*
(x, z) that tells encoder pairs (x, E(x)) from generator pairs (G(z), z),
z ~ N(0, I). Chester uses the reconstruction G(E(x)) to score how far an image
lies from the training distribution (see :mod:`cxrbench.ood.scoring`).

Choices made here (documented, each can be changed by an argument):

- **Loss form.** Chester's label smoothing draws real targets from U[0.7, 1.1]
  and fake targets from U[-0.1, 0.3] (after Salimans et al., 2016). Targets
  outside [0, 1] are not probabilities, so binary cross-entropy is undefined
  for them (with a target > 1 the BCE keeps decreasing as the logit grows and
  has no minimum). The default is therefore the least-squares GAN loss
  (Mao et al., 2017): the discriminator's raw output regresses onto the noisy
  targets with a mean squared error, which is well defined for any real target.
  ``gan_loss="bce"`` is offered too; it clamps the sampled targets into [0, 1]
  (so a share of real targets becomes exactly 1 and of fake ones exactly 0).
- **Smoothing side.** Only the discriminator's targets are smoothed; the
  encoder/generator step uses hard 0/1 targets (label flipping), as in
  Salimans et al.
- **Halting.** Chester "halt[s] training of the generator when its performance
  becomes too good". Here the encoder/generator update of a step is skipped
  when the discriminator's loss on that batch exceeds ``halt_threshold``: by
  default the loss of a discriminator that cannot tell the pairs apart and
  outputs a constant (chance level, :func:`chance_discriminator_loss`).
- **Optimiser.** Adam with beta1 = 0.5. Chester writes beta2 = 1e-3, surely a
  typo for 0.999 (a beta2 of 0.001 makes Adam's second-moment estimate follow
  single steps); the default here is 0.999.
- **Reconstruction term.** Pure ALI reconstructs poorly until trained for a
  very long time (Chester: 2.1 M iterations; ALICE, Li et al. 2017, shows the
  (x, z) matching alone does not pin down reconstructions). An explicit L1
  reconstruction term ``recon_weight * |G(mu(x)) - x|`` is added to the
  encoder/generator loss, as in ALICE's explicit cycle-consistency. Its default
  (:data:`DEFAULT_RECON_WEIGHT` = 5, about the size of the adversarial loss)
  makes a few-minute CPU run yield usable reconstructions while the adversarial
  term still shapes the latent; set it to 0 for pure ALI. ``latent_weight``
  optionally adds the latent cycle ``|E(G(z)).mu - z|^2``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cxrbench.models.autoencoder import (
    IMAGE_SIZE,
    ConvDecoder64,
    ConvEncoder64,
    _check_latent_dim,
    check_image_batch,
)

REAL_TARGET_RANGE: tuple[float, float] = (0.7, 1.1)
"""Chester's smoothed targets for encoder pairs (x, E(x)), sampled uniformly."""
FAKE_TARGET_RANGE: tuple[float, float] = (-0.1, 0.3)
"""Chester's smoothed targets for generator pairs (G(z), z), sampled uniformly."""
DEFAULT_RECON_WEIGHT = 5.0
"""Weight of the L1 reconstruction term in the encoder/generator loss (see module docstring).

At the start of training the per-pixel L1 is ~0.1 and the least-squares adversarial
loss ~0.5, so a weight of 5 gives the two terms similar size. Measured on 400 NIH
CXRs at 64 px, 120 CPU steps (batch 32, lr 5e-4): median held-out SSIM of the
reconstruction 0.20 with weight 0 (pure ALI), 0.30 with 1, 0.41-0.48 with 5,
0.50-0.53 with 10."""

GanLoss = Literal["least_squares", "bce"]


class ALIDiscriminator(nn.Module):
    """Joint discriminator D(x, z): conv branch for x, MLP branch for z, joint MLP.

    Parameters
    ----------
    latent_dim : int
        Size Z of the code.
    base_channels : int
        Channels of the first conv block of the x branch (C, 2C, 4C, 8C).
    hidden : int
        Width of the z branch; the joint MLP has ``2 * hidden`` units.
    dropout : float
        Dropout probability after every hidden layer (ALI uses 0.2).
    spectral_norm : bool
        Wrap every conv/linear layer in spectral normalisation (Miyato et al., 2018).
    """

    def __init__(
        self,
        latent_dim: int,
        base_channels: int = 32,
        hidden: int = 256,
        dropout: float = 0.2,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")

        def sn(layer: nn.Module) -> nn.Module:
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        c = base_channels
        x_layers: list[nn.Module] = []
        for c_in, c_out in [(1, c), (c, 2 * c), (2 * c, 4 * c), (4 * c, 8 * c)]:
            x_layers += [sn(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
        self.x_branch = nn.Sequential(*x_layers, nn.Flatten())
        self.z_branch = nn.Sequential(
            sn(nn.Linear(latent_dim, hidden)),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            sn(nn.Linear(hidden, hidden)),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
        )
        self.joint = nn.Sequential(
            sn(nn.Linear(8 * c * 16 + hidden, 2 * hidden)),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            sn(nn.Linear(2 * hidden, 1)),
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) images and (B, Z) codes -> (B,) raw scores (logits for BCE)."""
        return self.joint(torch.cat([self.x_branch(x), self.z_branch(z)], dim=1)).squeeze(1)


class ALI(nn.Module):
    """ALI with a Gaussian encoder, a sigmoid decoder and a joint (x, z) discriminator.

    Parameters
    ----------
    latent_dim : int
        Size Z of the latent (Chester searched 64, 128, 256, 512; default 128).
    base_channels : int
        Width of all conv trunks. 16 (1.1 M encoder+decoder, 1.5 M discriminator parameters) is the CPU default:
        in equal wall-clock time it reconstructs better than 32, which suits GPU training.
    disc_hidden : int
        Width of the discriminator's z branch.
    dropout : float
        Discriminator dropout.
    spectral_norm : bool
        Spectral normalisation in the discriminator.
    logvar_bounds : tuple of float
        The encoder's log-variance is clamped to this range for numerical stability.
    """

    image_size: int = IMAGE_SIZE

    def __init__(
        self,
        latent_dim: int = 128,
        base_channels: int = 16,
        disc_hidden: int = 256,
        dropout: float = 0.2,
        spectral_norm: bool = False,
        logvar_bounds: tuple[float, float] = (-10.0, 4.0),
    ) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        self.latent_dim = latent_dim
        self.logvar_bounds = logvar_bounds
        self.encoder = ConvEncoder64(2 * latent_dim, base_channels)
        self.decoder = ConvDecoder64(latent_dim, base_channels)
        self.discriminator = ALIDiscriminator(latent_dim, base_channels, disc_hidden, dropout, spectral_norm)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 64, 64) float in [0, 1] -> (mu, logvar), each (B, Z)."""
        check_image_batch(x, self.image_size)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(*self.logvar_bounds)

    @staticmethod
    def sample_latent(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample z = mu + exp(logvar / 2) * eps, eps ~ N(0, I); (B, Z)."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        """OOD-protocol latent: the Gaussian mean mu(x), (B, Z)."""
        return self.encode(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) -> (B, 1, 64, 64) float in [0, 1]."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected codes of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        return self.decoder(z)

    def reconstruct(
        self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """G(E(x)): decodes mu(x) (deterministic) or, with ``sample=True``, a sampled z.

        Returns (B, 1, 64, 64) float in [0, 1]. Call ``model.eval()`` first so that batch
        norm uses its running statistics (the OOD scorers do).
        """
        mu, logvar = self.encode(x)
        return self.decode(self.sample_latent(mu, logvar, generator) if sample else mu)

    def reconstruct_with_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruct(x), latent_mean(x))`` from one pass of the encoder (the OOD gate's scores need both)."""
        mu = self.latent_mean(x)
        return self.decode(mu), mu

    def discriminate(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Raw discriminator score of pairs: (B, 1, 64, 64), (B, Z) -> (B,)."""
        return self.discriminator(x, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`reconstruct` with the mean code."""
        return self.reconstruct(x)

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the encoder and the decoder (updated together)."""
        yield from self.encoder.parameters()
        yield from self.decoder.parameters()

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the joint discriminator."""
        return self.discriminator.parameters()


def make_ali_optimizers(
    model: ALI, lr: float = 5e-4, betas: tuple[float, float] = (0.5, 0.999)
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam optimisers ``(opt_d, opt_g)`` for the discriminator and encoder+decoder.

    Chester used lr 1e-5 / 1e-6 over 2.1 M iterations. For CPU runs of a few hundred
    steps 5e-4 works (measured: with 2e-4 the discriminator wins, loss ~0.05, and
    reconstructions lag). beta2 = 0.999 (Chester's "1e-3" is taken as a typo).
    """
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=lr, betas=betas)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=lr, betas=betas)
    return opt_d, opt_g


def sample_smoothed_labels(
    n: int,
    real: bool,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Chester's noisy targets: (n,) float32, U[0.7, 1.1] if ``real`` else U[-0.1, 0.3]."""
    low, high = REAL_TARGET_RANGE if real else FAKE_TARGET_RANGE
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def chance_discriminator_loss(gan_loss: GanLoss = "least_squares", smooth: bool = True) -> float:
    """Expected discriminator loss of a constant output that cannot tell pairs apart.

    Least squares: the best constant is the mid target 0.5; with smoothing the loss is
    0.4^2 + 0.4^2 / 12 (bias^2 + variance of U over a 0.4-wide range) = 0.1733, without
    it 0.25. BCE: a logit of 0 costs log 2 whatever the targets are.
    """
    if gan_loss == "bce":
        return float(torch.log(torch.tensor(2.0)))
    if gan_loss == "least_squares":
        return 0.4**2 + 0.4**2 / 12 if smooth else 0.25
    raise ValueError(f"unknown gan_loss {gan_loss!r}; choose 'least_squares' or 'bce'")


def _adversarial_loss(scores: torch.Tensor, targets: torch.Tensor, gan_loss: GanLoss) -> torch.Tensor:
    if gan_loss == "least_squares":
        return F.mse_loss(scores, targets)
    if gan_loss == "bce":
        return F.binary_cross_entropy_with_logits(scores, targets.clamp(0.0, 1.0))
    raise ValueError(f"unknown gan_loss {gan_loss!r}; choose 'least_squares' or 'bce'")


def ali_train_step(
    model: ALI,
    opt_d: torch.optim.Optimizer,
    opt_g: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    smooth: bool = True,
    halt_threshold: float | Literal["chance"] | None = "chance",
    gan_loss: GanLoss = "least_squares",
    recon_weight: float = DEFAULT_RECON_WEIGHT,
    latent_weight: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One ALI step: a discriminator update, then (unless halted) an encoder/generator update.

    Parameters
    ----------
    model : ALI
        Put in train mode by this function.
    opt_d, opt_g : torch.optim.Optimizer
        Optimisers over ``model.discriminator_parameters()`` and
        ``model.generator_parameters()`` (see :func:`make_ali_optimizers`).
    x : torch.Tensor
        (B, 1, 64, 64) float in [0, 1], B >= 2.
    smooth : bool
        Chester's label smoothing of the discriminator targets.
    halt_threshold : float, "chance" or None
        Skip the encoder/generator update when this batch's discriminator loss
        (before its update) exceeds the threshold, i.e. the discriminator is being
        fooled. ``"chance"``: :func:`chance_discriminator_loss`; None: never halt.
    gan_loss : {"least_squares", "bce"}
        See the module docstring.
    recon_weight : float
        Weight of the L1 reconstruction term ``|G(mu(x)) - x|`` (0 = pure ALI).
    latent_weight : float
        Weight of the latent cycle term ``|E(G(z)).mu - z|^2``.
    generator : torch.Generator, optional
        Source of prior samples, reparameterisation noise and label noise.

    Returns
    -------
    dict of str to float
        ``d_loss``; ``recon_l1`` (L1 of G(mu(x)) before the update); ``g_adv_loss``
        and ``g_loss`` (NaN when halted); ``latent_mse`` (NaN unless
        ``latent_weight > 0`` and not halted); ``d_real_score`` / ``d_fake_score``
        (mean raw D output on encoder / generator pairs); ``g_step_taken`` (1.0 or 0.0).
    """
    check_image_batch(x, model.image_size)
    if recon_weight < 0 or latent_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got recon {recon_weight}, latent {latent_weight}")
    threshold = chance_discriminator_loss(gan_loss, smooth) if halt_threshold == "chance" else halt_threshold
    model.train()
    z_prior = torch.randn(x.shape[0], model.latent_dim, generator=generator, device=x.device)

    # One forward pass of encoder and decoder serves both updates: the discriminator
    # sees detached copies, the encoder/generator update backpropagates through them.
    mu, logvar = model.encode(x)
    z_hat = model.sample_latent(mu, logvar, generator=generator)
    x_tilde = model.decode(z_prior)
    recon_l1 = F.l1_loss(model.decode(mu), x)
    out = _discriminator_update(model, opt_d, x, z_hat, x_tilde, z_prior, smooth=smooth, gan_loss=gan_loss,
                                generator=generator)
    halted = threshold is not None and out["d_loss"] > threshold
    out.update(g_step_taken=0.0 if halted else 1.0, recon_l1=recon_l1.item(), g_adv_loss=float("nan"),
               latent_mse=float("nan"), g_loss=float("nan"))
    if not halted:
        out.update(_generator_update(model, opt_g, x, z_hat, x_tilde, z_prior, recon_l1, gan_loss=gan_loss,
                                     recon_weight=recon_weight, latent_weight=latent_weight))
    return out


def _discriminator_update(model: ALI, opt_d: torch.optim.Optimizer, x: torch.Tensor, z_hat: torch.Tensor,
                          x_tilde: torch.Tensor, z_prior: torch.Tensor, *, smooth: bool, gan_loss: GanLoss,
                          generator: torch.Generator | None) -> dict[str, float]:
    """One step of the discriminator: encoder pairs (x, E(x)) are "real", generator pairs (G(z), z) "fake"."""
    n = x.shape[0]
    if smooth:
        t_real = sample_smoothed_labels(n, True, generator=generator, device=x.device)
        t_fake = sample_smoothed_labels(n, False, generator=generator, device=x.device)
    else:
        t_real, t_fake = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
    d_real = model.discriminate(x, z_hat.detach())
    d_fake = model.discriminate(x_tilde.detach(), z_prior)
    d_loss = 0.5 * (_adversarial_loss(d_real, t_real, gan_loss) + _adversarial_loss(d_fake, t_fake, gan_loss))
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    return {"d_loss": d_loss.item(), "d_real_score": d_real.detach().mean().item(),
            "d_fake_score": d_fake.detach().mean().item()}


def _generator_update(model: ALI, opt_g: torch.optim.Optimizer, x: torch.Tensor, z_hat: torch.Tensor,
                      x_tilde: torch.Tensor, z_prior: torch.Tensor, recon_l1: torch.Tensor, *, gan_loss: GanLoss,
                      recon_weight: float, latent_weight: float) -> dict[str, float]:
    """One step of encoder and decoder: flipped hard targets against the updated, frozen discriminator."""
    n = x.shape[0]
    out: dict[str, float] = {}
    for p in model.discriminator_parameters():
        p.requires_grad_(False)
    try:
        ones, zeros = torch.ones(n, device=x.device), torch.zeros(n, device=x.device)
        g_adv = 0.5 * (
            _adversarial_loss(model.discriminate(x, z_hat), zeros, gan_loss)
            + _adversarial_loss(model.discriminate(x_tilde, z_prior), ones, gan_loss)
        )
        g_loss = g_adv + recon_weight * recon_l1
        if latent_weight > 0:
            latent_mse = F.mse_loss(model.encode(x_tilde)[0], z_prior)
            g_loss = g_loss + latent_weight * latent_mse
            out["latent_mse"] = latent_mse.item()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
    finally:
        for p in model.discriminator_parameters():
            p.requires_grad_(True)
    return {**out, "g_adv_loss": g_adv.item(), "g_loss": g_loss.item()}
