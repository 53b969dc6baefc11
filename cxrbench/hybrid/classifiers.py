"""Classifiers on hybrid feature vectors, a degeneracy check, and the report's comparison table.

The student report (weeks 5-7) classified LBP + HOG + ResNet18 vectors with an MLP and a deeper MLP
and reported micro-F1 ~0.49, macro-F1 ~0.05-0.08 and macro AUC ~0.50 as progress. A macro AUC of
0.50 means the scores rank a positive above a negative no better than a coin; with 14 rare findings a
model that predicts (almost) nothing still gets a low Hamming loss and a micro-F1 driven by the
commonest finding. :func:`degeneracy_check` says so explicitly, with a label-permutation test, and
:func:`run_hybrid_experiment` puts its verdict in every row of the table.

Protocol (each row): fit on the train split, early-stop on validation loss (MLPs), choose one Youden
threshold per finding on the validation split (:func:`cxrbench.evaluation.calibration.fit_operating_points`),
report on the test split, which is used for nothing else. Tasks and feature blocks live in
:mod:`cxrbench.hybrid.tasks` and are re-exported here.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata
from torch import nn

from cxrbench.evaluation.calibration import fit_operating_points
from cxrbench.evaluation.metrics import auc_per_finding, evaluate_predictions, macro_auc
from cxrbench.hybrid.tasks import (
    REPORT_COMBOS,
    FinetuneResult,
    bundle_scores,
    finetune_layer4,
    hybrid_feature_blocks,
    load_task,
    resnet18_backbone,
    task_folders,
)

__all__ = ["CLASSIFIERS", "REPORT_COMBOS", "FinetuneResult", "LogisticBaseline", "TorchMLPClassifier", "bundle_scores",
           "comparison_chart", "degeneracy_check", "evaluate_scores", "finetune_layer4", "hybrid_feature_blocks",
           "load_task", "task_folders", "make_classifier", "holm_adjust", "resnet18_backbone", "run_hybrid_experiment"]

TABLE_COLUMNS = ["Model", "Features", "Micro-F1", "Macro-F1", "Hamming loss", "Macro AUC", "Degenerate", "p-value",
                 "p (Holm)", "Informative findings", "Notes"]


# ----------------------------------------------------------------------------------- classifiers
def _check_xy(x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"features must be a finite (N, D) array, got shape {x.shape} (drop NaN rows first)")
    if y is None:
        return x, None
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 2 or y.shape[0] != x.shape[0] or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1 of shape (N={x.shape[0]}, F), got {y.shape}")
    return x, y


class LogisticBaseline:
    """One-vs-rest (binary relevance) L2 logistic regression, ``class_weight="balanced"`` (scikit-learn).

    A finding with one class only in the training rows gets that class's constant probability.
    """

    def __init__(self, C: float = 0.1, max_iter: int = 2000, seed: int = 0):
        self.C, self.max_iter, self.seed = C, max_iter, seed
        self.models_: list[Any] = []

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray | None = None, y_val: np.ndarray | None = None):
        """Fit on ``(N, D)`` float features and ``(N, F)`` 0/1 labels (validation data unused)."""
        from sklearn.linear_model import LogisticRegression

        x, y = _check_xy(x, y)
        self.models_ = []
        for j in range(y.shape[1]):
            col = y[:, j]
            if col.min() == col.max():
                self.models_.append(float(col[0]))
                continue
            lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=self.max_iter, random_state=self.seed)
            self.models_.append(lr.fit(x, col.astype(int)))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(N, F)`` float64 probabilities in [0, 1]."""
        x, _ = _check_xy(x)
        cols = [np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1] for m in self.models_]
        return np.stack(cols, axis=1).astype(np.float64)


class _MLP(nn.Sequential):
    def __init__(self, n_in: int, hidden: Sequence[int], n_out: int, dropout: float):
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU(), nn.Dropout(dropout)]
            n_in = h
        super().__init__(*layers, nn.Linear(n_in, n_out))


