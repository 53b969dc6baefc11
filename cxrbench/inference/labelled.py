"""The labelled predictions notebook 02 reads: a training run's saved test predictions, or a bundle's predictions on
a labelled folder (an imported bundle of ``cxrbench import``, which has no run and no test split of its own).

Both give a :class:`ScoredImages` over the findings the weights trained only: an imported bundle's ``untrained``
outputs (xrv answers a constant 0.5 there) get no ROC curve, AUC or operating point, and are listed in
``ScoredImages.untrained`` so that the reader is told.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrbench.evaluation.calibration import OperatingPoints
from cxrbench.models.bundle import Bundle, load_bundle

__all__ = ["ScoredImages", "bundle_predictions", "labelled_folder", "run_test_predictions"]


@dataclass
class ScoredImages:
    """``y`` (N, T) 0/1 labels and ``raw`` (N, T) sigmoid probabilities of the trained ``findings`` (T), the
    bundle's ``operating_points`` over those findings, and where the numbers come from (``description``)."""

    y: np.ndarray
    raw: np.ndarray
    findings: list[str]
    operating_points: OperatingPoints
    image_ids: list[str]
    description: str
    bundle: Bundle
    untrained: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        """How many images."""
        return len(self.y)


def _trained_operating_points(bundle: Bundle, where: str | os.PathLike) -> OperatingPoints:
    """The card's operating points over its trained findings; ``ValueError`` naming ``where`` without any."""
    if not (bundle.card.operating_points or {}).get("thresholds"):
        raise ValueError(f"{where}: this bundle has no operating points (an imported CheXNet has none until "
                         f"calibrated), so there is nothing to place on its ROC curves; run `cxrbench calibrate "
                         f"{where} --data VAL` on a labelled validation split first")
    ops = OperatingPoints.from_dict(bundle.card.operating_points)
    keep = [f for f in bundle.labels if f not in bundle.card.untrained]
    n_pos, n_neg = ({f: d[f] for f in keep if f in d} for d in (ops.n_pos, ops.n_neg))
    tpr, fpr = ({f: d[f] for f in keep if f in d} for d in (ops.tpr, ops.fpr))
    return OperatingPoints({f: ops.thresholds.get(f, math.nan) for f in keep}, method=ops.method,
                           fitted_on=ops.fitted_on, n_pos=n_pos, n_neg=n_neg, tpr=tpr, fpr=fpr)


def run_test_predictions(run_dir: str | os.PathLike) -> ScoredImages:
    """The test split's predictions a training run saved (``predictions_test.csv`` beside its ``bundle/``)."""
    run = Path(run_dir)
    bundle = load_bundle(run / "bundle", kind="classifier")
    ops = _trained_operating_points(bundle, run / "bundle")
    test = pd.read_csv(run / "predictions_test.csv")
    findings = list(ops.thresholds)
    return ScoredImages(test[[f"{f}_label" for f in findings]].to_numpy(),
                        test[[f"{f}_raw" for f in findings]].to_numpy(), findings, ops,
                        test["file"].astype(str).tolist() if "file" in test else [],
                        f"{len(test)} test images of the run {run}; operating points fitted on its {ops.fitted_on} "
                        "split", bundle, list(bundle.card.untrained))


def labelled_folder(data_root: str | os.PathLike | None = None) -> Path:
    """A folder with a labelled ``manifest.csv``: ``data_root`` when given (or its ``cxr/nih`` when it is a shared
    data root), else the shared NIH dev images (``../shared/data/cxr/nih``). ``ValueError`` when there are none."""
    from cxrbench.data import shared_data_root

    if data_root:
        root = Path(data_root)
        return root / "cxr" / "nih" if (root / "cxr" / "nih" / "manifest.csv").is_file() else root
    shared = shared_data_root()
    if shared is None:
        raise ValueError("no labelled images to predict on: pass data_root (a folder with a manifest.csv of "
                         "0/1 finding columns), or place the shared dev data beside the checkout")
    return shared / "cxr" / "nih"


def bundle_predictions(bundle_dir: str | os.PathLike, data_root: str | os.PathLike | None = None, *,
                       max_images: int = 0, batch_size: int = 16, progress: bool = False) -> ScoredImages:
    """Predict the labelled images of :func:`labelled_folder` (``data_root``) with the classifier bundle at
    ``bundle_dir`` (the first ``max_images`` readable ones when > 0), through :func:`labelled_outputs`.

    Raises ``ValueError`` naming the bundle when it has no operating points, and naming the data when it has no
    label column for a trained finding.
    """
    from cxrbench.inference.recalibrate import labelled_outputs

    bundle = load_bundle(bundle_dir, kind="classifier")
    ops = _trained_operating_points(bundle, bundle_dir)
    data = labelled_folder(data_root)
    out = labelled_outputs(bundle, data, batch_size=batch_size, progress=progress, max_images=max_images)
    if not len(out.labels):
        raise ValueError(f"{data}: no readable labelled images to predict with {bundle_dir}")
    assert out.findings == list(ops.thresholds)
    name = bundle.card.name or Path(bundle_dir).name
    return ScoredImages(out.labels, out.probabilities, out.findings, ops, out.image_ids,
                        f"{len(out.labels)} labelled images of {data} predicted by {name} ({bundle_dir}); "
                        f"operating points: {ops.method}, fitted on {ops.fitted_on}", bundle, out.skipped)
