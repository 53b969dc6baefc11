"""The data side of the hybrid-feature track: tasks, feature blocks, a layer4-tuned ResNet18.

:func:`hybrid_feature_blocks` builds every block the report's table needs for one labelled task
(LBP / HOG with and without equalisation, frozen and fine-tuned ResNet18 embeddings), all cached on
disk and resumable; :func:`bundle_scores` gives a trained classifier bundle's scores for a reference
row. The classifiers, the degeneracy check and the table are in :mod:`cxrbench.hybrid.classifiers`, which
re-exports everything here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

__all__ = ["REPORT_COMBOS", "FinetuneResult", "bundle_scores", "finetune_layer4", "hybrid_feature_blocks", "load_task",
           "resnet18_backbone", "task_folders"]


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
    from cxrbench.models.classifier import build_classifier
    from cxrbench.models.weights import WeightsUnavailableError

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = build_classifier("resnet18", num_outputs, in_channels=1, pretrained=bool(pretrained))
        except WeightsUnavailableError:
            if pretrained is True:
                raise
            model = build_classifier("resnet18", num_outputs, in_channels=1, pretrained=False)
    return model.eval()


def finetune_layer4(model: nn.Module, train_manifest: pd.DataFrame, label_columns: Sequence[str], preprocess, *,
                    epochs: int = 5, lr: float = 1e-4, batch_size: int = 16, seed: int = 0,
                    cache_dir: Any = "auto", progress: bool = False) -> FinetuneResult:
    """Fine-tune a copy of a ResNet18 with only ``layer4`` and ``fc`` trainable (the report's week 6).

    Adam at ``lr`` (1e-4), BCE-with-logits with the training split's ``pos_weight``, ``epochs`` passes
    over ``train_manifest`` (train split only). Frozen layers stay in eval mode (their BatchNorm
    statistics do not move). ``preprocess`` must give one channel; use a small ``size`` (128) on a CPU.
    The input model is not modified.
    """
    from torch.utils.data import DataLoader

    from cxrbench.data import CXRDataset

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    model = copy.deepcopy(model)
    if not hasattr(model, "layer4") or not hasattr(model, "fc"):
        raise TypeError(f"{type(model).__name__} is not a ResNet (needs layer4 and fc)")
    if model.fc.out_features != len(label_columns):
        model.fc = nn.Linear(model.fc.in_features, len(label_columns))
        model.num_outputs = len(label_columns)
    trainable = list(model.layer4.parameters()) + list(model.fc.parameters())
    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in trainable:
        prm.requires_grad_(True)
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
            model.layer4.train()
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


def bundle_scores(bundle, manifest: pd.DataFrame, findings: Sequence[str], *, batch_size: int = 16,
                  cache_dir: Any = "auto") -> np.ndarray:
    """Sigmoid probabilities ``(N, F)`` of a classifier bundle for ``findings`` (by name); NaN rows if unreadable."""
    from cxrbench.data import CXRDataset
    from cxrbench.inference.predict import predict_dataset

    missing = [f for f in findings if f not in bundle.labels]
    if missing:
        raise ValueError(f"the bundle has no output for {missing}; its labels are {bundle.labels}")
    ds = CXRDataset(manifest, bundle.preprocess, label_columns=[], cache_dir=cache_dir)
    if ds.cache.dir is not None:
        ds.build_cache()
        ds = ds.readable()
    pred = predict_dataset(bundle.model, ds, batch_size=batch_size)
    cols = [bundle.labels.index(f) for f in findings]
    out = np.full((len(manifest), len(findings)), np.nan)
    out[ds.rows[pred.index]] = pred.probabilities[:, cols]
    return out


# ----------------------------------------------------------------------------------- a task, its features
#: the report's rows (label -> feature blocks), as built by :func:`hybrid_feature_blocks`
REPORT_COMBOS: dict[str, list[str]] = {
    "LBP": ["LBP"], "HOG": ["HOG"], "LBP + HOG": ["LBP", "HOG"], "LBP + HOG (no eq.)": ["LBP (no eq.)", "HOG (no eq.)"],
    "CNN frozen": ["CNN frozen"], "CNN frozen (no eq.)": ["CNN frozen (no eq.)"], "CNN layer4-tuned": ["CNN layer4-tuned"],
    "LBP + HOG + CNN frozen": ["LBP", "HOG", "CNN frozen"],
    "LBP + HOG + CNN layer4-tuned": ["LBP", "HOG", "CNN layer4-tuned"],
}


def task_folders(root, kind: str = "custom") -> dict[str, Any]:
    """Labelled data sets under a data root: the shared dev sets ``cxr/nih`` and ``cxr/pediatric`` if present,
    else ``{kind: root}`` (a phantom set or any labelled folder)."""
    from pathlib import Path

    root = Path(root)
    named = {"NIH ChestX-ray14 dev set": root / "cxr" / "nih", "Paediatric pneumonia": root / "cxr" / "pediatric"}
    found = {name: path for name, path in named.items() if path.is_dir()}
    return found or {kind: root}


def load_task(folder, *, max_images: int = 0, seed: int = 0) -> pd.DataFrame:
    """A labelled manifest (``load_manifest``), seeded subsample of ``max_images`` rows (0: all), patient split.

    Adds a ``split`` column (70/10/20 by patient); ``attrs["label_columns"]`` are the findings.
    """
    from cxrbench.data import load_manifest, patient_split

    df = load_manifest(folder)
    if not df.attrs.get("label_columns"):
        raise ValueError(f"{folder}: a {df.attrs.get('kind')} manifest has no label columns to classify")
    if max_images and len(df) > max_images:
        attrs = dict(df.attrs)
        df = df.sample(n=max_images, random_state=seed).sort_index().reset_index(drop=True)
        df.attrs = attrs
    df["split"] = patient_split(df, seed=seed).to_numpy()
    return df


def _cached_finetune(backbone: nn.Module, train: pd.DataFrame, findings: Sequence[str], preprocess, cache_dir,
                     *, epochs: int, seed: int, progress: bool) -> FinetuneResult:
    """:func:`finetune_layer4`, with its weights and history saved under ``cache_dir`` for reruns."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    from cxrbench.data.dataset import ImageCache
    from cxrbench.hybrid.features import _model_fingerprint

    key = {"train_images": ImageCache(train["path"].tolist(), preprocess, None).key(), "findings": list(findings),
           "preprocess": preprocess.to_dict(), "epochs": epochs, "seed": seed, "start": _model_fingerprint(backbone)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = cache_dir / f"resnet18-layer4-{digest}"
    weights, card = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.is_file() and card.is_file() and json.loads(card.read_text()).get("key") == key:
        model = copy.deepcopy(backbone)
        model.load_state_dict(load_file(str(weights)))
        return FinetuneResult(model.eval(), json.loads(card.read_text())["history"], backbone.pretrained_weights)
    result = finetune_layer4(backbone, train, findings, preprocess, epochs=epochs, seed=seed,
                             cache_dir=cache_dir / "images", progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(weights))
    card.write_text(json.dumps({"key": key, "history": result.history}))
    return result


def hybrid_feature_blocks(manifest: pd.DataFrame, cache_dir, *, image_size: int = 224, finetune_epochs: int = 5,
                          chunk_size: int = 64, seed: int = 0, progress: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Every block the report's table needs, cached under ``cache_dir`` (resumable, see ``extract_features``).

    LBP and HOG with and without histogram equalisation, a frozen 1-channel ResNet18 (ImageNet weights
    if cached, else seeded random init) with and without equalisation, and the same network after
    :func:`finetune_layer4` on the manifest's ``split == "train"`` rows (its weights are cached too, keyed
    by the training images, settings and starting weights). Inputs: ``image_size`` px,
    [-1, 1]. Returns ``({block name: (N, D) float32}, info)``; ``info`` has the fine-tuning history,
    the initial weights and seconds per block.
    """
    import time
    from pathlib import Path

    from cxrbench.hybrid.features import extract_features
    from cxrbench.preprocess import Preprocess

    cache_dir = Path(cache_dir)
    findings = list(manifest.attrs["label_columns"])
    kw = dict(chunk_size=chunk_size, progress=progress, image_cache_dir=cache_dir / "images")
    eq = Preprocess(size=image_size, equalize="hist", normalize="minus1_1")
    plain = eq.replace(equalize="none")
    blocks, seconds = {}, {}
    backbone = resnet18_backbone(len(findings), seed=seed)
    t0 = time.perf_counter()
    tuned = _cached_finetune(backbone, manifest[manifest["split"] == "train"], findings, eq, cache_dir,
                             epochs=finetune_epochs, seed=seed, progress=progress)
    seconds["fine-tuning"] = time.perf_counter() - t0
    jobs = [("LBP", "lbp", eq, None), ("HOG", "hog", eq, None), ("LBP (no eq.)", "lbp", plain, None),
            ("HOG (no eq.)", "hog", plain, None), ("CNN frozen", "cnn", eq, backbone),
            ("CNN frozen (no eq.)", "cnn", plain, backbone), ("CNN layer4-tuned", "cnn", eq, tuned.model)]
    for name, kind, pp, model in jobs:
        t0 = time.perf_counter()
        slug = name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace(".", "")
        blocks[name] = np.asarray(extract_features(manifest, kind, pp, cache_dir / f"{slug}.npy", model=model, **kw))
        seconds[name] = time.perf_counter() - t0
    info = {"finetune_history": tuned.history, "initial_weights": backbone.pretrained_weights or "random (seeded)",
            "seconds": seconds}
    return blocks, info
