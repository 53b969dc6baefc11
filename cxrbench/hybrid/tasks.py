"""The data side of the hybrid-feature track: labelled tasks, the report's feature blocks, reference scores.

:func:`hybrid_feature_blocks` builds every block the report's table needs for one labelled task
(LBP / HOG with and without equalisation, frozen and layer4-tuned ResNet18 embeddings), all cached on
disk and resumable; :func:`bundle_scores` gives a trained classifier bundle's scores for a reference row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cxrbench._types import PathLike
from cxrbench.data import CXRDataset, load_manifest, patient_split
from cxrbench.hybrid.backbone import cached_finetune, resnet18_backbone
from cxrbench.hybrid.extraction import extract_features
from cxrbench.models.bundle import Bundle
from cxrbench.preprocess import Preprocess

__all__ = ["REPORT_COMBOS", "bundle_scores", "hybrid_feature_blocks", "load_task", "task_folders"]


#: the report's rows (label -> feature blocks), as built by :func:`hybrid_feature_blocks`
REPORT_COMBOS: dict[str, list[str]] = {
    "LBP": ["LBP"], "HOG": ["HOG"], "LBP + HOG": ["LBP", "HOG"], "LBP + HOG (no eq.)": ["LBP (no eq.)", "HOG (no eq.)"],
    "CNN frozen": ["CNN frozen"], "CNN frozen (no eq.)": ["CNN frozen (no eq.)"],
    "CNN layer4-tuned": ["CNN layer4-tuned"],
    "LBP + HOG + CNN frozen": ["LBP", "HOG", "CNN frozen"],
    "LBP + HOG + CNN layer4-tuned": ["LBP", "HOG", "CNN layer4-tuned"],
}


def task_folders(root: PathLike, kind: str = "custom") -> dict[str, Path]:
    """Labelled data sets under a data root: the shared dev sets ``cxr/nih`` and ``cxr/pediatric`` if present,
    else ``{kind: root}`` (a phantom set or any labelled folder)."""
    root = Path(root)
    named = {"NIH ChestX-ray14 dev set": root / "cxr" / "nih", "Paediatric pneumonia": root / "cxr" / "pediatric"}
    found = {name: path for name, path in named.items() if path.is_dir()}
    return found or {kind: root}


def load_task(folder: PathLike, *, max_images: int = 0, seed: int = 0) -> pd.DataFrame:
    """A labelled manifest (``load_manifest``), seeded subsample of ``max_images`` rows (0: all), patient split.

    Adds a ``split`` column (70/10/20 by patient); ``attrs["label_columns"]`` are the findings.
    """
    df = load_manifest(folder)
    if not df.attrs.get("label_columns"):
        raise ValueError(f"{folder}: a {df.attrs.get('kind')} manifest has no label columns to classify")
    if max_images and len(df) > max_images:
        attrs = dict(df.attrs)
        df = df.sample(n=max_images, random_state=seed).sort_index().reset_index(drop=True)
        df.attrs = attrs
    df["split"] = patient_split(df, seed=seed).to_numpy()
    return df


def hybrid_feature_blocks(manifest: pd.DataFrame, cache_dir: PathLike, *, image_size: int = 224,
                          finetune_epochs: int = 5, chunk_size: int = 64, seed: int = 0,
                          progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every block the report's table needs, cached under ``cache_dir`` (resumable, see ``extract_features``).

    LBP and HOG with and without histogram equalisation, a frozen 1-channel ResNet18 (ImageNet weights
    if cached, else seeded random init) with and without equalisation, and the same network after
    :func:`cxrbench.hybrid.backbone.finetune_layer4` on the manifest's ``split == "train"`` rows (its
    weights are cached too, keyed by the training images, settings and starting weights). Inputs:
    ``image_size`` px, [-1, 1]. Returns ``({block name: (N, D) float32}, info)``; ``info`` has the fine-tuning history,
    the initial weights and seconds per block.
    """
    cache_dir = Path(cache_dir)
    findings = list(manifest.attrs["label_columns"])
    eq = Preprocess(size=image_size, equalize="hist", normalize="minus1_1")
    plain = eq.replace(equalize="none")
    blocks: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    backbone = resnet18_backbone(len(findings), seed=seed)
    t0 = time.perf_counter()
    tuned = cached_finetune(backbone, manifest[manifest["split"] == "train"], findings, eq, cache_dir,
                            epochs=finetune_epochs, seed=seed, progress=progress)
    seconds["fine-tuning"] = time.perf_counter() - t0
    jobs = [("LBP", "lbp", eq, None), ("HOG", "hog", eq, None), ("LBP (no eq.)", "lbp", plain, None),
            ("HOG (no eq.)", "hog", plain, None), ("CNN frozen", "cnn", eq, backbone),
            ("CNN frozen (no eq.)", "cnn", plain, backbone), ("CNN layer4-tuned", "cnn", eq, tuned.model)]
    for name, kind, pp, model in jobs:
        t0 = time.perf_counter()
        slug = name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace(".", "")
        blocks[name] = np.asarray(extract_features(manifest, kind, pp, cache_dir / f"{slug}.npy", chunk_size, model,
                                                   progress, image_cache_dir=cache_dir / "images"))
        seconds[name] = time.perf_counter() - t0
    initial = getattr(backbone, "pretrained_weights", None) or "random (seeded)"
    info = {"finetune_history": tuned.history, "initial_weights": initial, "seconds": seconds}
    return blocks, info


@torch.no_grad()
def bundle_scores(bundle: Bundle, manifest: pd.DataFrame, findings: Sequence[str], *, batch_size: int = 16,
                  cache_dir: PathLike | None = "auto") -> np.ndarray:
    """Sigmoid probabilities ``(N, F)`` float64 of a classifier bundle for ``findings`` (by name); NaN rows
    for unreadable images.

    A plain forward pass in eval mode over the manifest's images, preprocessed by the bundle's own
    :class:`~cxrbench.preprocess.Preprocess` (through the uint8 cache unless ``cache_dir`` is None).
    """
    missing = [f for f in findings if f not in bundle.labels]
    if missing:
        raise ValueError(f"the bundle has no output for {missing}; its labels are {bundle.labels}")
    ds = CXRDataset(manifest, bundle.preprocess, label_columns=[], cache_dir=cache_dir)
    if ds.cache.dir is not None:
        ds.build_cache()
        ds = ds.readable()
    model = bundle.model.eval()
    cols = [bundle.labels.index(f) for f in findings]
    out = np.full((len(manifest), len(findings)), np.nan)
    for x, _, index in DataLoader(ds, batch_size=batch_size, shuffle=False):
        logits = model(x).float().cpu().numpy().astype(np.float64)
        out[ds.rows[index.numpy()]] = (1.0 / (1.0 + np.exp(-logits)))[:, cols]
    return out
