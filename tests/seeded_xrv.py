"""Seeded ``weights=None`` torchxrayvision models for the published-weights tests (``test_published.py``) and the
end-to-end test of an imported bundle (``test_imported_e2e.py``): no weights are downloaded anywhere."""

from __future__ import annotations

from pathlib import Path

import torch

#: trains 7 of the 14 NIH findings: the others must be masked
CHEX = "densenet121-res224-chex"
CHEX_UNTRAINED = ["Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def xrv_input(path: Path, size: int) -> torch.Tensor:
    """torchxrayvision's documented chain for a PNG: normalize, centre crop, resize -> (1, 1, size, size)."""
    import skimage.io
    import torchxrayvision as xrv

    img = xrv.utils.normalize(skimage.io.imread(path), 255)[None]
    img = xrv.datasets.XRayResizer(size)(xrv.datasets.XRayCenterCrop()(img))
    return torch.from_numpy(img)[None]


def fit_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Seeded weights give logits in the thousands; batch statistics of real images make them O(1)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def seeded_densenet(images: list[Path], seed: int = 0) -> torch.nn.Module:
    """torchxrayvision's DenseNet-121 (``weights=None``, seeded), its batch norm fitted on ``images``."""
    import torchxrayvision as xrv

    torch.manual_seed(seed)
    return fit_batchnorm(xrv.models.DenseNet(weights=None), torch.cat([xrv_input(p, 224) for p in images]))
