"""Plain convolutional autoencoder: at 64x64 for the out-of-distribution (OOD) gate, at the classifier's
resolution (any multiple of 16 from 32 px) for Latent Shift counterfactuals (:mod:`cxrbench.explain.latent_shift`).

The encoder and decoder trunks defined here are shared with the ALI model
(:mod:`cxrbench.models.ali`), so both OOD models have the same capacity and
differ only in how they are trained.

Both models follow the small protocol that :mod:`cxrbench.ood.scoring` relies on:

- ``latent_mean(x)``: (B, 1, 64, 64) float in [0, 1] -> (B, Z) float latent
  (the deterministic latent for the autoencoder, the Gaussian mean for ALI);
- ``reconstruct(x)``: (B, 1, 64, 64) float in [0, 1] -> (B, 1, 64, 64) in [0, 1];
- ``latent_dim`` (int) and ``image_size`` (= 64).

Note that ``encode`` is *not* part of the protocol: for ALI it returns the pair
``(mu, logvar)``, for the autoencoder the latent itself.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from torch import nn

IMAGE_SIZE = 64
_TRUNK_STRIDE = 16  # four stride-2 convolutions: the trunk's side is image_size / 16


def trunk_spatial(image_size: int) -> int:
    """Side of the trunk's feature map for a square input of ``image_size`` px (a multiple of 16, >= 32)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32 or image_size % _TRUNK_STRIDE:
        raise ValueError(f"image_size must be a multiple of 16 and >= 32 (four stride-2 convolutions), "
                         f"got {image_size!r}")
    return image_size // _TRUNK_STRIDE


def check_image_batch(x: torch.Tensor, image_size: int = IMAGE_SIZE) -> None:
    """Raise a clear error unless ``x`` is a (B, 1, image_size, image_size) float batch in [0, 1].

    Parameters
    ----------
    x : torch.Tensor
        Candidate batch.
    image_size : int
        Required height and width in pixels.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point image batch in [0, 1], got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != (image_size, image_size):
        raise ValueError(f"expected an image batch of shape (B, 1, {image_size}, {image_size}), got {tuple(x.shape)}")
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(
            f"image values must lie in [0, 1], got min {float(x.min()):.4g}, max {float(x.max()):.4g}"
            " (0-255 or mean/std-normalised input?)"
        )


def _check_latent_dim(latent_dim: int) -> None:
    if not isinstance(latent_dim, int) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")


class ConvEncoder64(nn.Module):
    """Four stride-2 conv blocks (64 -> 4 px; ``image_size`` -> ``image_size / 16``) then a linear head.

    Parameters
    ----------
    out_features : int
        Size of the linear output (Z for a deterministic latent, 2Z for mean and log-variance).
    base_channels : int
        Channels of the first block; doubled at every block (C, 2C, 4C, 8C).
    image_size : int
        Input side in pixels (default 64; a multiple of 16).
    """

    def __init__(self, out_features: int, base_channels: int = 32, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        c = base_channels
        layers: list[nn.Module] = [nn.Conv2d(1, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in [(c, 2 * c), (2 * c, 4 * c), (4 * c, 8 * c)]:
            layers += [
                nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8 * c * trunk_spatial(image_size) ** 2, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) -> (B, out_features)."""
        return self.head(self.features(x).flatten(1))