class TorchMLPClassifier:
    """Multi-label MLP in torch: ReLU + dropout hidden layers, BCE-with-logits with ``pos_weight``.

    Adam; early stopping on the validation loss (best weights restored); seeded, and the global torch
    random state is left untouched. ``history_`` holds ``epoch, train_loss, val_loss`` per epoch.
    """

    def __init__(self, hidden: Sequence[int] = (512,), *, dropout: float = 0.4, lr: float = 1e-3,
                 weight_decay: float = 1e-4, batch_size: int = 64, max_epochs: int = 200, patience: int = 10,
                 max_pos_weight: float = 100.0, seed: int = 0):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden, self.dropout, self.lr, self.weight_decay = tuple(hidden), dropout, lr, weight_decay
        self.batch_size, self.max_epochs, self.patience = batch_size, max_epochs, patience
        self.max_pos_weight, self.seed = max_pos_weight, seed
        self.model_: _MLP | None = None
        self.history_: list[dict[str, float]] = []
        self.best_epoch_ = 0

    def fit(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> "TorchMLPClassifier":
        """Train on ``(N, D)``/``(N, F)``; stop when the validation loss has not improved for ``patience`` epochs."""
        x, y = _check_xy(x, y)
        x_val, y_val = _check_xy(x_val, y_val)
        pos = y.sum(axis=0)
        pw = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0).clip(0, self.max_pos_weight)
        criterion = nn.BCEWithLogitsLoss(pos_weight=torch.as_tensor(pw, dtype=torch.float32))
        xt, yt, xv, yv = map(torch.from_numpy, (x, y, x_val, y_val))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _MLP(x.shape[1], self.hidden, y.shape[1], self.dropout)
            opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True)
            gen = torch.Generator().manual_seed(self.seed)
            best, best_state, waited, self.history_ = math.inf, _snapshot(model), 0, []
            for epoch in range(1, self.max_epochs + 1):
                model.train()
                total = 0.0
                for idx in torch.randperm(len(xt), generator=gen).split(self.batch_size):
                    opt.zero_grad()
                    loss = criterion(model(xt[idx]), yt[idx])
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                model.eval()
                with torch.no_grad():
                    val_loss = float(criterion(model(xv), yv))
                self.history_.append({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss})
                if val_loss < best - 1e-6:
                    best, best_state, waited, self.best_epoch_ = val_loss, _snapshot(model), 0, epoch
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
        model.load_state_dict(best_state)
        self.model_ = model.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(N, F)`` float64 sigmoid probabilities."""
        if self.model_ is None:
            raise RuntimeError("call fit() first")
        x, _ = _check_xy(x)
        return torch.sigmoid(self.model_(torch.from_numpy(x))).double().numpy()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


#: classifier name -> (table label, factory(seed, **options))
CLASSIFIERS: dict[str, tuple[str, Any]] = {
    "logreg": ("Logistic regression (OvR, balanced)", lambda seed, **kw: LogisticBaseline(seed=seed, **kw)),
    "mlp": ("MLP [512]", lambda seed, **kw: TorchMLPClassifier((512,), seed=seed, **kw)),
    "deep_mlp": ("Deeper MLP [1024, 512, 256]", lambda seed, **kw: TorchMLPClassifier((1024, 512, 256), seed=seed, **kw)),
}


def make_classifier(name: str, seed: int = 0, **options: Any):
    """A fresh classifier by name: ``"logreg"``, ``"mlp"`` or ``"deep_mlp"`` (see :data:`CLASSIFIERS`).

    ``options`` go to the constructor (e.g. ``max_epochs=50`` for the MLPs, ``C=1.0`` for logreg).
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; expected one of {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name][1](seed, **options)


# ----------------------------------------------------------------------------------- degeneracy
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
                           f"(p = {result['p_value']:.3f}; permuted labels reach {result['null_q95']:.3f} at the 95th percentile)")
    else:
        reasons.append("no finding has both classes in these labels: AUC undefined")
    if len(constant) == len(findings):
        reasons.append("decisions are constant (all 0 or all 1) for every finding")
    if len(flat) == len(findings):
        reasons.append("scores are (near) constant for every finding")
    result["reasons"], result["degenerate"] = reasons, bool(reasons)
    return result


