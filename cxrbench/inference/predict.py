"""Running a classifier over datasets and files: logits, raw and calibrated probabilities, CSVs.

Raw probabilities are ``sigmoid(logit)``; calibrated ones go through the bundle's operating points
(Chester Eq. 1), so 0.5 means "at this finding's operating point". Both are always reported side by
side: ``<Finding>`` (calibrated) and ``<Finding>_raw``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from cxrbench.evaluation.calibration import OperatingPoints, calibrate
from cxrbench.io import ImageReadError, read_image
from cxrbench.models.bundle import Bundle
from cxrbench.preprocess import Preprocess

__all__ = ["Predictions", "operating_points_of", "predict_dataset", "predict_files", "predictions_table"]


@dataclass
class Predictions:
    """Model outputs for N images: ``logits`` (N, F) float32, ``labels`` (N, F) or None, ``index`` (N,)."""

    logits: np.ndarray
    labels: np.ndarray | None
    index: np.ndarray

    @property
    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits.astype(np.float64)))


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> Predictions:
    """Logits for every item of a :class:`~cxrbench.data.CXRDataset` (in dataset order)."""
    device = torch.device(device)
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="predicting", unit="batch", leave=False)
    logits, labels, index = [], [], []
    for x, y, i in loader:
        logits.append(model(x.to(device)).float().cpu().numpy())
        labels.append(y.numpy())
        index.append(i.numpy())
    if not logits:
        width = getattr(model, "num_outputs", 0)
        return Predictions(np.zeros((0, width), np.float32), np.zeros((0, width), np.float32), np.zeros(0, int))
    return Predictions(np.concatenate(logits), np.concatenate(labels), np.concatenate(index))


@torch.no_grad()
def predict_files(
    model: nn.Module,
    preprocess: Preprocess,
    files: Sequence[str | os.PathLike],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, dict[int, str]]:
    """Logits ``(N, F)`` for image files; unreadable files get a row of NaN and an entry in ``errors``.

    Returns ``(logits, errors)`` where ``errors`` maps the position of a failed file to its reason.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    width = getattr(model, "num_outputs", None)
    out: list[np.ndarray | None] = [None] * len(files)
    errors: dict[int, str] = {}
    batch, where = [], []

    def flush() -> None:
        if batch:
            y = model(torch.from_numpy(np.stack(batch)).to(device)).float().cpu().numpy()
            for k, pos in enumerate(where):
                out[pos] = y[k]
            batch.clear()
            where.clear()

    items: Iterable = enumerate(files)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, total=len(files), desc="predicting", unit="img")
    for pos, f in items:
        try:
            batch.append(preprocess(read_image(f).pixels))
            where.append(pos)
        except (ImageReadError, ValueError) as exc:
            errors[pos] = exc.reason if isinstance(exc, ImageReadError) else f"{Path(f).name}: {exc}"
        if len(batch) >= batch_size:
            flush()
    flush()
    if width is None:
        width = next((len(o) for o in out if o is not None), 0)
    logits = np.stack([o if o is not None else np.full(width, np.nan, np.float32) for o in out]) if files else np.zeros((0, width))
    return logits.astype(np.float32), errors


def operating_points_of(bundle: Bundle) -> OperatingPoints | None:
    """The bundle's operating points, or None before calibration."""
    ops = bundle.card.operating_points
    return OperatingPoints.from_dict(ops) if ops else None


def predictions_table(
    names: Sequence[str],
    logits: np.ndarray,
    labels: Sequence[str],
    operating_points: OperatingPoints | None,
    errors: dict[int, str] | None = None,
) -> pd.DataFrame:
    """The ``predict`` CSV: ``file``, then ``<Finding>`` (calibrated) and ``<Finding>_raw`` per finding, ``error``.

    Without operating points the calibrated columns are NaN (never silently the raw values).
    """
    raw = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    cal = np.full_like(raw, np.nan)
    if operating_points is not None and len(raw):
        ok = ~np.isnan(raw).any(axis=1)
        cal[ok] = calibrate(raw[ok], operating_points, labels)
    cols: dict[str, object] = {"file": [str(n) for n in names]}
    for j, f in enumerate(labels):
        cols[f] = cal[:, j]
        cols[f"{f}_raw"] = raw[:, j]
    errors = errors or {}
    cols["error"] = [errors.get(i, "") for i in range(len(names))]
    return pd.DataFrame(cols)
