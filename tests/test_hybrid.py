"""Hybrid-feature classifiers, the experiment table, layer4 fine-tuning, the notebook (the degeneracy check:
test_degeneracy.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrbench.hybrid import (
    LogisticBaseline,
    TorchMLPClassifier,
    finetune_layer4,
    resnet18_backbone,
    run_hybrid_experiment,
)
from cxrbench.hybrid import experiment as hybrid
from cxrbench.plots import comparison_figure

ROOT = Path(__file__).resolve().parents[1]


def _informative(n=300, f=3, seed=0, signal=1.5):
    """Labels (N, F) and features (N, 8) whose first F columns shift with the labels."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, f)) < 0.3).astype(np.float32)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x[:, :f] += signal * y
    return x, y


# ------------------------------------------------------------------------ classifiers
def test_logistic_and_mlps_learn_informative_features_and_are_seeded():
    x, y = _informative()
    tr, va, te = slice(0, 180), slice(180, 240), slice(240, 300)
    for clf in (LogisticBaseline(), TorchMLPClassifier((32,), max_epochs=40, patience=5, seed=0),
                TorchMLPClassifier((32, 16, 8), max_epochs=40, patience=5, seed=0)):
        p = clf.fit(x[tr], y[tr], x[va], y[va]).predict_proba(x[te])
        assert p.shape == (60, 3) and ((p >= 0) & (p <= 1)).all()
        assert min(roc_auc_score(y[te][:, j], p[:, j]) for j in range(3)) > 0.75
    a = TorchMLPClassifier((16,), max_epochs=5, seed=7).fit(x[tr], y[tr], x[va], y[va]).predict_proba(x[te])
    b = TorchMLPClassifier((16,), max_epochs=5, seed=7).fit(x[tr], y[tr], x[va], y[va]).predict_proba(x[te])
    np.testing.assert_array_equal(a, b)


def test_mlp_early_stopping_restores_the_best_validation_epoch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 50)).astype(np.float32)
    y = (rng.random((60, 1)) < 0.5).astype(np.float32)  # pure noise: validation loss soon rises
    clf = TorchMLPClassifier((64,), dropout=0.0, lr=1e-2, max_epochs=200, patience=4, seed=0)
    clf.fit(x[:40], y[:40], x[40:], y[40:])
    losses = [h["val_loss"] for h in clf.history_]
    assert len(losses) < 200 and len(losses) == clf.best_epoch_ + 4
    assert min(losses) == losses[clf.best_epoch_ - 1]


def test_logistic_handles_a_finding_without_training_positives():
    x, y = _informative(f=2)
    y[:, 1] = 0
    p = LogisticBaseline().fit(x, y).predict_proba(x)
    np.testing.assert_array_equal(p[:, 1], 0.0)


# ------------------------------------------------------------------------ experiment table
def test_experiment_table_layout_flags_and_validation_thresholds(monkeypatch):
    rng = np.random.default_rng(0)
    x, y = _informative(n=240, f=2, signal=2.0)
    split = np.array(["train"] * 150 + ["val"] * 40 + ["test"] * 50)
    features = {"signal": x, "noise": rng.normal(size=(240, 6)).astype(np.float32)}
    features["noise"][3] = np.nan  # an unreadable image
    seen = []
    real_fit = hybrid.fit_operating_points

    def spy(y_fit, s, findings, **kw):
        seen.append(len(y_fit))
        return real_fit(y_fit, s, findings, **kw)

    monkeypatch.setattr(hybrid, "fit_operating_points", spy)
    table = run_hybrid_experiment(features, y, split, ["A", "B"], classifiers=("logreg",), n_permutations=100,
                                  reference_scores={"oracle": y + 0.0}, seed=0)
    assert list(table.columns) == hybrid.TABLE_COLUMNS
    assert (table["p (Holm)"] >= table["p-value"]).all()
    assert list(table["Features"]) == ["-", "signal", "noise", "signal + noise", "(end-to-end model)"]
    assert set(seen) == {40}  # every threshold fitted on the 40 validation rows, never on test
    by = table.set_index("Features")
    assert bool(by.loc["-", "Degenerate"]) and by.loc["-", "Micro-F1"] == 0.0
    assert not by.loc["signal", "Degenerate"] and by.loc["signal", "Macro AUC"] > 0.8
    assert by.loc["noise", "Degenerate"] and by.loc["noise", "p-value"] > 0.05
    assert not by.loc["signal + noise", "Degenerate"]
    assert "1 unreadable images left out" in by.loc["noise", "Notes"]
    assert by.loc["(end-to-end model)", "Macro AUC"] == 1.0 and by.loc["(end-to-end model)", "Hamming loss"] == 0.0
    fig = comparison_figure(table)
    hatched = [p for p in fig.axes[0].patches if p.get_hatch()]
    assert len(hatched) == 3 * int(table["Degenerate"].sum())
    with pytest.raises(ValueError, match="unknown feature blocks"):
        run_hybrid_experiment(features, y, split, ["A", "B"], combos={"x": ["hog"]})


