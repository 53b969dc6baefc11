"""Evaluation metrics: per-finding AUC with its spread, bootstrap CIs, micro/macro-F1, Hamming loss.

Conventions
-----------
* Labels are ``0``/``1`` (no NaN), scores are finite floats; arrays are ``(N,)`` or ``(N, F)``.
* An AUC that is undefined (no positives or no negatives) is **NaN with a reason**, never 0 or 0.5.
* Spread: Chester Table 1 reports mean ± std of the AUC over 10 random half-size subsets of the
  test set (:func:`auc_half_split_spread`); :func:`cxrbench.evaluation.bootstrap.bootstrap_auc_ci`
  gives percentile CIs. Both resample with the vectorised weighted AUC of :mod:`cxrbench.evaluation.bootstrap`.
* A sample is predicted positive when ``score >= threshold`` (scikit-learn's ROC convention).

Point AUCs come from :func:`sklearn.metrics.roc_auc_score`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.metrics import hamming_loss, roc_auc_score

from cxrbench._types import as_binary_labels, as_labels_and_scores
from cxrbench.evaluation.bootstrap import bootstrap_auc_ci, chunk_sizes, resampled_aucs
from cxrbench.evaluation.calibration import OperatingPoints

__all__ = [
    "AucSpread",
    "MacroAUC",
    "auc_half_split_spread",
    "auc_or_nan",
    "auc_per_finding",
    "evaluate_predictions",
    "macro_auc",
    "multilabel_report",
    "threshold_array",
    "threshold_comparison",
]


class AucSpread(NamedTuple):
    """Mean and sample std (ddof=1) of AUC over half-size subsets; floats for (N,), (F,) arrays for (N, F)."""

    mean: Any
    std: Any
    n_defined: Any  # subsets in which the AUC was defined


class MacroAUC(NamedTuple):
    """Mean AUC over the findings where it is defined."""

    auc: float
    n_defined: int
    n_findings: int


def _squeeze(values: np.ndarray, one_d: bool) -> Any:
    return values.item() if one_d else values


def auc_or_nan(y_true: Any, scores: Any) -> tuple[float, str]:
    """ROC AUC of ``(N,)`` labels and scores, or ``(nan, reason)`` when one class is absent.

    Returns ``(auc, note)``; ``note`` is ``""`` when the AUC is defined.
    """
    y, s, _ = as_labels_and_scores(y_true, scores)
    if y.shape[1] != 1:
        raise ValueError("auc_or_nan takes 1-D arrays; use auc_per_finding for (N, F)")
    n_pos = int(y.sum())
    if n_pos == 0:
        return math.nan, "no positives in this split"
    if n_pos == y.shape[0]:
        return math.nan, "no negatives in this split"
    return float(roc_auc_score(y[:, 0], s[:, 0])), ""


def auc_per_finding(y_true: Any, scores: Any, findings: Sequence[str]) -> pd.DataFrame:
    """Per-finding ROC AUC: DataFrame with columns finding, n_pos, n_neg, auc (NaN if undefined), note."""
    y, s, _ = as_labels_and_scores(y_true, scores)
    findings = tuple(findings)
    if y.shape[1] != len(findings):
        raise ValueError(f"{len(findings)} findings given for {y.shape[1]} columns")
    rows = []
    for j, finding in enumerate(findings):
        auc, note = auc_or_nan(y[:, j], s[:, j])
        n_pos = int(y[:, j].sum())
        rows.append({"finding": finding, "n_pos": n_pos, "n_neg": y.shape[0] - n_pos, "auc": auc, "note": note})
    return pd.DataFrame(rows, columns=["finding", "n_pos", "n_neg", "auc", "note"])


def macro_auc(aucs: Any) -> MacroAUC:
    """Mean of the defined (non-NaN) AUCs of ``(F,)`` findings, with how many were defined."""
    values = np.asarray(aucs, dtype=float).ravel()
    defined = ~np.isnan(values)
    mean = float(values[defined].mean()) if defined.any() else math.nan
    return MacroAUC(auc=mean, n_defined=int(defined.sum()), n_findings=int(values.size))


def auc_half_split_spread(y_true: Any, scores: Any, n_splits: int = 10, seed: int = 0) -> AucSpread:
    """Mean ± std of the AUC over ``n_splits`` random half-size subsets (Chester Table 1).

    Each subset draws ``N // 2`` rows without replacement (seeded by ``seed``); the same subsets
    are used for every finding. Subsets where a finding lacks a class are skipped for it
    (``n_defined`` says how many counted); std is the sample std (ddof=1), NaN with < 2 defined.
    """
    y, s, one_d = as_labels_and_scores(y_true, scores)
    if n_splits < 1:
        raise ValueError(f"n_splits must be >= 1, got {n_splits}")
    n = y.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples for half-splits, got {n}")
    rng = np.random.default_rng(seed)

    def blocks() -> Any:
        for size in chunk_sizes(n_splits, n):
            w = np.zeros((n, size))
            for column in range(size):
                w[rng.choice(n, size=n // 2, replace=False), column] = 1.0
            yield w

    aucs = resampled_aucs(y, s, blocks())
    n_defined = (~np.isnan(aucs)).sum(axis=0)
    mean = np.array([aucs[~np.isnan(aucs[:, j]), j].mean() if n_defined[j] else np.nan for j in range(y.shape[1])])
    std = np.array(
        [aucs[~np.isnan(aucs[:, j]), j].std(ddof=1) if n_defined[j] > 1 else np.nan for j in range(y.shape[1])]
    )
    return AucSpread(_squeeze(mean, one_d), _squeeze(std, one_d), _squeeze(n_defined, one_d))


def multilabel_report(y_true: Any, y_pred_binary: Any) -> dict[str, float]:
    """Micro-F1, macro-F1 and Hamming loss of ``(N, F)`` 0/1 labels vs 0/1 predictions (scikit-learn).

    Findings with no positive label and no positive prediction have undefined F1; they are left out
    of the macro average (``zero_division=nan``) and ``n_findings_in_macro_f1`` says how many counted.
    """
    y = as_binary_labels(y_true)
    p = as_binary_labels(y_pred_binary, name="y_pred_binary")
    if y.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"need (N, F) labels and predictions of the same shape, got {y.shape} and {p.shape}")
    # F1 by hand from the counts: scikit-learn reads a single (N, 1) column as a binary task with two
    # classes and would average F1 over "0" and "1" (micro-F1 then equals accuracy)
    tp = (y & p).sum(axis=0).astype(float)
    fp = ((1 - y) & p).sum(axis=0).astype(float)
    fn = (y & (1 - p)).sum(axis=0).astype(float)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        per_finding = np.where(denom > 0, 2 * tp / denom, np.nan)
    defined = ~np.isnan(per_finding)
    micro_denom = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "micro_f1": float(2 * tp.sum() / micro_denom) if micro_denom > 0 else math.nan,
        "macro_f1": float(per_finding[defined].mean()) if defined.any() else math.nan,
        "hamming_loss": float(hamming_loss(y, p)),
        "n_findings_in_macro_f1": int(defined.sum()),
    }


def threshold_array(thresholds: Any, findings: Sequence[str]) -> np.ndarray:
    """``(F,)`` float thresholds of ``findings`` (NaN: none) from operating points, a dict, an array or a float.

    ``thresholds``: None (all NaN), an :class:`~cxrbench.evaluation.calibration.OperatingPoints`, a
    ``{finding: threshold}`` dict (KeyError naming the missing findings), an ``(F,)`` array or one float.
    """
    findings = tuple(findings)
    if thresholds is None:
        return np.full(len(findings), np.nan)
    if isinstance(thresholds, OperatingPoints):
        return thresholds.as_array(findings)
    if isinstance(thresholds, Mapping):
        missing = [f for f in findings if f not in thresholds]
        if missing:
            raise KeyError(f"no threshold for {missing}")
        return np.array([float(thresholds[f]) for f in findings])
    arr = np.broadcast_to(np.asarray(thresholds, dtype=float), (len(findings),))
    return arr.astype(float)


def evaluate_predictions(
    y_true: Any,
    scores: Any,
    findings: Sequence[str],
    thresholds: Any = None,
    *,
    n_splits: int = 10,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Evaluate ``(N, F)`` scores against ``(N, F)`` 0/1 labels, one row per finding.

    Parameters
    ----------
    thresholds
        Operating points for the thresholded metrics (``score >= threshold`` is positive):
        an :class:`~cxrbench.evaluation.calibration.OperatingPoints` fitted on the validation split, a
        ``{finding: threshold}`` dict, an ``(F,)`` array or one float. ``None``: no F1/Hamming.

    Returns
    -------
    table
        Columns finding, n_pos, n_neg, auc, auc_mean_half_splits, auc_std_half_splits, auc_ci_low,
        auc_ci_high, threshold, f1, sensitivity, specificity, note (why a value is NaN).
    summary
        macro_auc, n_auc_defined, n_findings, micro_f1, macro_f1, hamming_loss (over the findings
        with a threshold), n_findings_thresholded, n_samples and the settings used.
    """
    y, s, one_d = as_labels_and_scores(y_true, scores)
    findings = tuple(findings)
    if one_d or y.shape[1] != len(findings):
        raise ValueError(f"need (N, F) arrays with F = len(findings) = {len(findings)}, got {np.shape(y_true)}")
    table = auc_per_finding(y, s, findings)
    spread = auc_half_split_spread(y, s, n_splits=n_splits, seed=seed)
    ci = bootstrap_auc_ci(y, s, n_boot=n_boot, alpha=alpha, seed=seed)
    thr = threshold_array(thresholds, findings)
    table["auc_mean_half_splits"] = spread.mean
    table["auc_std_half_splits"] = spread.std
    table["auc_ci_low"] = ci.low
    table["auc_ci_high"] = ci.high
    table["threshold"] = thr
    pred = _add_thresholded_columns(table, y, s, thr)
    table["note"] = _notes(table, spread.n_defined, n_splits, ci.n_defined, n_boot,
                           "no threshold" if thresholds is None else "no operating point (NaN threshold)")
    table = table[_EVALUATION_COLUMNS]
    summary = _summary(table, y, pred, ~np.isnan(thr))
    summary.update(n_splits=n_splits, n_boot=n_boot, alpha=alpha, seed=seed,
                   thresholds_fitted_on=thresholds.fitted_on if isinstance(thresholds, OperatingPoints) else None)
    return table, summary


