"""Tests for cxrbench.evaluation.metrics against scikit-learn on known arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, hamming_loss, roc_auc_score

from cxrbench.evaluation.bootstrap import bootstrap_auc_ci
from cxrbench.evaluation.calibration import fit_operating_points
from cxrbench.evaluation.metrics import (
    auc_half_split_spread,
    auc_or_nan,
    auc_per_finding,
    evaluate_predictions,
    macro_auc,
    multilabel_report,
)


def _synthetic(n: int, n_findings: int, prevalence: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n, F) and scores with AUC ~0.8, rounded to 2 decimals so ties occur."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_findings)) < prevalence).astype(int)
    s = np.round(1 / (1 + np.exp(-rng.normal(1.2 * y - 0.6, 1.0))), 2)
    return y, s


def test_auc_per_finding_matches_sklearn_and_reports_undefined_as_nan() -> None:
    y, s = _synthetic(120, 4)
    y[:, 2] = 0  # no positives
    y[:, 3] = 1  # no negatives
    table = auc_per_finding(y, s, ["A", "B", "C", "D"])
    assert list(table.columns) == ["finding", "n_pos", "n_neg", "auc", "note"]
    for j in (0, 1):
        assert table.auc[j] == pytest.approx(roc_auc_score(y[:, j], s[:, j]))
        assert table.note[j] == ""
    assert math.isnan(table.auc[2]) and table.note[2] == "no positives in this split"
    assert math.isnan(table.auc[3]) and table.note[3] == "no negatives in this split"
    assert (table.n_pos[2], table.n_neg[3]) == (0, 0)
    assert auc_or_nan([0, 1, 1], [0.2, 0.1, 0.9]) == (pytest.approx(0.5), "")


def test_half_split_spread_matches_definition_and_is_reproducible() -> None:
    y, s = _synthetic(200, 2, seed=2)
    spread = auc_half_split_spread(y, s, n_splits=10, seed=4)
    rng = np.random.default_rng(4)
    aucs = []
    for _ in range(10):
        rows = rng.choice(200, size=100, replace=False)
        aucs.append([roc_auc_score(y[rows, j], s[rows, j]) for j in range(2)])
    aucs = np.array(aucs)
    np.testing.assert_allclose(spread.mean, aucs.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(spread.std, aucs.std(axis=0, ddof=1), atol=1e-12)
    assert spread.n_defined.tolist() == [10, 10]
    again = auc_half_split_spread(y, s, n_splits=10, seed=4)
    np.testing.assert_array_equal(again.std, spread.std)


def test_spread_and_ci_shrink_with_more_data() -> None:
    y_small, s_small = _synthetic(200, 1, seed=7)
    y_large, s_large = _synthetic(5000, 1, seed=7)
    small = auc_half_split_spread(y_small[:, 0], s_small[:, 0], n_splits=10, seed=0)
    large = auc_half_split_spread(y_large[:, 0], s_large[:, 0], n_splits=10, seed=0)
    assert large.std < small.std / 2
    ci_small = bootstrap_auc_ci(y_small[:, 0], s_small[:, 0], n_boot=200, seed=0)
    ci_large = bootstrap_auc_ci(y_large[:, 0], s_large[:, 0], n_boot=200, seed=0)
    assert (ci_large.high - ci_large.low) < (ci_small.high - ci_small.low) / 2


def test_macro_auc_ignores_undefined_findings_and_counts_them() -> None:
    result = macro_auc([0.8, np.nan, 0.6, np.nan])
    assert result.auc == pytest.approx(0.7) and (result.n_defined, result.n_findings) == (2, 4)
    assert math.isnan(macro_auc([np.nan]).auc)


def test_multilabel_report_matches_sklearn() -> None:
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    p = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    report = multilabel_report(y, p)
    assert report["micro_f1"] == pytest.approx(f1_score(y, p, average="micro"))
    # third finding: no positives, none predicted -> undefined, left out (not counted as 0 or 1)
    assert report["macro_f1"] == pytest.approx(f1_score(y[:, :2], p[:, :2], average="macro"))
    assert report["n_findings_in_macro_f1"] == 2
    assert report["hamming_loss"] == pytest.approx(hamming_loss(y, p)) == pytest.approx(2 / 12)
    with pytest.raises(ValueError, match="same shape"):
        multilabel_report(y, p[:, :2])


def test_evaluate_predictions_table_and_summary() -> None:
    findings = ["Atelectasis", "Effusion", "Hernia"]
    y_val, s_val = _synthetic(400, 3, seed=8)
    y_val[:, 2] = 0  # Hernia: no positives in validation -> NaN operating point
    points = fit_operating_points(y_val, s_val, findings)
    y, s = _synthetic(300, 3, seed=9)
    table, summary = evaluate_predictions(y, s, findings, thresholds=points, n_boot=200)
    assert list(table.finding) == findings and len(table) == 3
    for column in ("n_pos", "n_neg", "auc", "auc_std_half_splits", "auc_ci_low", "auc_ci_high", "threshold", "f1",
                   "note"):
        assert column in table.columns
    for j in range(3):
        assert table.auc[j] == pytest.approx(roc_auc_score(y[:, j], s[:, j]))
        assert table.auc_ci_low[j] < table.auc[j] < table.auc_ci_high[j]
        assert 0 < table.auc_std_half_splits[j] < 0.1
    thr = points.thresholds["Effusion"]
    assert table.threshold[1] == thr
    assert table.f1[1] == pytest.approx(f1_score(y[:, 1], s[:, 1] >= thr))
    assert math.isnan(table.threshold[2]) and math.isnan(table.f1[2])
    assert "no operating point" in table.note[2]
    pred = (s[:, :2] >= points.as_array()[:2]).astype(int)
    assert summary["micro_f1"] == pytest.approx(f1_score(y[:, :2], pred, average="micro"))
    assert summary["hamming_loss"] == pytest.approx(hamming_loss(y[:, :2], pred))
    assert summary["macro_auc"] == pytest.approx(table.auc.mean())
    assert summary["n_findings_thresholded"] == 2 and summary["thresholds_fitted_on"] == "validation"


def test_evaluate_predictions_undefined_auc_and_no_thresholds() -> None:
    y, s = _synthetic(100, 2, seed=10)
    y[:, 1] = 0
    table, summary = evaluate_predictions(y, s, ["A", "B"], n_boot=50, n_splits=5)
    assert math.isnan(table.auc[1]) and math.isnan(table.auc_ci_low[1]) and math.isnan(table.auc_std_half_splits[1])
    assert table.note[1].startswith("no positives in this split")
    assert table.auc[0] > 0.6 and summary["n_auc_defined"] == 1
    assert summary["macro_auc"] == pytest.approx(table.auc[0])
    assert math.isnan(summary["micro_f1"]) and table.f1.isna().all() and "no threshold" in table.note[0]
    with pytest.raises(ValueError, match="len\\(findings\\)"):
        evaluate_predictions(y, s, ["A"])


def test_f1_with_a_single_thresholded_finding_and_threshold_comparison():
    """Regression: one finding with a threshold (others NaN) must give one F1, not sklearn's two-class array."""
    from cxrbench.evaluation.metrics import threshold_comparison

    y = np.array([[1, 0], [1, 0], [0, 0], [0, 1]])
    s = np.array([[0.9, 0.2], [0.4, 0.1], [0.3, 0.3], [0.1, 0.8]])
    table, _ = evaluate_predictions(y, s, ["A", "B"], [0.35, np.nan], n_boot=20)
    assert table.loc[0, "f1"] == pytest.approx(1.0) and np.isnan(table.loc[1, "f1"])
    cmp = threshold_comparison(y, s, ["A", "B"], [0.35, 0.5])
    assert cmp.loc[0, "f1@0.5"] == pytest.approx(2 / 3)  # TP 1, FN 1
    assert cmp.loc[0, "f1@opt"] == pytest.approx(1.0)
    assert cmp.loc[1, "sens@opt"] == 1.0 and cmp.loc[1, "spec@opt"] == 1.0


def test_multilabel_report_with_one_finding_is_the_binary_f1():
    """Regression: with (N, 1) labels sklearn averaged over both classes, so micro-F1 was accuracy."""
    from cxrbench.evaluation.metrics import multilabel_report

    y = np.array([[1], [1], [0], [0], [0], [0]])
    nothing = multilabel_report(y, np.zeros_like(y))
    assert nothing["micro_f1"] == 0.0 and nothing["macro_f1"] == 0.0
    some = multilabel_report(y, np.array([[1], [0], [1], [0], [0], [0]]))
    assert some["micro_f1"] == pytest.approx(0.5) and some["macro_f1"] == pytest.approx(0.5)
    multi = np.array([[1, 0], [0, 1], [1, 1]])
    pred = np.array([[1, 0], [1, 1], [0, 1]])
    r = multilabel_report(multi, pred)
    assert r["micro_f1"] == pytest.approx(f1_score(multi, pred, average="micro"))
    assert r["macro_f1"] == pytest.approx(f1_score(multi, pred, average="macro"))
