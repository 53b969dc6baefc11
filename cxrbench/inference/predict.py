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
from cxrbench.inference.backend import ClassifierBackend, classifier_backend
from cxrbench.io import LOW_DYNAMIC_RANGE_SPREAD, ImageMeta, ImageReadError, read_image
from cxrbench.models.bundle import Bundle
from cxrbench.ood.guard import ImageGuard
from cxrbench.preprocess import Preprocess

__all__ = ["Predictions", "input_warning", "operating_points_of", "predict_dataset", "predict_files",
           "predictions_table"]


@dataclass
class Predictions:
    """Model outputs for N images: ``logits`` (N, F) float32, ``labels`` (N, F) or None, ``index`` (N,)."""

    logits: np.ndarray
    labels: np.ndarray | None
    index: np.ndarray

    @property
    def probabilities(self) -> np.ndarray:
        """Sigmoid of the logits, float64."""
        return 1.0 / (1.0 + np.exp(-self.logits.astype(np.float64)))


def predict_dataset(
    model: nn.Module | ClassifierBackend,
    dataset,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> Predictions:
    """Logits for every item of a :class:`~cxrbench.data.CXRDataset` (in dataset order).

    ``model``: a torch classifier (run on ``device``) or any :class:`~cxrbench.inference.backend.ClassifierBackend`.
    """
    backend = classifier_backend(model, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="predicting", unit="batch", leave=False)
    logits, labels, index = [], [], []
    for x, y, i in loader:
        logits.append(backend.logits(x))
        labels.append(y.numpy())
        index.append(i.numpy())
    if not logits:
        width = _n_outputs(model)
        return Predictions(np.zeros((0, width), np.float32), np.zeros((0, width), np.float32), np.zeros(0, int))
    return Predictions(np.concatenate(logits), np.concatenate(labels), np.concatenate(index))


def _n_outputs(model: object) -> int:
    inner = getattr(model, "model", model)  # a TorchClassifier's network
    return int(getattr(model, "num_outputs", getattr(inner, "num_outputs", 0)))


def input_warning(meta: ImageMeta) -> str:
    """The per-file warning of the faces without a gate (``predict``, ``explain``); ``""`` for a usable input.

    Today: a low-dynamic-range image (:attr:`cxrbench.io.ImageMeta.low_dynamic_range`: nearly flat or nearly
    black after scaling by its effective bit depth), whose probabilities mean little.
    """
    if not meta.low_dynamic_range:
        return ""
    return (f"low dynamic range: 98 % of the pixels span less than {LOW_DYNAMIC_RANGE_SPREAD:g} of the intensity "
            f"range (read as {meta.effective_bits}-bit); a nearly flat or black image, so its probabilities are "
            "unreliable")


def predict_files(
    model: nn.Module | ClassifierBackend,
    preprocess: Preprocess,
    files: Sequence[str | os.PathLike],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    warnings: dict[int, str] | None = None,
    guard: ImageGuard | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Logits ``(N, F)`` float32 for image files, ``batch_size`` images per forward pass.

    ``model``: a torch classifier (run on ``device``) or any :class:`~cxrbench.inference.backend.ClassifierBackend`.
    Unreadable files get a row of NaN and an entry in ``errors``. Returns ``(logits, errors)`` where
    ``errors`` maps the position of a failed file to its reason. ``warnings``, when given, is filled with the
    :func:`input_warning` of each read file that has one (position -> text), and with the reason the blank-image
    ``guard`` (when given) would reject it for: ``predict`` has no gate, so it says so instead of refusing.
    """
    backend = classifier_backend(model, device)
    out: list[np.ndarray | None] = [None] * len(files)
    errors: dict[int, str] = {}
    batch: list[np.ndarray] = []
    where: list[int] = []

    def flush() -> None:
        if batch:
            y = backend.logits(torch.from_numpy(np.stack(batch)))
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
            image = read_image(f)
            batch.append(preprocess(image.pixels))
            where.append(pos)
            if warnings is not None:
                verdict = guard.check(image.pixels) if guard is not None else None
                text = "; ".join(w for w in (input_warning(image.meta), verdict.reason if verdict else "") if w)
                if text:
                    warnings[pos] = text
        except (ImageReadError, ValueError) as exc:
            errors[pos] = exc.reason if isinstance(exc, ImageReadError) else f"{Path(f).name}: {exc}"
        if len(batch) >= batch_size:
            flush()
    flush()
    width = next((len(o) for o in out if o is not None), _n_outputs(model))
    if not files:
        return np.zeros((0, width), np.float32), errors
    rows = [o if o is not None else np.full(width, np.nan, np.float32) for o in out]
    return np.stack(rows).astype(np.float32), errors


def operating_points_of(bundle: Bundle) -> OperatingPoints | None:
    """The bundle's operating points, or None before calibration."""
    ops = bundle.card.operating_points
    return OperatingPoints.from_dict(ops) if ops else None


def predictions_table(
    names: Sequence[str | os.PathLike],
    logits: np.ndarray,
    labels: Sequence[str],
    operating_points: OperatingPoints | None,
    errors: dict[int, str] | None = None,
    warnings: dict[int, str] | None = None,
    untrained: Sequence[str] = (),
) -> pd.DataFrame:
    """The ``predict`` CSV: ``file``, then ``<Finding>`` (calibrated) and ``<Finding>_raw`` per finding, ``error``,
    and with ``warnings`` (position -> text, :func:`input_warning`) a ``warning`` column.

    Without operating points the calibrated columns are NaN (never silently the raw values). Outputs in
    ``untrained`` (the card's findings its weights never trained) are empty in both columns and a ``note``
    column says so.
    """
    raw = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    cal = np.full_like(raw, np.nan)
    if operating_points is not None and len(raw):
        ok = ~np.isnan(raw).any(axis=1)
        cal[ok] = calibrate(raw[ok], operating_points, labels)
    cols: dict[str, object] = {"file": [str(n) for n in names]}
    for j, f in enumerate(labels):
        masked = f in untrained
        cols[f] = np.full(len(raw), np.nan) if masked else cal[:, j]
        cols[f"{f}_raw"] = np.full(len(raw), np.nan) if masked else raw[:, j]
    errors = errors or {}
    cols["error"] = [errors.get(i, "") for i in range(len(names))]
    if warnings is not None:
        cols["warning"] = [warnings.get(i, "") for i in range(len(names))]
    not_trained = [f for f in labels if f in untrained]
    if not_trained:
        cols["note"] = [f"not trained by this model (left empty): {', '.join(not_trained)}"] * len(names)
    return pd.DataFrame(cols)
