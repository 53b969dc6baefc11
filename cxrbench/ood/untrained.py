"""An OOD bundle with seeded random weights, for plumbing where skill does not matter (export, benchmarks, app
tests): the autoencoder of the real gate, at the real size, with a cutoff chosen as asked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrbench.models.bundle import ModelCard, build_model, save_bundle
from cxrbench.ood.scoring import as_ood_model, score_batch
from cxrbench.preprocess import Preprocess

__all__ = ["untrained_ood_bundle"]


def untrained_ood_bundle(path: str | os.PathLike, *, latent_dim: int = 128, base_channels: int = 16,
                         images: Any = None, threshold: float | None = None, seed: int = 0,
                         description: str = "seeded random weights (no skill)") -> Path:
    """An autoencoder OOD bundle (64 px, 1 - SSIM scorer) with seeded random weights.

    Its cutoff is ``threshold`` if given, else the median score over ``images`` (half are rejected),
    else one no score reaches (it never rejects).
    """
    kwargs = {"latent_dim": latent_dim, "base_channels": base_channels}
    preprocess = Preprocess(size=64, normalize="zero_one")
    torch.manual_seed(seed)
    model = build_model("autoencoder", kwargs).eval()
    method = "given"
    if threshold is None and images is not None and len(images):
        batch = torch.from_numpy(np.stack([preprocess(im) for im in images]))
        threshold, method = float(np.median(score_batch(as_ood_model(model), batch)["ssim"])), "median"
    elif threshold is None:
        threshold, method = 10.0, "never rejects"
    return save_bundle(path, model, ModelCard(
        kind="ood", builder="autoencoder", builder_kwargs=kwargs, preprocess=preprocess.to_dict(),
        ood={"cutoff": {"scorer": "ssim", "threshold": float(threshold), "method": f"untrained: {method}"}},
        description=description))
