"""The student report's comparison table, with a degeneracy verdict in every row.

The report (weeks 5-7) classified LBP + HOG + ResNet18 vectors with an MLP and a deeper MLP and
reported micro-F1 ~0.49, macro-F1 ~0.05-0.08 and macro AUC ~0.50 as progress. A macro AUC of 0.50
ranks a positive above a negative no better than a coin; :func:`cxrbench.evaluation.degeneracy.degeneracy_check`
says so explicitly, with a label-permutation test, and :func:`run_hybrid_experiment` puts its verdict
in every row of the table.

Protocol (each row): fit on the train split, early-stop on validation loss (MLPs), choose one Youden
threshold per finding on the validation split (:func:`cxrbench.evaluation.calibration.fit_operating_points`),
report on the test split, which is used for nothing else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrbench.evaluation.calibration import fit_operating_points
from cxrbench.evaluation.degeneracy import degeneracy_check, holm_adjust
from cxrbench.evaluation.metrics import evaluate_predictions
from cxrbench.hybrid.classifiers import CLASSIFIERS, make_classifier
from cxrbench.hybrid.features import hybrid_vectors
from cxrbench.hybrid.tasks import REPORT_COMBOS, bundle_scores, hybrid_feature_blocks, load_task
from cxrbench.models.bundle import Bundle

__all__ = ["TABLE_COLUMNS", "TaskExperiment", "evaluate_scores", "run_hybrid_experiment", "run_task_experiment"]

TABLE_COLUMNS = ["Model", "Features", "Micro-F1", "Macro-F1", "Hamming loss", "Macro AUC", "Degenerate", "p-value",
                 "p (Holm)", "Informative findings", "Notes"]


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
    classifiers : names in :data:`cxrbench.hybrid.classifiers.CLASSIFIERS`.
    reference_scores : row label -> ``(N, F)`` scores of an outside model (e.g. a DenseNet bundle),
        evaluated with the same validation thresholds and test split.
    baseline : add the "predict nothing" row (all negative), the floor the Hamming loss must beat.
    mlp_options : extra :class:`~cxrbench.hybrid.classifiers.TorchMLPClassifier` arguments
        (e.g. ``{"max_epochs": 30}``).

    Returns
    -------
    DataFrame with columns ``Model, Features, Micro-F1, Macro-F1, Hamming loss, Macro AUC, Degenerate,
    p-value, p (Holm), Informative findings, Notes``; ``attrs`` has the split sizes. ``p (Holm)`` adjusts
    the p-values for testing every row of the table (with 28 rows, one or two pass p <= 0.05 by chance);
    it can only fall below 0.05 when ``n_permutations > rows / 0.05`` (the smallest p is 1 / (1 + n)).
    """
    y = np.asarray(labels, dtype=np.float32)
    findings = list(findings)
    masks = _split_masks(features, y, split, findings)
    combos = _combos(features, combos)
    rows: list[dict[str, Any]] = []

    def add(model: str, feats: str, s: np.ndarray, ok: np.ndarray, thresholds: np.ndarray | None = None) -> None:
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
        for name in classifiers:
            add(CLASSIFIERS[name][0], feats, _fit_and_score(name, x, y, ok, masks, seed, mlp_options), ok)
    for name, scores in (reference_scores or {}).items():
        scores = np.asarray(scores, dtype=np.float64)
        add(name, "(end-to-end model)", scores, np.isfinite(scores).all(axis=1))
    table = pd.DataFrame(rows)
    table["p (Holm)"] = holm_adjust(table["p-value"].to_numpy(dtype=float))
    table = table[TABLE_COLUMNS]
    table.attrs.update({f"n_{k}": int(m.sum()) for k, m in masks.items()}, findings=findings)
    return table


def _split_masks(features: Mapping[str, np.ndarray], y: np.ndarray, split: Sequence[str],
                 findings: Sequence[str]) -> dict[str, np.ndarray]:
    """``{"train", "val", "test"} -> (N,)`` bool, after checking labels, split and blocks agree."""
    split_arr = np.asarray(split).astype(str)
    if y.ndim != 2 or y.shape[1] != len(findings) or split_arr.shape != (len(y),):
        raise ValueError(f"labels (N, F={len(findings)}) and split (N,) must agree, got {y.shape}, {split_arr.shape}")
    for name, block in features.items():
        if np.shape(block)[0] != len(y):
            raise ValueError(f"feature block {name!r} has {np.shape(block)[0]} rows for {len(y)} labels")
    masks = {s: split_arr == s for s in ("train", "val", "test")}
    empty = [s for s, m in masks.items() if not m.any()]
    if empty:
        raise ValueError(f"the split has no {empty} rows")
    return masks


