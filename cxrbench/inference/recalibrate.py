"""Labelled predictions of a bundle on a dataset, and re-fitting its operating points (``cxrbench calibrate``).

Only the findings the weights trained take part (a card's ``untrained`` outputs are skipped, and the callers
say so). :func:`refit_operating_points` fits Youden operating points on the user's validation images and writes
them into the bundle's card next to the ones it had (``operating_points["published"]``, e.g. torchxrayvision's
``op_threshs``); the refitted ones are used from then on. A finding the validation images cannot fit (no
positives or no negatives) keeps its previous operating point, listed in ``operating_points["kept_previous"]``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from cxrbench.evaluation.calibration import fit_operating_points
from cxrbench.inference.pipeline import Pipeline
from cxrbench.models.bundle import Bundle, load_bundle, save_bundle
from cxrbench.models.card import ModelCard
from cxrbench.preprocess import Preprocess

__all__ = ["LabelledOutputs", "labelled_outputs", "manifest_outputs", "refit_operating_points", "trained_findings"]


def trained_findings(card: ModelCard) -> list[str]:
    """The card's labels without the outputs its weights never trained (``card.untrained``)."""
    return [f for f in card.labels if f not in card.untrained]


@dataclass
class LabelledOutputs:
    """A bundle's outputs on labelled images: ``logits`` (N, F) over all outputs; ``labels`` and
    ``probabilities`` (N, T) over the ``findings`` it trained (T <= F); ``image_ids`` (N,)."""

    logits: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray
    findings: list[str]
    image_ids: list[str]
    skipped: list[str]


def labelled_outputs(bundle: Bundle, data: str | os.PathLike, *, split: str | os.PathLike | None = None,
                     subset: str = "val", batch_size: int = 32, progress: bool = False,
                     max_images: int = 0) -> LabelledOutputs:
    """Predict every readable image of the labelled folder ``data`` (``subset`` of ``split`` when given; of
    its first ``max_images`` rows when > 0) through :func:`manifest_outputs`.

    Raises ``ValueError`` when the data has no label column for a trained finding, or no images.
    """
    from cxrbench.data import load_manifest, load_split

    manifest = load_manifest(data, on_missing="drop")
    if split:
        s = load_split(split, manifest)
        manifest = manifest[(s == subset).to_numpy()].reset_index(drop=True)
        if manifest.empty:
            raise ValueError(f"{split}: no '{subset}' images")
    if max_images > 0:
        manifest = manifest.head(max_images).reset_index(drop=True)
    return manifest_outputs(Pipeline(bundle).classifier_backend, bundle.preprocess, manifest, bundle.labels,
                            untrained=bundle.card.untrained, batch_size=batch_size, progress=progress, where=data)


def manifest_outputs(model: Any, preprocess: Preprocess, manifest: pd.DataFrame, labels: Sequence[str], *,
                     untrained: Sequence[str] = (), batch_size: int = 32, device: str | torch.device = "cpu",
                     progress: bool = False, where: str | os.PathLike = "the manifest") -> LabelledOutputs:
    """The outputs of the classifier ``model`` (``labels`` its outputs, ``untrained`` those its weights never
    trained) on every readable row of a labelled ``manifest`` (``path``, ``image_id`` and a 0/1 column per trained
    finding), in manifest order.

    The images go through the path of ``cxrbench predict`` (:func:`~cxrbench.inference.predict.predict_files`, as
    :meth:`Pipeline.predict`: each file read and preprocessed in float), so the probabilities evaluated or
    calibrated on are the ones ``predict`` reports; the training cache's 8-bit resized pixels moved a seeded
    DenseNet's probabilities by about 2e-3 (4 NIH images), enough to reorder near ties and change an AUC.
    ``cxrbench evaluate`` and ``calibrate`` use it, and so does a training run for its operating points and test
    metrics. Unreadable files are left out with a warning naming each.

    Raises ``ValueError`` naming ``where`` when the manifest has no label column for a trained finding.
    """
    from cxrbench.inference.predict import predict_files

    findings = [f for f in labels if f not in untrained]
    absent = [c for c in findings if c not in manifest.columns]
    if absent:
        raise ValueError(f"{where}: no label columns for {absent}; this data cannot evaluate this model")
    logits, errors = predict_files(model, preprocess, manifest["path"].tolist(), batch_size=batch_size,
                                   device=device, progress=progress)
    for pos, reason in errors.items():
        print(f"warning: {manifest['path'].iloc[pos]}: left out, unreadable: {reason}", file=sys.stderr)
    ok = np.array([i not in errors for i in range(len(manifest))], dtype=bool)
    logits = logits[ok]
    keep = [list(labels).index(f) for f in findings]
    probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return LabelledOutputs(logits, manifest.loc[ok, findings].to_numpy(dtype=np.float32), probabilities[:, keep],
                           findings, manifest.loc[ok, "image_id"].astype(str).tolist(), list(untrained))


def refit_operating_points(bundle_path: str | os.PathLike, data: str | os.PathLike, *,
                           split: str | os.PathLike | None = None, subset: str = "val", batch_size: int = 32,
                           progress: bool = False) -> ModelCard:
    """Fit Youden operating points of the bundle at ``bundle_path`` on ``data`` and write them into its card.

    The previous operating points are kept under ``operating_points["published"]`` (the first ones a bundle
    had: re-fitting twice keeps the published ones, not the first re-fit). Returns the new card.
    """
    bundle = load_bundle(bundle_path, kind="classifier")
    out = labelled_outputs(bundle, data, split=split, subset=subset, batch_size=batch_size, progress=progress)
    if not len(out.labels):
        raise ValueError(f"{data}: no readable labelled images to fit operating points on")
    where = f"{data}" + (f" ({subset} rows of {split})" if split else "")
    fitted = fit_operating_points(out.labels, out.probabilities, out.findings, fitted_on=where).to_dict()
    before: dict[str, Any] = dict(bundle.card.operating_points)
    published = before.get("published") or ({k: v for k, v in before.items() if k != "kept_previous"}
                                            if before.get("thresholds") else {})
    previous = (before.get("thresholds") or {})
    thresholds: dict[str, float | None] = {f: None for f in bundle.labels}
    kept = []
    for f in out.findings:
        value = fitted["thresholds"].get(f)
        if value is None or not math.isfinite(value) or not 0 < value < 1:
            value = previous.get(f)
            kept += [f] if value is not None else []
        thresholds[f] = value
    fitted.update(thresholds=thresholds, n_images=len(out.labels), kept_previous=kept, published=published,
                  skipped_untrained=out.skipped)
    card = bundle.card
    card.operating_points = fitted
    save_bundle(Path(bundle_path), bundle.model, card)
    return card
