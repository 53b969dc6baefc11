"""Models: classifier factory (DenseNet-121, ResNet18), OOD models (ALI, autoencoder), weight loaders.

Names are imported lazily (PEP 562), so ``import cxrbench.models`` does not import torch until a
name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # classifier
    "ARCHITECTURES": "cxrbench.models.classifier",
    "DenseNet121": "cxrbench.models.classifier",
    "ResNet18": "cxrbench.models.classifier",
    "build_classifier": "cxrbench.models.classifier",
    "classifier_layer": "cxrbench.models.classifier",
    "disable_inplace_relu": "cxrbench.models.classifier",
    "inplace_relus": "cxrbench.models.classifier",
    "embed": "cxrbench.models.classifier",
    "feature_layer": "cxrbench.models.classifier",
    "from_torchxrayvision": "cxrbench.models.classifier",
    # weights
    "WeightsUnavailableError": "cxrbench.models.weights",
    "adapt_first_conv": "cxrbench.models.weights",
    "load_chexnet_checkpoint": "cxrbench.models.weights",
    "load_torchvision_backbone": "cxrbench.models.weights",
    "torchvision_weights_path": "cxrbench.models.weights",
    # OOD models (64 px)
    "ALI": "cxrbench.models.ali",
    "ALIDiscriminator": "cxrbench.models.ali",
    "ali_train_step": "cxrbench.models.ali",
    "make_ali_optimizers": "cxrbench.models.ali",
    "ConvAutoencoder": "cxrbench.models.autoencoder",
    "ae_train_step": "cxrbench.models.autoencoder",
    # lung segmentation
    "UNet": "cxrbench.models.unet",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cxrbench.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
