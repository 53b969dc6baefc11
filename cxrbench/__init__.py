"""cxrbench: a workbench for chest X-ray disease prediction.

Read any radiograph, train and evaluate CheXNet-style models over the 14 NIH ChestX-ray14 findings with
calibrated operating points, gate out images that are not chest X-rays, and explain predictions, all on
this machine. The common names are offered here and imported on first use (``import cxrbench`` does not
import torch)::

    import cxrbench
    image = cxrbench.read_image("scan.dcm")                  # (H, W) float32 in [0, 1] + metadata
    pipe = cxrbench.Pipeline.from_paths("runs/nih/bundle", ood="runs/ood/bundle")
    report = pipe.analyze("scan.dcm")                         # gate -> calibrated probabilities -> map

The subpackages, bottom to top: ``io``, ``preprocess``, ``labels``; ``data``, ``models``, ``evaluation``;
``explain``, ``ood``; ``inference``; ``train``, ``hybrid``; ``export``; ``plots``; ``app``, ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY: dict[str, str] = {
    "read_image": "cxrbench.io",
    "Image": "cxrbench.io",
    "ImageMeta": "cxrbench.io",
    "ImageReadError": "cxrbench.io",
    "Preprocess": "cxrbench.preprocess",
    "NIH_FINDINGS": "cxrbench.labels",
    "load_manifest": "cxrbench.data",
    "patient_split": "cxrbench.data",
    "CXRDataset": "cxrbench.data",
    "Bundle": "cxrbench.models.bundle",
    "ModelCard": "cxrbench.models.bundle",
    "load_bundle": "cxrbench.models.bundle",
    "save_bundle": "cxrbench.models.bundle",
    "build_classifier": "cxrbench.models.classifier",
    "OperatingPoints": "cxrbench.evaluation.calibration",
    "calibrate": "cxrbench.evaluation.calibration",
    "fit_operating_points": "cxrbench.evaluation.calibration",
    "evaluate_predictions": "cxrbench.evaluation.metrics",
    "get_explainer": "cxrbench.explain",
    "Pipeline": "cxrbench.inference.pipeline",
    "Report": "cxrbench.inference.pipeline",
    "train_classifier": "cxrbench.train",
    "train_ood": "cxrbench.train",
    "train_unet": "cxrbench.train",
    "ClassifierConfig": "cxrbench.train",
    "OODConfig": "cxrbench.train",
    "UNetConfig": "cxrbench.train",
    "export_models": "cxrbench.export.onnx",
}

__all__ = ["__version__", "Bundle", "CXRDataset", "ClassifierConfig", "Image", "ImageMeta", "ImageReadError",
          "ModelCard", "NIH_FINDINGS", "OODConfig", "OperatingPoints", "Pipeline", "Preprocess", "Report",
          "UNetConfig", "build_classifier", "calibrate", "evaluate_predictions", "export_models",
          "fit_operating_points", "get_explainer", "load_bundle", "load_manifest", "patient_split", "read_image",
          "save_bundle", "train_classifier", "train_ood", "train_unet"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from cxrbench.data import CXRDataset, load_manifest, patient_split
    from cxrbench.evaluation.calibration import OperatingPoints, calibrate, fit_operating_points
    from cxrbench.evaluation.metrics import evaluate_predictions
    from cxrbench.explain import get_explainer
    from cxrbench.export.onnx import export_models
    from cxrbench.inference.pipeline import Pipeline, Report
    from cxrbench.io import Image, ImageMeta, ImageReadError, read_image
    from cxrbench.labels import NIH_FINDINGS
    from cxrbench.models.bundle import Bundle, ModelCard, load_bundle, save_bundle
    from cxrbench.models.classifier import build_classifier
    from cxrbench.preprocess import Preprocess
    from cxrbench.train import ClassifierConfig, OODConfig, UNetConfig, train_classifier, train_ood, train_unet


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cxrbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
