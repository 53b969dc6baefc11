"""The one bootstrap (cxrbench.evaluation.bootstrap): the weighted AUC, per-finding and macro-AUC CIs."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrbench.evaluation.bootstrap import bootstrap_auc_ci, bootstrap_macro_auc_ci, weighted_auc


def _synthetic(n: int, n_findings: int, prevalence: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n, F) and scores with AUC ~0.8, rounded to 2 decimals so ties occur."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_findings)) < prevalence).astype(int)
    s = np.round(1 / (1 + np.exp(-rng.normal(1.2 * y - 0.6, 1.0))), 2)
    return y, s


@pytest.mark.parametrize("prevalence", [0.2, 0.8])  # the rarer class is positives, then negatives
def test_weighted_auc_equals_sklearn_on_resampled_data_with_ties(prevalence: float) -> None:
    y, s = _synthetic(80, 1, prevalence=prevalence, seed=3)
    y, s = y[:, 0], s[:, 0]
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 80, size=(6, 80))
    counts = np.stack([np.bincount(r, minlength=80) for r in rows])
    ours = weighted_auc(y, s, counts)
    expected = [roc_auc_score(y[r], s[r]) for r in rows]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    weights = rng.uniform(0, 2, size=(3, 80))
    np.testing.assert_allclose(
        weighted_auc(y, s, weights), [roc_auc_score(y, s, sample_weight=w) for w in weights], atol=1e-12
    )
    only_negatives = np.where(y == 1, 0.0, 1.0)[None]
    assert np.isnan(weighted_auc(y, s, only_negatives)).all()


def test_bootstrap_ci_reproducible_contains_point_and_handles_rare_findings() -> None:
    y, s = _synthetic(300, 3, seed=1)
    y[:, 1] = 0
    y[:5, 1] = 1  # 5 positives in 300: some bootstrap samples have none
    y[:, 2] = 0  # never defined
    first = bootstrap_auc_ci(y, s, n_boot=300, seed=11)
    second = bootstrap_auc_ci(y, s, n_boot=300, seed=11)
    other = bootstrap_auc_ci(y, s, n_boot=300, seed=12)
    np.testing.assert_array_equal(first.low, second.low)
    np.testing.assert_array_equal(first.high, second.high)
    assert first.low[0] != other.low[0]
    auc0 = roc_auc_score(y[:, 0], s[:, 0])
    assert first.low[0] < auc0 < first.high[0]
    assert 250 < first.n_defined[1] < 300  # P(no positive) = (295/300)^300 ~ 0.6 %: a few dropped
    assert first.n_defined[0] == 300 and first.n_defined[2] == 0
    assert math.isnan(first.low[2]) and math.isnan(first.high[2])
    single = bootstrap_auc_ci(y[:, 0], s[:, 0], n_boot=300, seed=11)
    assert isinstance(single.low, float) and single.low == pytest.approx(first.low[0])


def test_bootstrap_percentiles_match_a_plain_sklearn_loop() -> None:
    y, s = _synthetic(60, 1, seed=5)
    ci = bootstrap_auc_ci(y[:, 0], s[:, 0], n_boot=50, alpha=0.1, seed=2)
    rng = np.random.default_rng(2)  # same draws as the implementation: one (n_boot, N) index block
    rows = rng.integers(0, 60, size=(50, 60))
    aucs = [roc_auc_score(y[r, 0], s[r, 0]) for r in rows if 0 < y[r, 0].sum() < 60]
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(aucs, [0.05, 0.95])))


def test_bootstrap_speed_14_findings_500_samples_1000_boots() -> None:
    y, s = _synthetic(500, 14, prevalence=0.1, seed=0)
    start = time.perf_counter()
    ci = bootstrap_auc_ci(y, s, n_boot=1000, seed=0)
    elapsed = time.perf_counter() - start
    assert ci.low.shape == (14,) and np.all(ci.n_defined == 1000)
    assert elapsed < 2.0, f"bootstrap took {elapsed:.2f} s"


def test_macro_ci_matches_a_plain_sklearn_loop_over_the_same_draws() -> None:
    y, s = _synthetic(70, 3, seed=6)
    y[:, 2] = 0
    y[:1, 2] = 1  # one positive: undefined in about a third of the samples, which then average the other two
    ci = bootstrap_macro_auc_ci(y, s, n_boot=40, alpha=0.1, seed=3)
    rows = np.random.default_rng(3).integers(0, 70, size=(40, 70))  # the draws of bootstrap_auc_ci
    macro = []
    for r in rows:
        aucs = [roc_auc_score(y[r, j], s[r, j]) for j in range(3) if 0 < y[r, j].sum() < 70]
        macro.append(np.mean(aucs))
    assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(macro, [0.05, 0.95])))
    assert ci.n_defined == 40
    per_finding = bootstrap_auc_ci(y, s, n_boot=40, seed=3)
    assert per_finding.n_defined[2] < 40  # the same resamples, where the rare finding lacks positives


def test_macro_ci_is_nan_without_rows_or_defined_samples_and_a_generator_draws_in_sequence() -> None:
    empty = bootstrap_macro_auc_ci(np.zeros((0, 2)), np.zeros((0, 2)), n_boot=10)
    assert math.isnan(empty.low) and math.isnan(empty.high) and empty.n_defined == 0
    none = bootstrap_macro_auc_ci(np.zeros((20, 2)), np.random.default_rng(0).random((20, 2)), n_boot=10)
    assert math.isnan(none.low) and none.n_defined == 0
    y, s = _synthetic(50, 2, seed=8)
    rng = np.random.default_rng(5)
    first, second = bootstrap_macro_auc_ci(y, s, 30, seed=rng), bootstrap_macro_auc_ci(y, s, 30, seed=rng)
    assert first != second and first == bootstrap_macro_auc_ci(y, s, 30, seed=5)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_macro_auc_ci(y, s, 30, alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_auc_ci(y, s, n_boot=0)
