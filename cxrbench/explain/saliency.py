"""Chester's gradient saliency map (Chester Eq. 3; Simonyan et al. 2014, Lo & Cohen 2015).

For an input image I and logits y, Chester's "general explanation" is

    saliency = max(0, sum_i dy_i / dI)

summed over the chosen outputs i, one map per image. It needs a single backward pass however many
findings are summed. For inputs with C > 1 channels the gradient is summed over channels before the
``max(0, .)`` (a 3-channel copy of a grey image then gives the gradient with respect to the grey
value). The per-finding variant returns ``max(0, dy_i / dI)`` for each chosen output i (F backward
passes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cxrbench.explain.base import Explainer, Targets, _check_logits, selected_logit_sum


class ChesterSaliency(Explainer):
    """Input-gradient saliency of the logits, Chester Eq. 3.

    Parameters
    ----------
    model : nn.Module
        Classifier returning (B, N) logits.
    per_finding : bool
        False (default): one map per image, the chosen outputs summed (F = 1, "all findings").
        True: one map per chosen output (F = number of targets).
    **kwargs
        Post-processing options of :class:`~cxrbench.explain.base.Explainer`
        (``normalize``, ``sigma``, ``relu``).

    Returns (on call)
    -----------------
    (B, F, H, W) float32 >= 0, in logit units per unit input intensity.
    """

    name: ClassVar[str] = "saliency"
    records_logits: ClassVar[bool] = True
    input_gradients_only: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, per_finding: bool = False, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.per_finding = bool(per_finding)

    def _compute(self, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        image = x.clone().requires_grad_(True)
        logits = _check_logits(self.model(image), x)
        index = self._target_index(logits, targets)
        if not self.per_finding:
            (gradient,) = torch.autograd.grad(selected_logit_sum(logits, index), image)
            return gradient.sum(dim=1, keepdim=True).clamp_min(0.0)
        maps = []
        n_targets = index.shape[1]
        for j in range(n_targets):
            (gradient,) = torch.autograd.grad(
                selected_logit_sum(logits, index[:, j]), image, retain_graph=j < n_targets - 1
            )
            maps.append(gradient.sum(dim=1).clamp_min(0.0))
        return torch.stack(maps, dim=1)