def test_single_finding_f1_is_the_positive_class_f1():
    rng = np.random.default_rng(0)
    y = (rng.random((80, 1)) < 0.6).astype(np.float32)
    s = y + rng.normal(0, 0.7, y.shape)
    row = hybrid.evaluate_scores(y[:30], s[:30], y[30:], s[30:], ["Pneumonia"], n_permutations=50, n_boot=20)
    from sklearn.metrics import f1_score

    thr = hybrid.fit_operating_points(y[:30], s[:30], ["Pneumonia"]).as_array()
    expected = f1_score(y[30:, 0], s[30:, 0] >= thr[0])
    assert row["Micro-F1"] == pytest.approx(expected) and row["Macro-F1"] == pytest.approx(expected)
    nothing = hybrid.evaluate_scores(y[:30], 0 * s[:30], y[30:], 0 * s[30:], ["Pneumonia"],
                                     thresholds=np.array([np.inf]), n_permutations=50, n_boot=20)
    assert nothing["Micro-F1"] == 0.0 and nothing["Hamming loss"] == pytest.approx(y[30:].mean())


# ------------------------------------------------------------------------ fine-tuning
def test_finetune_layer4_trains_only_layer4_and_head(tmp_path):
    from cxrbench.data import load_manifest
    from cxrbench.data.synthetic import write_phantom_set
    from cxrbench.preprocess import Preprocess

    df = load_manifest(write_phantom_set(tmp_path / "ph", 6, size=48, seed=0))
    base = resnet18_backbone(2, seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = finetune_layer4(base, df, ["Effusion", "Cardiomegaly"], Preprocess(size=32, equalize="hist"), epochs=1,
                          batch_size=6, cache_dir=tmp_path / "cache")
    after = res.model.state_dict()
    assert len(res.history) == 1 and all(np.isfinite(h["train_loss"]) for h in res.history)
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        trainable = k.startswith(("layer4.", "fc.")) and not k.endswith("num_batches_tracked")
        if k.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")):
            assert not changed, f"{k} moved but should be frozen"
        if trainable and k.endswith("weight"):
            assert changed, f"{k} did not train"
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # input model untouched
    assert not res.model.training


# ------------------------------------------------------------------------ notebook
@pytest.mark.notebook
@pytest.mark.slow
def test_notebook_06_runs_under_papermill(tmp_path):
    import nbformat
    import papermill as pm

    from cxrbench.models.bundle import untrained_classifier_bundle
    from cxrbench.preprocess import Preprocess

    refs = {name: str(untrained_classifier_bundle(tmp_path / name, preprocess=Preprocess(size=64), name=name))
            for name in ("nih-ref", "paediatric-ref")}
    out = tmp_path / "06.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "06_hybrid_features.ipynb"), str(out), cwd=str(ROOT),
                        kernel_name="python3", progress_bar=False,
                        parameters={"max_images": 60, "image_size": 64, "finetune_epochs": 1, "n_permutations": 100,
                                    "mlp_max_epochs": 20, "reference_bundle": refs["nih-ref"],
                                    "paediatric_reference_bundle": refs["paediatric-ref"]})
    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("data", {}).get("text/html", ""))
                   + str(o.get("text", ""))
                   for c in nb.cells for o in c.get("outputs", []))
    assert "Macro AUC" in text and "Degenerate" in text
    # one results table per task; each task's reference row comes from its own bundle
    tables = [str(o["data"]["text/html"]) for c in nb.cells for o in c.get("outputs", [])
              if "Micro-F1" in str(o.get("data", {}).get("text/html", ""))]
    assert len(tables) == 2
    assert "Reference: nih-ref" in tables[0] and "paediatric-ref" not in tables[0]
    assert "Reference: paediatric-ref" in tables[1] and "nih-ref" not in tables[1]
    # the published results: the constant baseline is flagged, as the package's own degeneracy check says,
    # and every row's flag agrees with its permutation p-value
    from cxrbench.cli.notebooks import read_results
    from cxrbench.evaluation import degeneracy_check

    published = read_results(nb)["06_hybrid"]
    assert len(published) == 2
    for task, r in published.items():
        y_test = np.array(r["y_test"], dtype=int)
        baseline = r["table"][0]
        assert baseline["Degenerate"] is True, (task, baseline)
        zeros = np.zeros_like(y_test, dtype=float)
        assert degeneracy_check(y_test, zeros, zeros.astype(np.int8), 100, 0)["degenerate"]
        for row in r["table"]:
            if row["p-value"] is not None and row["p-value"] > 0.05:
                assert row["Degenerate"] is True, (task, row)