def _combos(features: Mapping[str, np.ndarray], combos: Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """The table's feature rows: as given (checked), or each block alone and then all together."""
    if combos is None:
        out = {name: [name] for name in features}
        if len(features) > 1:
            out[" + ".join(features)] = list(features)
        return out
    unknown = {b for blocks in combos.values() for b in blocks} - set(features)
    if unknown:
        raise ValueError(f"combos name unknown feature blocks {sorted(unknown)}")
    return {name: list(blocks) for name, blocks in combos.items()}


def _fit_and_score(name: str, x: np.ndarray, y: np.ndarray, ok: np.ndarray, masks: Mapping[str, np.ndarray],
                   seed: int, mlp_options: Mapping[str, Any] | None) -> np.ndarray:
    """Fit classifier ``name`` on the readable train rows (early stopping on val); ``(N, F)`` scores, NaN
    where not ``ok``."""
    sub = {k: m[ok] for k, m in masks.items()}
    options = dict(mlp_options or {}) if name != "logreg" else {}
    clf = make_classifier(name, seed, **options).fit(x[sub["train"]], y[ok][sub["train"]], x[sub["val"]],
                                                     y[ok][sub["val"]])
    s = np.full(y.shape, np.nan)
    s[ok] = clf.predict_proba(x)
    return s


@dataclass
class TaskExperiment:
    """One labelled task's run of the report's table (:func:`run_task_experiment`)."""

    task: str
    manifest: pd.DataFrame  # the (subsampled) manifest with its ``split`` column
    findings: list[str]
    table: pd.DataFrame  # :func:`run_hybrid_experiment`'s table
    info: dict[str, Any]  # :func:`~cxrbench.hybrid.tasks.hybrid_feature_blocks`'s info (fine-tuning history, ...)
    seconds: float
    notes: list[str] = field(default_factory=list)  # e.g. why a reference bundle was left out

    @property
    def y_test(self) -> np.ndarray:
        """The test split's labels ``(n_test, F)``, as the table's test rows were scored on."""
        return self.manifest.loc[self.manifest["split"] == "test", self.findings].to_numpy()


def run_task_experiment(task: str, folder: str | os.PathLike, features_dir: str | os.PathLike, *,
                        max_images: int = 0, image_size: int = 224, finetune_epochs: int = 5, seed: int = 0,
                        reference: Bundle | None = None, n_permutations: int = 1000,
                        mlp_options: Mapping[str, Any] | None = None, manifest: pd.DataFrame | None = None,
                        progress: bool = False) -> TaskExperiment:
    """Notebook 06's experiment on one labelled data set: load and split it (:func:`load_task`, or ``manifest`` if
    given), build the report's feature blocks (cached in ``features_dir/<task key>-s<seed>-<size>px``), and run the
    report's table (:data:`REPORT_COMBOS`) with a degeneracy verdict per row.

    ``reference``: a classifier bundle whose scores become an end-to-end reference row when it has an output for
    every finding of the task (otherwise it is left out and ``notes`` says why). ``task``'s first word, lower-cased,
    keys the feature cache (``"nih"``, ``"paediatric"``, or the folder kind).
    """
    t0 = time.perf_counter()
    df = manifest if manifest is not None else load_task(folder, max_images=max_images, seed=seed)
    findings = list(df.attrs["label_columns"])
    key = task.split()[0].lower()
    blocks, info = hybrid_feature_blocks(df, Path(features_dir) / f"{key}-s{seed}-{image_size}px",
                                         image_size=image_size, finetune_epochs=finetune_epochs, seed=seed,
                                         progress=progress)
    references: dict[str, np.ndarray] = {}
    notes: list[str] = []
    if reference is not None and set(findings) <= set(reference.labels):
        references[f"Reference: {reference.card.name or 'DenseNet bundle'}"] = bundle_scores(reference, df, findings)
    elif reference is not None:
        notes.append(f"reference bundle left out: it has no output for {sorted(set(findings) - set(reference.labels))}")
    table = run_hybrid_experiment(blocks, df[findings].to_numpy(), df["split"], findings, combos=REPORT_COMBOS,
                                  reference_scores=references, seed=seed, n_permutations=n_permutations,
                                  mlp_options=mlp_options)
    return TaskExperiment(task, df, findings, table, info, time.perf_counter() - t0, notes)
