"""Explanations of a classifier's logits: saliency, CAM, Grad-CAM, Integrated Gradients, SmoothGrad, Latent Shift.

Every explainer is called as ``explainer(x, targets=None)`` on a (B, C, H, W) float batch and returns
a (B, F, H, W) float32 NumPy array at input resolution (F = number of explained findings; 1 for
Chester's summed saliency map). See :mod:`cxrbench.explain.base` for the shared rules (logits only,
hooks released, model state restored, finite maps) and post-processing options.

>>> explainer = get_explainer("gradcam", model, normalize="minmax")   # doctest: +SKIP
>>> maps = explainer(x, targets=[1, 2])                               # doctest: +SKIP

Every name but :data:`EXPLAINERS` and :func:`get_explainer` is imported on first use, so the CLI's
parser reads :data:`EXPLAINERS` without importing torch; the captum-based methods (:class:`IntegratedGradients`,
:class:`SmoothGrad`) bring captum (about half a second), which ``cxrbench predict`` and the app's start need not pay.

:data:`COUNTERFACTUAL_EXPLAINERS` (``"latent_shift"``, :mod:`cxrbench.explain.latent_shift`) need more than the
classifier: an autoencoder at its input resolution (``get_explainer("latent_shift", model, autoencoder=ae,
preprocess=pp)``; without one, :class:`~cxrbench.explain.latent_shift.NoAutoencoderError` says how to train one).
They are slower (a search and a sweep through the decoder) and are not among :data:`EXPLAINERS`, the methods
every backend and face computes from the classifier alone.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from torch import nn

    from cxrbench.explain.attributions import IntegratedGradients, SmoothGrad
    from cxrbench.explain.base import Explainer, minmax_normalize, postprocess_maps, resize_maps
    from cxrbench.explain.cam import CAM
    from cxrbench.explain.fusion import fuse, mask_fraction
    from cxrbench.explain.gradcam import GradCAM
    from cxrbench.explain.latent_shift import Counterfactual, LatentShift
    from cxrbench.explain.overlay import error_overlay, overlay, overlay_all_findings
    from cxrbench.explain.saliency import ChesterSaliency
    from cxrbench.explain.targets import (
        ALL_FINDINGS,
        ExplanationTargets,
        explanation_targets,
        finding_ranking,
        is_summed,
    )

#: public name -> the module that defines it, imported on first use (``cxrbench.explain.EXPLAINERS`` and
#: the CLI's ``--method`` choices need no torch)
_LAZY: dict[str, str] = {
    "Explainer": "cxrbench.explain.base",
    "minmax_normalize": "cxrbench.explain.base",
    "postprocess_maps": "cxrbench.explain.base",
    "resize_maps": "cxrbench.explain.base",
    "CAM": "cxrbench.explain.cam",
    "fuse": "cxrbench.explain.fusion",
    "mask_fraction": "cxrbench.explain.fusion",
    "GradCAM": "cxrbench.explain.gradcam",
    "Counterfactual": "cxrbench.explain.latent_shift",
    "LatentShift": "cxrbench.explain.latent_shift",
    "error_overlay": "cxrbench.explain.overlay",
    "overlay": "cxrbench.explain.overlay",
    "overlay_all_findings": "cxrbench.explain.overlay",
    "ChesterSaliency": "cxrbench.explain.saliency",
    "ALL_FINDINGS": "cxrbench.explain.targets",
    "ExplanationTargets": "cxrbench.explain.targets",
    "explanation_targets": "cxrbench.explain.targets",
    "finding_ranking": "cxrbench.explain.targets",
    "is_summed": "cxrbench.explain.targets",
    "IntegratedGradients": "cxrbench.explain.attributions",
    "SmoothGrad": "cxrbench.explain.attributions",
}

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

#: explainers that need an autoencoder as well (``autoencoder=``), accepted by :func:`get_explainer`
COUNTERFACTUAL_EXPLAINERS: list[str] = ["latent_shift"]


def get_explainer(name: str, model: nn.Module, **kwargs: Any) -> Explainer:
    """Build an explainer by registry name.

    Parameters
    ----------
    name : str
        One of :data:`EXPLAINERS` or :data:`COUNTERFACTUAL_EXPLAINERS` (these need ``autoencoder=``).
    model : nn.Module
        Classifier returning (B, N) logits.
    **kwargs
        Options of the explainer class (e.g. ``normalize="minmax"``, ``sigma=2.0``,
        ``target_layer=``, ``n_steps=``).
    """
    from cxrbench.explain.cam import CAM
    from cxrbench.explain.gradcam import GradCAM
    from cxrbench.explain.saliency import ChesterSaliency

    if name == "saliency":
        return ChesterSaliency(model, per_finding=False, **kwargs)
    if name == "saliency_per_finding":
        return ChesterSaliency(model, per_finding=True, **kwargs)
    classes: dict[str, type[Explainer]] = {"cam": CAM, "gradcam": GradCAM}
    if name in COUNTERFACTUAL_EXPLAINERS:
        return __getattr__("LatentShift")(model, **kwargs)
    if name in _CAPTUM_METHODS:
        return __getattr__(_CAPTUM_METHODS[name])(model, **kwargs)
    if name not in classes:
        raise ValueError(f"unknown explainer {name!r}; choose one of {EXPLAINERS + COUNTERFACTUAL_EXPLAINERS}")
    return classes[name](model, **kwargs)


def __getattr__(name: str) -> Any:
    """A public name of :data:`_LAZY`, imported when first asked for (the captum methods with captum)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cxrbench.explain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package itself, keeping the function :func:`overlay` under its name once the submodule of that name loads.

    The import system binds every submodule it loads to an attribute of its package; imported eagerly, the
    package re-bound ``overlay`` to the function right after, and ``from cxrbench.explain import overlay``
    keeps meaning the function now that the submodule loads on first use.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "overlay" and isinstance(value, types.ModuleType):
            value = value.overlay
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "ALL_FINDINGS",
    "CAM",
    "COUNTERFACTUAL_EXPLAINERS",
    "Counterfactual",
    "EXPLAINERS",
    "ChesterSaliency",
    "Explainer",
    "ExplanationTargets",
    "GradCAM",
    "IntegratedGradients",
    "LatentShift",
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
