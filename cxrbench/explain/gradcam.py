"""Grad-CAM (Selvaraju et al. 2017; report Eqs. 1-2).

    alpha_k^c = (1 / Z) sum_ij  d y^c / d A_ij^k
    L^c       = ReLU( sum_k alpha_k^c A^k )

with A the output of the target layer (DenseNet: ``features``, before the functional ReLU;
ResNet: ``layer4``), y^c the logit of finding c and Z the number of feature-map pixels. The
gradient is taken with :func:`torch.autograd.grad` on the captured activation, one backward pass
per target finding (shared by the whole batch, since images do not interact in eval mode).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from cxrbench.explain.base import Explainer, Targets, selected_logit_sum


class GradCAM(Explainer):
    """Gradient-weighted Class Activation Map.

    Parameters
    ----------
    model : nn.Module
        Classifier returning (B, N) logits.
    target_layer : nn.Module, optional
        Layer producing (B, K, h, w) features; found by attribute name when omitted.
    **kwargs
        Post-processing options (``normalize``, ``sigma``, ``relu``).

    Returns (on call)
    -----------------
    (B, F, H, W) float32 >= 0 in logit units, bilinearly upsampled from (h, w).
    """

    name: ClassVar[str] = "gradcam"
    uses_target_layer: ClassVar[bool] = True
    records_logits: ClassVar[bool] = True

    def _compute(self, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        # The input requires grad so the activation has a graph even for a fully frozen model.
        logits, activations = self._forward_with_features(x.clone().requires_grad_(True))
        if activations.ndim != 4:
            raise ValueError(f"Grad-CAM needs (B, K, h, w) features, got {tuple(activations.shape)}")
        index = self._target_index(logits, targets)
        maps = []
        n_targets = index.shape[1]
        for j in range(n_targets):
            (gradient,) = torch.autograd.grad(
                selected_logit_sum(logits, index[:, j]), activations, retain_graph=j < n_targets - 1
            )
            alpha = gradient.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
            maps.append(F.relu((alpha * activations).sum(dim=1)).detach())
        return torch.stack(maps, dim=1)