_EVALUATION_COLUMNS = [
    "finding", "n_pos", "n_neg", "auc", "auc_mean_half_splits", "auc_std_half_splits", "auc_ci_low",
    "auc_ci_high", "threshold", "f1", "sensitivity", "specificity", "note",
]  # fmt: skip


def _add_thresholded_columns(table: pd.DataFrame, y: np.ndarray, s: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Add f1, sensitivity, specificity at ``thr`` (NaN where no threshold); return the ``(N, F)`` 0/1 decisions."""
    has_thr = ~np.isnan(thr)
    pred = (s >= np.where(has_thr, thr, np.inf)).astype(np.int8)
    tp = (pred & y).sum(axis=0)
    n_pos, n_neg = y.sum(axis=0), y.shape[0] - y.sum(axis=0)
    fp = (pred & (1 - y)).sum(axis=0)
    fn = n_pos - tp
    # per-finding F1 = 2TP / (2TP + FP + FN) (sklearn's binary F1; computed directly because
    # f1_score(average=None) treats a single (N, 1) column as a binary task with two classes)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        table["f1"] = np.where(has_thr & (denom > 0), 2 * tp / np.maximum(denom, 1), np.nan)
        table["sensitivity"] = np.where(has_thr & (n_pos > 0), tp / np.maximum(n_pos, 1), np.nan)
        table["specificity"] = np.where(has_thr & (n_neg > 0), 1 - fp / np.maximum(n_neg, 1), np.nan)
    return pred


def _notes(table: pd.DataFrame, spread_defined: np.ndarray, n_splits: int, ci_defined: np.ndarray, n_boot: int,
           no_threshold: str) -> list[str]:
    """Per finding, why a value is NaN or rests on fewer resamples than asked for."""
    auc, thr, f1 = (table[c].to_numpy(dtype=float) for c in ("auc", "threshold", "f1"))
    notes = []
    for j, note in enumerate(table["note"].astype(str)):
        parts = [note] if note else []
        if not np.isnan(auc[j]):
            if spread_defined[j] < n_splits:
                parts.append(f"AUC undefined in {n_splits - spread_defined[j]}/{n_splits} half-splits")
            if ci_defined[j] < n_boot:
                parts.append(f"AUC undefined in {n_boot - ci_defined[j]}/{n_boot} bootstrap samples")
        if np.isnan(thr[j]):
            parts.append(no_threshold)
        elif np.isnan(f1[j]):
            parts.append("F1 undefined: no positives and none predicted")
        notes.append("; ".join(parts))
    return notes


def _summary(table: pd.DataFrame, y: np.ndarray, pred: np.ndarray, has_thr: np.ndarray) -> dict[str, Any]:
    """Macro AUC and the multi-label scores over the findings with a threshold."""
    macro = macro_auc(table["auc"].to_numpy())
    if has_thr.any():
        report = multilabel_report(y[:, has_thr], pred[:, has_thr])
    else:
        report = {"micro_f1": math.nan, "macro_f1": math.nan, "hamming_loss": math.nan, "n_findings_in_macro_f1": 0}
    return {"macro_auc": macro.auc, "n_auc_defined": macro.n_defined, "n_findings": macro.n_findings, **report,
            "n_findings_thresholded": int(has_thr.sum()), "n_samples": int(y.shape[0])}


def threshold_comparison(y_true: Any, scores: Any, findings: Sequence[str], operating_points: Any) -> pd.DataFrame:
    """F1, sensitivity and specificity at a flat 0.5 vs at each finding's operating point.

    This is what calibration changes: a raw sigmoid of 0.5 means little for a finding with 2 %
    prevalence; the operating point (fitted on validation) is where that finding's ROC curve is
    furthest from the diagonal.
    """
    y, s, _ = as_labels_and_scores(y_true, scores)
    findings = tuple(findings)
    opt = threshold_array(operating_points, findings)
    rows = []
    for j, f in enumerate(findings):
        row: dict[str, Any] = {"finding": f, "n_pos": int(y[:, j].sum()), "operating_point": opt[j]}
        for name, thr in (("0.5", 0.5), ("opt", opt[j])):
            if np.isnan(thr):
                row.update({f"f1@{name}": np.nan, f"sens@{name}": np.nan, f"spec@{name}": np.nan})
                continue
            pred = s[:, j] >= thr
            pos = y[:, j] == 1
            tp, fp, fn = int((pred & pos).sum()), int((pred & ~pos).sum()), int((~pred & pos).sum())
            denom = 2 * tp + fp + fn
            row[f"f1@{name}"] = 2 * tp / denom if denom else np.nan
            row[f"sens@{name}"] = tp / pos.sum() if pos.any() else np.nan
            row[f"spec@{name}"] = 1 - fp / (~pos).sum() if (~pos).any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