# ----------------------------------------------------------------------------------- the experiment
def evaluate_scores(y_val: np.ndarray, s_val: np.ndarray, y_test: np.ndarray, s_test: np.ndarray,
                    findings: Sequence[str], *, thresholds: np.ndarray | None = None, n_permutations: int = 1000,
                    n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    """One table row: thresholds fitted on validation (Youden) unless given, metrics and degeneracy on test."""
    findings = list(findings)
    if thresholds is None:
        thresholds = fit_operating_points(y_val, s_val, findings, fitted_on="validation").as_array(findings)
    table, summary = evaluate_predictions(y_test, s_test, findings, thresholds, n_boot=n_boot, seed=seed)
    pred = (s_test >= np.where(np.isnan(thresholds), np.inf, thresholds)).astype(np.int8)
    if len(findings) == 1:
        # one finding: micro- and macro-F1 are its F1 (metrics.multilabel_report would average over both
        # classes of an (N, 1) column, i.e. report accuracy as micro-F1)
        summary["micro_f1"] = summary["macro_f1"] = float(table["f1"].iloc[0])
    deg = degeneracy_check(y_test, s_test, pred, n_permutations, seed, findings=findings)
    notes = list(deg["reasons"])
    if summary["n_findings_thresholded"] < len(findings):
        notes.append(f"{len(findings) - summary['n_findings_thresholded']} findings without a validation "
                     "operating point (no positives in validation) are left out of F1/Hamming")
    return {"Micro-F1": summary["micro_f1"], "Macro-F1": summary["macro_f1"], "Hamming loss": summary["hamming_loss"],
            "Macro AUC": summary["macro_auc"], "Degenerate": deg["degenerate"], "p-value": deg["p_value"],
            "Informative findings": f"{deg['n_informative']}/{summary['n_auc_defined']}", "Notes": "; ".join(notes)}


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


def run_hybrid_experiment(features: Mapping[str, np.ndarray], labels: np.ndarray, split: Sequence[str],
                          findings: Sequence[str], *, combos: Mapping[str, Sequence[str]] | None = None,
                          classifiers: Sequence[str] = ("logreg", "mlp", "deep_mlp"),
                          reference_scores: Mapping[str, np.ndarray] | None = None, baseline: bool = True,
                          seed: int = 0, n_permutations: int = 1000, n_boot: int = 200,
                          mlp_options: Mapping[str, Any] | None = None, progress: bool = False) -> pd.DataFrame:
    """The report's comparison table, with a degeneracy verdict per row.

    Parameters
    ----------
    features : name -> ``(N, D)`` feature block (rows aligned with ``labels``; NaN rows = unreadable).
    labels : ``(N, F)`` 0/1; split : ``(N,)`` of ``"train"``, ``"val"``, ``"test"``.
    combos : row label -> block names to concatenate (:func:`cxrbench.hybrid.features.hybrid_vectors`,
        standardised on train). Default: each block alone, then all blocks together.
    classifiers : names in :data:`CLASSIFIERS`.
    reference_scores : row label -> ``(N, F)`` scores of an outside model (e.g. a DenseNet bundle),
        evaluated with the same validation thresholds and test split.
    baseline : add the "predict nothing" row (all negative), the floor the Hamming loss must beat.
    mlp_options : extra :class:`TorchMLPClassifier` arguments (e.g. ``{"max_epochs": 30}``).

    Returns
    -------
    DataFrame with columns ``Model, Features, Micro-F1, Macro-F1, Hamming loss, Macro AUC, Degenerate,
    p-value, p (Holm), Informative findings, Notes``; ``attrs`` has the split sizes. ``p (Holm)`` adjusts
    the p-values for testing every row of the table (with 28 rows, one or two pass p <= 0.05 by chance);
    it can only fall below 0.05 when ``n_permutations > rows / 0.05`` (the smallest p is 1 / (1 + n)).
    """
    from cxrbench.hybrid.features import hybrid_vectors

    y = np.asarray(labels, dtype=np.float32)
    split = np.asarray(split).astype(str)
    findings = list(findings)
    if y.ndim != 2 or y.shape[1] != len(findings) or split.shape != (len(y),):
        raise ValueError(f"labels (N, F={len(findings)}) and split (N,) must agree, got {y.shape}, {split.shape}")
    for name, block in features.items():
        if np.shape(block)[0] != len(y):
            raise ValueError(f"feature block {name!r} has {np.shape(block)[0]} rows for {len(y)} labels")
    masks = {s: split == s for s in ("train", "val", "test")}
    empty = [s for s, m in masks.items() if not m.any()]
    if empty:
        raise ValueError(f"the split has no {empty} rows")
    if combos is None:
        combos = {name: [name] for name in features}
        if len(features) > 1:
            combos[" + ".join(features)] = list(features)
    unknown = {b for blocks in combos.values() for b in blocks} - set(features)
    if unknown:
        raise ValueError(f"combos name unknown feature blocks {sorted(unknown)}")
    rows: list[dict[str, Any]] = []

    def add(model: str, feats: str, s: np.ndarray, ok: np.ndarray, thresholds=None) -> None:
        v, t = masks["val"] & ok, masks["test"] & ok
        row = evaluate_scores(y[v], s[v], y[t], s[t], findings, thresholds=thresholds,
                              n_permutations=n_permutations, n_boot=n_boot, seed=seed)
        dropped = int((~ok).sum())
        if dropped:
            row["Notes"] = "; ".join(filter(None, [row["Notes"], f"{dropped} unreadable images left out"]))
        rows.append({"Model": model, "Features": feats, **row})
        if progress:
            print(f"{model:40s} {feats:30s} macro AUC {row['Macro AUC']:.3f} p={row['p-value']:.3f}")

    if baseline:
        add("No model (predicts all negative)", "-", np.zeros_like(y, dtype=np.float64), np.ones(len(y), bool),
            thresholds=np.full(len(findings), np.inf))
    for feats, blocks in combos.items():
        ok = np.all([np.isfinite(np.asarray(features[b])).all(axis=1) for b in blocks], axis=0)
        x, _ = hybrid_vectors([np.asarray(features[b])[ok] for b in blocks], masks["train"][ok])
        sub = {k: m[ok] for k, m in masks.items()}
        for name in classifiers:
            options = dict(mlp_options or {}) if name != "logreg" else {}
            clf = make_classifier(name, seed, **options).fit(x[sub["train"]], y[ok][sub["train"]], x[sub["val"]], y[ok][sub["val"]])
            s = np.full(y.shape, np.nan)
            s[ok] = clf.predict_proba(x)
            add(CLASSIFIERS[name][0], feats, s, ok)
    for name, scores in (reference_scores or {}).items():
        scores = np.asarray(scores, dtype=np.float64)
        add(name, "(end-to-end model)", scores, np.isfinite(scores).all(axis=1))
    table = pd.DataFrame(rows)
    table["p (Holm)"] = holm_adjust(table["p-value"].to_numpy(dtype=float))
    table = table[TABLE_COLUMNS]
    table.attrs.update({f"n_{k}": int(m.sum()) for k, m in masks.items()}, findings=findings)
    return table


def comparison_chart(table: pd.DataFrame, metrics: Sequence[str] = ("Micro-F1", "Macro-F1", "Macro AUC"), *,
                     title: str = "Hybrid-feature classifiers on the test split (hatched: degenerate)"):
    """Grouped bars, one group per table row and one bar per metric; degenerate rows hatched; chance AUC dotted."""
    import matplotlib.pyplot as plt

    labels = [f"{m} | {f}" for m, f in zip(table["Model"], table["Features"])]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(table) + 2), 4.5))
    for k, metric in enumerate(metrics):
        xs = np.arange(len(table)) + (k - (len(metrics) - 1) / 2) * width
        bars = ax.bar(xs, table[metric].astype(float).fillna(0).to_numpy(), width, label=metric, color=f"C{k}")
        for bar, degenerate in zip(bars, table["Degenerate"]):
            if degenerate:
                bar.set_hatch("//")
                bar.set_alpha(0.55)
    ax.axhline(0.5, color="#666", lw=0.8, ls=":", label="chance AUC")
    ax.set_xticks(np.arange(len(table)), labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=len(metrics) + 1, loc="upper right")
    fig.tight_layout()
    return fig
