"""The hybrid track's CNN: a 1-channel ResNet18, and the same network with only ``layer4`` tuned (report week 6).

:func:`resnet18_backbone` builds it (ImageNet weights only when cached, else seeded random init);
:func:`finetune_layer4` tunes ``layer4`` and the head on a training split; :func:`cached_finetune`
does so once and keeps the weights and history on disk, keyed by the images, settings and start weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from cxrbench._types import PathLike
from cxrbench.data import CXRDataset
from cxrbench.data.dataset import ImageCache
from cxrbench.hybrid.features import model_fingerprint
from cxrbench.models.classifier import build_classifier
from cxrbench.models.weights import WeightsUnavailableError
from cxrbench.preprocess import Preprocess

__all__ = ["FinetuneResult", "cached_finetune", "finetune_layer4", "resnet18_backbone"]


# ----------------------------------------------------------------------------------- fine-tuning
@dataclass
class FinetuneResult:
    """A fine-tuned model (eval mode), its per-epoch ``history`` and whether it started from ImageNet."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    pretrained_weights: str | None = None


def resnet18_backbone(num_outputs: int, *, pretrained: bool | str = "auto", seed: int = 0) -> nn.Module:
    """A 1-channel cxrbench ResNet18 (eval mode); ``pretrained="auto"`` uses ImageNet weights only if cached.

    Nothing is downloaded. ``model.pretrained_weights`` is the weights' name or None (random init).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = build_classifier("resnet18", num_outputs, in_channels=1, pretrained=bool(pretrained))
        except WeightsUnavailableError:
            if pretrained is True:
                raise
            model = build_classifier("resnet18", num_outputs, in_channels=1, pretrained=False)
    return model.eval()


def _layer4_and_head(model: nn.Module, n_outputs: int) -> list[nn.Parameter]:
    """Give a ResNet an ``n_outputs`` head if needed, freeze all but ``layer4`` and ``fc``; their parameters."""
    layer4, fc = getattr(model, "layer4", None), getattr(model, "fc", None)
    if not isinstance(layer4, nn.Module) or not isinstance(fc, nn.Linear):
        raise TypeError(f"{type(model).__name__} is not a ResNet (needs layer4 and fc)")
    if fc.out_features != n_outputs:
        fc = nn.Linear(fc.in_features, n_outputs)
        model.fc = fc
        setattr(model, "num_outputs", n_outputs)  # what cxrbench classifiers report as their width
    trainable = list(layer4.parameters()) + list(fc.parameters())
    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in trainable:
        prm.requires_grad_(True)
    return trainable


def finetune_layer4(model: nn.Module, train_manifest: pd.DataFrame, label_columns: Sequence[str],
                    preprocess: Preprocess, *, epochs: int = 5, lr: float = 1e-4, batch_size: int = 16, seed: int = 0,
                    cache_dir: PathLike | None = "auto", progress: bool = False) -> FinetuneResult:
    """Fine-tune a copy of a ResNet18 with only ``layer4`` and ``fc`` trainable (the report's week 6).

    Adam at ``lr`` (1e-4), BCE-with-logits with the training split's ``pos_weight``, ``epochs`` passes
    over ``train_manifest`` (train split only). Frozen layers stay in eval mode (their BatchNorm
    statistics do not move). ``preprocess`` must give one channel; use a small ``size`` (128) on a CPU.
    The input model is not modified.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    model = copy.deepcopy(model)
    trainable = _layer4_and_head(model, len(label_columns))
    ds = CXRDataset(train_manifest, preprocess, label_columns=list(label_columns), cache_dir=cache_dir)
    if ds.cache.dir is not None:
        ds.build_cache()
        ds = ds.readable()
    criterion = nn.BCEWithLogitsLoss(pos_weight=ds.pos_weight())
    opt = torch.optim.Adam(trainable, lr=lr)
    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
        for epoch in range(1, epochs + 1):
            model.eval()
            model.get_submodule("layer4").train()
            total, n = 0.0, 0
            for x, y, _ in loader:
                opt.zero_grad()
                loss = criterion(model(x), y)
                loss.backward()
                opt.step()
                total, n = total + loss.item() * len(x), n + len(x)
            history.append({"epoch": epoch, "train_loss": total / max(n, 1)})
            if progress:
                print(f"fine-tune epoch {epoch}/{epochs}: train loss {history[-1]['train_loss']:.4f}")
    for prm in model.parameters():
        prm.requires_grad_(True)
    return FinetuneResult(model.eval(), history, getattr(model, "pretrained_weights", None))


def cached_finetune(backbone: nn.Module, train: pd.DataFrame, findings: Sequence[str], preprocess: Preprocess,
                    cache_dir: PathLike, *, epochs: int, seed: int, progress: bool = False) -> FinetuneResult:
    """:func:`finetune_layer4`, with its weights and history saved under ``cache_dir`` for reruns.

    The cache key is the training images, the findings, ``preprocess``, ``epochs``, ``seed`` and the
    starting weights; the crops of the training images are cached in ``cache_dir / "images"``.
    """
    cache_dir = Path(cache_dir)
    key = {"train_images": ImageCache(train["path"].tolist(), preprocess, None).key(), "findings": list(findings),
           "preprocess": preprocess.to_dict(), "epochs": epochs, "seed": seed, "start": model_fingerprint(backbone)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = cache_dir / f"resnet18-layer4-{digest}"
    weights, card = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.is_file() and card.is_file() and json.loads(card.read_text()).get("key") == key:
        model = copy.deepcopy(backbone)
        model.load_state_dict(load_file(str(weights)))
        return FinetuneResult(model.eval(), json.loads(card.read_text())["history"],
                              getattr(backbone, "pretrained_weights", None))
    result = finetune_layer4(backbone, train, findings, preprocess, epochs=epochs, seed=seed,
                             cache_dir=cache_dir / "images", progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(weights))
    card.write_text(json.dumps({"key": key, "history": result.history}))
    return result
