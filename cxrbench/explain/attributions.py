"""Integrated Gradients and SmoothGrad through captum, one map per target finding.

Both explain logits. Attributions (B, C, H, W) are reduced to one map per image by summing their
absolute values over channels, so maps are >= 0 and a 1-channel and a 3-channel model are
comparable.

* :class:`IntegratedGradients` (Sundararajan et al. 2017): the baseline is, by default, all zeros
  *in the model's input space*: a black image for inputs in [0, 1], the mean image for standardised
  inputs. Pass ``baseline=`` (a float or a tensor broadcastable to the input) to change it.
* :class:`SmoothGrad` (Smilkov et al. 2017): the mean absolute input gradient over ``n_samples``
  noisy copies of the input, noise std = ``noise_level`` x (max - min of the batch). The noise is
  drawn from a private, seeded generator state, so results are reproducible and the global torch
  RNG is left as it was.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from captum.attr import IntegratedGradients as CaptumIntegratedGradients
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from cxrbench.explain.base import Explainer, Targets, _check_logits, target_matrix


def _num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return _check_logits(model(x[:1]), x[:1]).shape[1]


def _channel_abs_sum(attribution: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) attribution -> (B, H, W) sum over channels of absolute values."""
    return attribution.detach().abs().sum(dim=1)


class IntegratedGradients(Explainer):
    """Integrated Gradients of each target logit (captum), channel-summed absolute values.

    Parameters
    ----------
    model : nn.Module
        Classifier returning (B, N) logits.
    n_steps : int
        Riemann steps along the straight path from the baseline to the input (default 32).
    baseline : float or torch.Tensor, optional
        Reference input; default 0 (see module docstring).
    method : str
        captum integration rule (default "gausslegendre").
    internal_batch_size : int, optional
        Path points evaluated per forward pass (default 8; bounds memory).
    **kwargs
        Post-processing options (``normalize``, ``sigma``, ``relu``).

    Returns (on call)
    -----------------
    (B, F, H, W) float32 >= 0 in logit units.
    """

    name: ClassVar[str] = "integrated_gradients"
    input_gradients_only: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        n_steps: int = 32,
        baseline: float | torch.Tensor | None = None,
        method: str = "gausslegendre",
        internal_batch_size: int | None = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        self.n_steps = n_steps
        self.baseline = baseline
        self.method = method
        self.internal_batch_size = internal_batch_size

    def _baseline_for(self, x: torch.Tensor) -> torch.Tensor:
        if self.baseline is None:
            return torch.zeros_like(x)
        baseline = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        try:
            return torch.broadcast_to(baseline, x.shape).clone()
        except RuntimeError as error:
            raise ValueError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to input {tuple(x.shape)}"
            ) from error

    def _compute(self, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        index = target_matrix(targets, x.shape[0], _num_outputs(self.model, x))
        integrator = CaptumIntegratedGradients(self.model)
        baseline = self._baseline_for(x)
        maps = []
        for j in range(index.shape[1]):
            attribution = integrator.attribute(
                x,
                baselines=baseline,
                target=index[:, j].tolist(),
                n_steps=self.n_steps,
                method=self.method,
                internal_batch_size=self.internal_batch_size,
            )
            maps.append(_channel_abs_sum(attribution))
        return torch.stack(maps, dim=1)


class SmoothGrad(Explainer):
    """SmoothGrad of each target logit: captum ``NoiseTunnel(Saliency)``, absolute gradients.

    Parameters
    ----------
    model : nn.Module
        Classifier returning (B, N) logits.
    n_samples : int
        Noisy copies per image (default 16).
    noise_level : float
        Noise standard deviation as a fraction of the batch's intensity range (default 0.15).
    seed : int
        Seed of the noise (default 0).
    batch_size : int, optional
        Noisy copies evaluated per forward pass (default 8; bounds memory).
    **kwargs
        Post-processing options (``normalize``, ``sigma``, ``relu``).

    Returns (on call)
    -----------------
    (B, F, H, W) float32 >= 0, logit units per unit input intensity.
    """

    name: ClassVar[str] = "smoothgrad"
    input_gradients_only: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        n_samples: int = 16,
        noise_level: float = 0.15,
        seed: int = 0,
        batch_size: int | None = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        self.n_samples = n_samples
        self.noise_level = float(noise_level)
        self.seed = int(seed)
        self.batch_size = batch_size

    def _compute(self, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        index = target_matrix(targets, x.shape[0], _num_outputs(self.model, x))
        tunnel = NoiseTunnel(Saliency(self.model))
        stdev = self.noise_level * float(x.max() - x.min())
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        maps = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            for j in range(index.shape[1]):
                attribution = tunnel.attribute(
                    x,
                    nt_type="smoothgrad",
                    nt_samples=self.n_samples,
                    nt_samples_batch_size=self.batch_size,
                    stdevs=stdev,
                    target=index[:, j].tolist(),
                    abs=True,
                )
                maps.append(_channel_abs_sum(attribution))
        return torch.stack(maps, dim=1)