class ConvDecoder64(nn.Module):
    """Linear projection to 4x4 then four stride-2 transposed convs to (B, 1, 64, 64) in [0, 1].

    Parameters
    ----------
    latent_dim : int
        Size Z of the input code.
    base_channels : int
        Channels of the last hidden block (mirrors :class:`ConvEncoder64`).
    image_size : int
        Output side in pixels (default 64; a multiple of 16).
    """

    def __init__(self, latent_dim: int, base_channels: int = 32, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        c = base_channels
        self.base_channels = c
        self.spatial = side = trunk_spatial(image_size)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, 8 * c * side**2, bias=False),
            nn.BatchNorm1d(8 * c * side**2),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        for c_in, c_out in [(8 * c, 4 * c), (4 * c, 2 * c), (2 * c, c)]:
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ConvTranspose2d(c, 1, 4, stride=2, padding=1), nn.Sigmoid()]
        self.features = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) -> (B, 1, 64, 64) float in [0, 1]."""
        h = self.project(z).view(z.shape[0], 8 * self.base_channels, self.spatial, self.spatial)
        return self.features(h)


class ConvAutoencoder(nn.Module):
    """Deterministic convolutional autoencoder for 1-channel square images in [0, 1] (64 px by default).

    Parameters
    ----------
    latent_dim : int
        Size Z of the latent code (Chester searched 64-512 for ALI; default 128).
    base_channels : int
        Width of the conv trunks: 16 (~0.9 M parameters) is the CPU default (measured:
        289 steps in 45 s reached a held-out SSIM of 0.71 vs 0.68 for width 32 in 60 s);
        use 32 on a GPU.
    image_size : int
        Input and output side in pixels: 64 for the OOD gate, the classifier's input size for Latent Shift
        (a multiple of 16, >= 32). The methods below say 64 for the default.
    """

    def __init__(self, latent_dim: int = 128, base_channels: int = 16, image_size: int = IMAGE_SIZE) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        self.latent_dim = latent_dim
        self.image_size = image_size
        self.encoder = ConvEncoder64(latent_dim, base_channels, image_size)
        self.decoder = ConvDecoder64(latent_dim, base_channels, image_size)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 64, 64) float in [0, 1] -> latent (B, Z)."""
        check_image_batch(x, self.image_size)
        return self.encoder(x)

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        """OOD-protocol latent: the deterministic code, (B, Z)."""
        return self.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) -> (B, 1, 64, 64) float in [0, 1]."""
        return self.decoder(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): (B, 1, 64, 64) in [0, 1] -> (B, 1, 64, 64) in [0, 1]."""
        return self.decode(self.encode(x))

    def reconstruct_with_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruct(x), latent_mean(x))`` from one pass of the encoder (the OOD gate's scores need both)."""
        z = self.encode(x)
        return self.decode(z), z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`reconstruct`."""
        return self.reconstruct(x)


#: the reconstruction losses :func:`autoencoder_loss` knows
AE_LOSSES: tuple[str, ...] = ("l1", "mse", "mse+ssim")


def autoencoder_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    kind: Literal["l1", "mse", "mse+ssim"] = "l1",
    ssim_weight: float = 0.5,
) -> torch.Tensor:
    """Scalar reconstruction loss between two (B, 1, H, W) batches in [0, 1].

    ``"mse+ssim"`` is ``(1 - ssim_weight) * MSE + ssim_weight * (1 - SSIM)`` with
    pytorch-msssim's SSIM at ``data_range=1.0`` and an 11-px Gaussian window.
    """
    if kind == "l1":
        return F.l1_loss(recon, x)
    if kind == "mse":
        return F.mse_loss(recon, x)
    if kind == "mse+ssim":
        if not 0.0 <= ssim_weight <= 1.0:
            raise ValueError(f"ssim_weight must lie in [0, 1], got {ssim_weight}")
        structural = 1.0 - ssim(recon, x, data_range=1.0, win_size=11, size_average=True)
        return (1.0 - ssim_weight) * F.mse_loss(recon, x) + ssim_weight * structural
    raise ValueError(f"unknown autoencoder loss {kind!r}; choose one of {AE_LOSSES}")


def ae_train_step(
    model: ConvAutoencoder,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    loss: Literal["l1", "mse", "mse+ssim"] = "l1",
) -> float:
    """One optimisation step of the autoencoder on a batch.

    Parameters
    ----------
    model : ConvAutoencoder
        Put in train mode by this function.
    opt : torch.optim.Optimizer
        Optimiser over ``model.parameters()`` (Adam, lr 1e-3 works at 64 px).
    x : torch.Tensor
        (B, 1, 64, 64) float in [0, 1], B >= 2 (batch norm).
    loss : {"l1", "mse", "mse+ssim"}
        Reconstruction loss, see :func:`autoencoder_loss`.

    Returns
    -------
    float
        The loss before the update.
    """
    check_image_batch(x, model.image_size)
    model.train()
    opt.zero_grad(set_to_none=True)
    value = autoencoder_loss(x, model.reconstruct(x), kind=loss)
    value.backward()
    opt.step()
    return float(value.detach())
