"""Has a model learned anything: the degeneracy check and its Holm adjustment (cxrbench.evaluation.degeneracy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from cxrbench.evaluation import degeneracy
from cxrbench.evaluation.degeneracy import degeneracy_check, holm_adjust


def test_random_scores_are_flagged_and_informative_scores_are_not():
    rng = np.random.default_rng(1)
    y = (rng.random((120, 4)) < 0.3).astype(int)
    random_scores = rng.random((120, 4))
    res = degeneracy_check(y, random_scores, (random_scores > 0.5).astype(int), n_permutations=200, seed=0)
    assert res["degenerate"] and res["p_value"] > 0.05 and "permutation" in res["reasons"][0]
    informative = y + rng.normal(0, 0.8, y.shape)
    res = degeneracy_check(y, informative, (informative > 0.5).astype(int), n_permutations=200, seed=0)
    assert not res["degenerate"] and res["p_value"] == pytest.approx(1 / 201) and res["reasons"] == []
    assert res["n_informative"] == 4
    assert res["macro_auc"] == pytest.approx(np.mean([roc_auc_score(y[:, j], informative[:, j]) for j in range(4)]))


def test_constant_predictions_are_flagged_even_with_informative_scores():
    rng = np.random.default_rng(2)
    y = (rng.random((100, 3)) < 0.3).astype(int)
    s = y + rng.normal(0, 0.5, y.shape)
    res = degeneracy_check(y, s, np.zeros_like(y), n_permutations=50)
    assert res["degenerate"] and res["constant_findings"] == ["finding_0", "finding_1", "finding_2"]
    assert any("constant" in r for r in res["reasons"])
    flat = degeneracy_check(y, np.full(y.shape, 0.3), np.ones_like(y), n_permutations=50)
    assert flat["degenerate"] and len(flat["flat_score_findings"]) == 3 and flat["macro_auc"] == pytest.approx(0.5)


def test_holm_adjustment_known_values():
    np.testing.assert_allclose(holm_adjust(np.array([0.01, 0.04, np.nan, 0.03])), [0.03, 0.06, np.nan, 0.06])
    np.testing.assert_allclose(holm_adjust(np.array([0.5, 0.9])), [1.0, 1.0])


def test_permutation_null_matches_sklearn_auc_of_permuted_labels():
    rng = np.random.default_rng(3)
    y = (rng.random((40, 2)) < 0.4).astype(int)
    s = np.round(rng.random((40, 2)), 1)  # ties
    ranks = rankdata(s, axis=0)
    perm = rng.permutation(40)
    fast = degeneracy._rank_aucs(y[perm].astype(float), ranks)
    slow = [roc_auc_score(y[perm][:, j], s[:, j]) for j in range(2)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        degeneracy_check(y, s[:10], y)
