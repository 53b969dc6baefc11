"""Explanations of a classifier's logits: saliency, CAM, Grad-CAM, Integrated Gradients, SmoothGrad.

Every explainer is called as ``explainer(x, targets=None)`` on a (B, C, H, W) float batch and returns
a (B, F, H, W) float32 NumPy array at input resolution (F = number of explained findings; 1 for
Chester's summed saliency map). See :mod:`cxrbench.explain.base` for the shared rules (logits only,
hooks released, model state restored, finite maps) and post-processing options.

>>> explainer = get_explainer("gradcam", model, normalize="minmax")   # doctest: +SKIP
>>> maps = explainer(x, targets=[1, 2])                               # doctest: +SKIP

The captum-based methods (:class:`IntegratedGradients`, :class:`SmoothGrad`) are imported on first use:
importing captum costs about half a second, which ``cxrbench predict`` and the app's start need not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torch import nn

from cxrbench.explain.base import Explainer, minmax_normalize, postprocess_maps, resize_maps
from cxrbench.explain.cam import CAM
from cxrbench.explain.fusion import fuse, mask_fraction
from cxrbench.explain.gradcam import GradCAM
from cxrbench.explain.overlay import error_overlay, overlay, overlay_all_findings
from cxrbench.explain.saliency import ChesterSaliency
from cxrbench.explain.targets import ALL_FINDINGS, ExplanationTargets, explanation_targets, finding_ranking, is_summed

if TYPE_CHECKING:  # pragma: no cover
    from cxrbench.explain.attributions import IntegratedGradients, SmoothGrad

#: names of the captum-based methods -> their module, imported on first use
_CAPTUM_METHODS = {"integrated_gradients": "IntegratedGradients", "smoothgrad": "SmoothGrad"}

#: Registry names accepted by :func:`get_explainer`, in display order.
EXPLAINERS: list[str] = [
    "saliency",
    "saliency_per_finding",
    "cam",
    "gradcam",
    "integrated_gradients",
    "smoothgrad",
]


def get_explainer(name: str, model: nn.Module, **kwargs: Any) -> Explainer:
    """Build an explainer by registry name.

    Parameters
    ----------
    name : str
        One of :data:`EXPLAINERS`.
    model : nn.Module
        Classifier returning (B, N) logits.
    **kwargs
        Options of the explainer class (e.g. ``normalize="minmax"``, ``sigma=2.0``,
        ``target_layer=``, ``n_steps=``).
    """
    if name == "saliency":
        return ChesterSaliency(model, per_finding=False, **kwargs)
    if name == "saliency_per_finding":
        return ChesterSaliency(model, per_finding=True, **kwargs)
    classes: dict[str, type[Explainer]] = {"cam": CAM, "gradcam": GradCAM}
    if name in _CAPTUM_METHODS:
        return __getattr__(_CAPTUM_METHODS[name])(model, **kwargs)
    if name not in classes:
        raise ValueError(f"unknown explainer {name!r}; choose one of {EXPLAINERS}")
    return classes[name](model, **kwargs)


def __getattr__(name: str) -> Any:
    """``IntegratedGradients`` / ``SmoothGrad``, imported (with captum) when first asked for."""
    if name in _CAPTUM_METHODS.values():
        value = getattr(importlib.import_module("cxrbench.explain.attributions"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cxrbench.explain' has no attribute {name!r}")


__all__ = [
    "ALL_FINDINGS",
    "CAM",
    "EXPLAINERS",
    "ChesterSaliency",
    "Explainer",
    "ExplanationTargets",
    "GradCAM",
    "IntegratedGradients",
    "SmoothGrad",
    "explanation_targets",
    "finding_ranking",
    "fuse",
    "get_explainer",
    "is_summed",
    "mask_fraction",
    "minmax_normalize",
    "error_overlay",
    "overlay",
    "overlay_all_findings",
    "postprocess_maps",
    "resize_maps",
]
