"""Has a model learned anything? Constant outputs and a label-permutation test of its macro AUC.

With 14 rare findings a model that predicts (almost) nothing still gets a low Hamming loss and a
micro-F1 driven by the commonest finding, and a macro AUC of 0.50 ranks a positive above a negative no
better than a coin (the student report's MLPs). :func:`degeneracy_check` says so explicitly;
:func:`holm_adjust` corrects its p-values when a table tests many models at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from cxrbench.evaluation.metrics import auc_per_finding, macro_auc

__all__ = ["degeneracy_check", "holm_adjust"]


def _rank_aucs(y: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """AUC per column from score ranks (Mann-Whitney; ties averaged): ``(..., N, F)`` labels -> ``(..., F)``."""
    n_pos = y.sum(axis=-2)
    n_neg = y.shape[-2] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((y * ranks).sum(axis=-2) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def degeneracy_check(y_true: np.ndarray, scores: np.ndarray, y_pred: np.ndarray, n_permutations: int = 200,
                     seed: int = 0, *, alpha: float = 0.05, findings: Sequence[str] | None = None,
                     score_tol: float = 1e-6) -> dict[str, Any]:
    """Has a model learned anything? Constant outputs and a label-permutation test of its macro AUC.

    Parameters
    ----------
    y_true : ``(N, F)`` 0/1 test labels; scores : ``(N, F)`` float scores; y_pred : ``(N, F)`` 0/1 decisions.
    n_permutations : rows of ``y_true`` are permuted (keeping each image's label set) this many times
        and the macro AUC recomputed; ``p_value = (1 + #{permuted >= observed}) / (1 + n_permutations)``
        (the fraction, counting the observed labelling as one permutation so p is never 0).

    Returns
    -------
    dict with ``degenerate`` (bool: ``p_value > alpha``, or every finding's decisions constant, or every
    finding's scores constant), ``reasons`` (list of str), ``macro_auc``, ``p_value``, ``null_mean``,
    ``null_q95`` (95th percentile of the permuted macro AUCs), ``constant_findings`` (findings whose
    decisions are all 0 or all 1), ``flat_score_findings``, ``finding_p_values`` ({finding: p}, same
    test per finding) and ``n_informative`` (findings with p <= alpha).
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(y_pred)
    if y.ndim != 2 or s.shape != y.shape or p.shape != y.shape:
        raise ValueError(f"y_true, scores and y_pred must be (N, F) of one shape, got {y.shape}, {s.shape}, {p.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    findings = list(findings) if findings is not None else [f"finding_{j}" for j in range(y.shape[1])]
    observed = auc_per_finding(y, s, findings)["auc"].to_numpy(dtype=float)
    obs_macro = macro_auc(observed).auc
    ranks = rankdata(s, axis=0)
    rng = np.random.default_rng(seed)
    null = np.stack([_rank_aucs(y[rng.permutation(len(y))], ranks) for _ in range(n_permutations)])
    defined = ~np.isnan(observed)
    constant = [f for j, f in enumerate(findings) if p[:, j].min() == p[:, j].max()]
    flat = [f for j, f in enumerate(findings) if s[:, j].std() <= score_tol * (1.0 + abs(s[:, j].mean()))]
    result: dict[str, Any] = {"macro_auc": obs_macro, "p_value": math.nan, "null_mean": math.nan,
                              "null_q95": math.nan, "constant_findings": constant, "flat_score_findings": flat,
                              "finding_p_values": {}, "n_informative": 0, "n_findings": len(findings)}
    reasons = []
    if defined.any():
        null_macro = null[:, defined].mean(axis=1)
        result["p_value"] = float((1 + np.sum(null_macro >= obs_macro - 1e-12)) / (1 + n_permutations))
        result["null_mean"], result["null_q95"] = float(null_macro.mean()), float(np.quantile(null_macro, 0.95))
        per = {f: float((1 + np.sum(null[:, j] >= observed[j] - 1e-12)) / (1 + n_permutations))
               for j, f in enumerate(findings) if defined[j]}
        result["finding_p_values"] = per
        result["n_informative"] = int(sum(v <= alpha for v in per.values()))
        if result["p_value"] > alpha:
            reasons.append(f"macro AUC {obs_macro:.3f} is within label-permutation noise "
                           f"(p = {result['p_value']:.3f}; permuted labels reach {result['null_q95']:.3f} "
                           "at the 95th percentile)")
    else:
        reasons.append("no finding has both classes in these labels: AUC undefined")
    if len(constant) == len(findings):
        reasons.append("decisions are constant (all 0 or all 1) for every finding")
    if len(flat) == len(findings):
        reasons.append("scores are (near) constant for every finding")
    result["reasons"], result["degenerate"] = reasons, bool(reasons)
    return result


def holm_adjust(p_values: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values of ``(M,)`` p-values (NaN stays NaN, excluded from M)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else np.array([])
    out[order] = np.minimum(adjusted, 1.0)
    return out
