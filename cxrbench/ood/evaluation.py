"""How well the OOD gate separates: AUROC, FPR at 95 % TPR and AUPR per evaluation set and scorer.

The positive class is OOD (higher score = more OOD; ``ssim`` is 1 - SSIM). The sets come from
:mod:`cxrbench.ood.sets`, the scores from :func:`cxrbench.ood.scoring.score_sets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cxrbench.ood.scoring import SCORER_NAMES, OODModel, score_sets

__all__ = ["ood_auroc_table", "ood_metrics"]


def ood_metrics(scores_in: np.ndarray | Sequence[float], scores_out: np.ndarray | Sequence[float]) -> dict[str, float]:
    """Separation of in-distribution and OOD scores (positive class = OOD; higher = more OOD).

    Returns
    -------
    dict of str to float
        ``auroc``; ``aupr_out`` (average precision with OOD positive); ``fpr_at_95_tpr``
        (fraction of in-distribution images rejected at the loosest cutoff that still
        rejects >= 95 % of OOD images); ``n_in``, ``n_out``.
    """
    s_in, s_out = np.asarray(scores_in, dtype=float).ravel(), np.asarray(scores_out, dtype=float).ravel()
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError(f"need scores of both groups, got {s_in.size} in-distribution and {s_out.size} OOD")
    if not (np.all(np.isfinite(s_in)) and np.all(np.isfinite(s_out))):
        raise ValueError("scores must be finite")
    y = np.concatenate([np.zeros(s_in.size), np.ones(s_out.size)])
    s = np.concatenate([s_in, s_out])
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr_out": float(average_precision_score(y, s)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
        "n_in": float(s_in.size),
        "n_out": float(s_out.size),
    }


def ood_auroc_table(model: OODModel | None, in_dist_x: torch.Tensor | dict[str, np.ndarray],
                    sets: dict[str, torch.Tensor] | dict[str, dict[str, np.ndarray]],
                    scorers: Sequence[str] = SCORER_NAMES, *, batch_size: int = 64) -> pd.DataFrame:
    """AUROC, FPR at 95 % TPR and AUPR (OOD positive) per OOD set and scorer.

    ``in_dist_x`` and ``sets`` are images (scored with ``model``) or already-computed scores from
    :func:`score_sets` (then ``model`` may be None). Returns one row per set x scorer: ``set``,
    ``scorer``, ``auroc``, ``fpr_at_95_tpr``, ``aupr_out``, ``n_in``, ``n_out``.
    """
    def scored(x: Any, name: str) -> dict[str, np.ndarray]:
        if isinstance(x, dict):
            return x
        if model is None:
            raise TypeError(f"'{name}' holds images but no model was given to score them")
        return score_sets(model, {name: x}, batch_size=batch_size)[name]

    s_in = scored(in_dist_x, "in-distribution")
    rows = []
    for name, x in sets.items():
        s_out = scored(x, name)
        for scorer in scorers:
            m = ood_metrics(s_in[scorer], s_out[scorer])
            rows.append({"set": name, "scorer": scorer, "auroc": m["auroc"], "fpr_at_95_tpr": m["fpr_at_95_tpr"],
                         "aupr_out": m["aupr_out"], "n_in": int(m["n_in"]), "n_out": int(m["n_out"])})
    return pd.DataFrame(rows)
