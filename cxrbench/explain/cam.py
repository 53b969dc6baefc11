"""Class Activation Mapping (Zhou et al. 2016; Chester Eq. 4).

For a network whose head is global average pooling followed by one linear layer,

    M_c(x, y) = sum_k w_ck f_k(x, y)

where f_k is the k-th channel of the last feature map *after the final ReLU* and w_ck the weight of
the linear layer linking channel k to output c. The bias is left out (as in Eq. 4), so the spatial
mean of M_c equals the logit minus the bias. Forward pass only, no gradient.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cxrbench.explain.base import Explainer, Targets


class CAM(Explainer):
    """Class Activation Map from the final features and the final linear layer's weights.

    Parameters
    ----------
    model : nn.Module
        Classifier with a GAP + linear head (torchvision DenseNet, ResNet).
    target_layer, fc : optional
        Final feature layer and final ``nn.Linear``; found by attribute name when omitted.
    feature_relu : bool
        Apply ReLU to the target layer's output before weighting (default True). DenseNet's
        ``features`` ends before its functional ReLU, so this is required there; for ResNet's
        ``layer4`` (already rectified) it changes nothing.
    **kwargs
        Post-processing options (``normalize``, ``sigma``, ``relu``).

    Returns (on call)
    -----------------
    (B, F, H, W) float32 in logit units (may be negative unless ``relu=True``), bilinearly upsampled.
    """

    name: ClassVar[str] = "cam"
    uses_target_layer: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False
    records_logits: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, feature_relu: bool = True, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if self.fc is None:
            raise ValueError(
                f"CAM needs the final nn.Linear of {type(model).__name__}; pass fc= explicitly"
            )
        self.feature_relu = feature_relu

    def _compute(self, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        assert self.fc is not None
        with torch.no_grad():
            logits, features = self._forward_with_features(x)
            if features.ndim != 4:
                raise ValueError(f"CAM needs (B, K, h, w) features, got {tuple(features.shape)}")
            if features.shape[1] != self.fc.in_features:
                raise ValueError(
                    f"CAM needs a GAP + linear head: the target layer has {features.shape[1]} "
                    f"channels but fc expects {self.fc.in_features} inputs"
                )
            if self.feature_relu:
                features = F.relu(features)
            index = self._target_index(logits, targets).to(features.device)
            weights = self.fc.weight[index]  # (B, F, K)
            return torch.einsum("bfk,bkhw->bfhw", weights.to(features.dtype), features)
