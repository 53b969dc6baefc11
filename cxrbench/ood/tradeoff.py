"""What the OOD gate buys: the classifier's AUC on the images the gate keeps, as its cutoff tightens
(Chester Fig. 6), under a growing rotation or on a shifted labelled set.

:func:`cutoff_tradeoff` and :func:`tradeoff_sweep` take OOD scores, labels and classifier probabilities
as arrays; :func:`rotation_tradeoff` and :func:`shifted_set_tradeoff` compute them from a classifier
bundle and an OOD bundle with plain forward passes (:func:`classifier_probabilities`). The macro-AUC
interval is the one bootstrap of :mod:`cxrbench.evaluation.bootstrap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import pandas as pd
import torch

from cxrbench.evaluation.bootstrap import bootstrap_macro_auc_ci
from cxrbench.evaluation.metrics import auc_per_finding, macro_auc
from cxrbench.evaluation.skill import SkillBox, skill_box
from cxrbench.models.bundle import Bundle
from cxrbench.ood.scoring import OODModel, score_images
from cxrbench.ood.sets import images_of, rotate_images

__all__ = ["classifier_probabilities", "cutoff_tradeoff", "rotation_tradeoff", "shifted_set_tradeoff",
           "skill_warning", "sweep_skill_box", "tradeoff_sweep"]


def _as_columns(y_true: np.ndarray, y_score: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, F)`` labels and float scores (``(N,)`` inputs become one column); ValueError on a shape mismatch."""
    labels, preds = np.asarray(y_true), np.asarray(y_score, dtype=float)
    labels = labels[:, None] if labels.ndim == 1 else labels
    preds = preds[:, None] if preds.ndim == 1 else preds
    if labels.shape != preds.shape or labels.shape[0] != n:
        raise ValueError(f"shape mismatch: ood_scores ({n},), y_true {labels.shape}, y_score {preds.shape}")
    return labels, preds


def cutoff_tradeoff(
    ood_scores: np.ndarray | Sequence[float],
    y_true: np.ndarray,
    y_score: np.ndarray,
    cutoffs: np.ndarray | Sequence[float],
    *,
    finding_names: Sequence[str] | None = None,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Classifier AUC on the images an OOD gate keeps, for each cutoff (Chester Fig. 6).

    Parameters
    ----------
    ood_scores : (N,) float
        OOD scores (higher = more OOD); an image is kept when its score <= cutoff.
    y_true : (N, F) or (N,) {0, 1}
        Finding labels.
    y_score : (N, F) or (N,) float
        Classifier scores.
    cutoffs : (K,) float
        Cutoffs in the score's units; rows follow this order.
    finding_names : sequence of str, optional
        Column suffixes (default ``f0``, ``f1``, ...).
    n_bootstrap : int
        If > 0, adds a percentile bootstrap CI of the macro AUC over retained images
        (:func:`cxrbench.evaluation.bootstrap.bootstrap_macro_auc_ci`, one generator for all cutoffs).
    ci : float
        Coverage of that interval.
    seed : int
        Bootstrap seed.

    Returns
    -------
    pandas.DataFrame
        One row per cutoff: ``cutoff``, ``n_retained``, ``retained_fraction``, ``auc_macro``
        (mean over findings with both classes), ``auc_<finding>`` (NaN when a class is
        missing among retained images), and ``auc_macro_ci_low`` / ``auc_macro_ci_high``.
    """
    scores = np.asarray(ood_scores, dtype=float).ravel()
    labels, preds = _as_columns(y_true, y_score, scores.size)
    names = list(finding_names) if finding_names is not None else [f"f{j}" for j in range(labels.shape[1])]
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} finding names for {labels.shape[1]} label columns")
    rng = np.random.default_rng(seed)
    rows = []
    for cutoff in np.asarray(cutoffs, dtype=float).ravel():
        keep = scores <= cutoff
        y_k, s_k = labels[keep], preds[keep]
        aucs = auc_per_finding(y_k, s_k, names)["auc"].to_numpy(float) if keep.any() else np.full(len(names), np.nan)
        row: dict[str, float] = {
            "cutoff": float(cutoff),
            "n_retained": int(keep.sum()),
            "retained_fraction": float(keep.mean()) if scores.size else float("nan"),
            "auc_macro": macro_auc(aucs).auc,
        }
        row.update({f"auc_{name}": float(a) for name, a in zip(names, aucs)})
        if n_bootstrap > 0:
            interval = bootstrap_macro_auc_ci(y_k, s_k, n_bootstrap, alpha=1.0 - ci, seed=rng)
            row["auc_macro_ci_low"], row["auc_macro_ci_high"] = interval.low, interval.high
        rows.append(row)
    return pd.DataFrame(rows)


def tradeoff_sweep(ood_scores: np.ndarray, y_true: np.ndarray, y_score: np.ndarray, *,
                   bundle_cutoff: float | None = None, finding_names: Sequence[str] | None = None,
                   n_points: int = 19, min_retained: float = 0.1, n_bootstrap: int = 200,
                   seed: int = 0) -> pd.DataFrame:
    """AUC of the retained images as the cutoff tightens (:func:`cutoff_tradeoff` at chosen cutoffs).

    Cutoffs are the score quantiles that retain ``min_retained`` .. 100 % of the images in
    ``n_points`` steps, plus ``bundle_cutoff``; a boolean column ``bundle_cutoff`` marks its row.
    ``auc_macro_ci_low`` / ``_high``: 95 % percentile bootstrap of the macro AUC over the retained
    images (``n_bootstrap`` resamples; 0: no interval).
    """
    scores = np.asarray(ood_scores, dtype=float)
    cuts = list(np.quantile(scores, np.linspace(min_retained, 1.0, n_points)))
    if bundle_cutoff is not None:
        cuts.append(float(bundle_cutoff))
    table = cutoff_tradeoff(scores, y_true, y_score, np.unique(cuts), finding_names=finding_names,
                            n_bootstrap=n_bootstrap, seed=seed)
    table["bundle_cutoff"] = np.isclose(table["cutoff"], bundle_cutoff) if bundle_cutoff is not None else False
    return table


def skill_warning(table: pd.DataFrame) -> str | None:
    """A warning when the classifier has no skill on the swept images, else None.

    Chester's Fig. 6 reads the AUC of what the gate keeps; if the AUC on *all* images is at or below
    chance (or its bootstrap CI reaches 0.5), the curve shows noise or the classifier's failure on
    this data, not what the gate buys. ``table`` is a :func:`tradeoff_sweep` result.
    """
    full = table.iloc[int(np.argmax(table["retained_fraction"].to_numpy()))]  # the first row keeping the most
    auc = float(full["auc_macro"])
    if not np.isfinite(auc):
        return None
    low = float(full.get("auc_macro_ci_low", np.nan))
    if auc > 0.5 and not (np.isfinite(low) and low <= 0.5):
        return None
    ci = f" [{low:.3f}, {float(full['auc_macro_ci_high']):.3f}]" if np.isfinite(low) else ""
    return (f"the classifier has no skill on these images (macro AUC {auc:.3f}{ci} on all of them), so this "
            "curve says nothing about the gate; use a classifier trained for this data (see the README)")


def sweep_skill_box(table: pd.DataFrame, *, subject: str = "the classifier on these images") -> SkillBox:
    """:func:`cxrbench.evaluation.skill.skill_box` of the classifier's macro AUC (and CI) on *all* the swept
    images (the row of a :func:`tradeoff_sweep` table that keeps the most): the box to show above Fig. 6."""
    full = table.iloc[int(np.argmax(table["retained_fraction"].to_numpy()))]
    ci = ((full["auc_macro_ci_low"], full["auc_macro_ci_high"]) if "auc_macro_ci_low" in full.index else None)
    return skill_box(full["auc_macro"], ci, subject=subject)


@torch.no_grad()
def classifier_probabilities(bundle: Bundle, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
    """Raw sigmoid outputs ``(N, F)`` float64 of a classifier bundle on ``(H, W)`` [0, 1] images."""
    bundle.model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(np.stack([bundle.preprocess(img) for img in images[i:i + batch_size]]))
        out.append(torch.sigmoid(bundle.model(x).float()).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(bundle.labels)))


def _findings_for(classifier: Bundle, label_columns: Sequence[str]) -> list[str]:
    found = [f for f in classifier.labels if f in label_columns]
    if not found:
        raise ValueError(f"the classifier's labels {classifier.labels} share none with the data's columns "
                         f"{list(label_columns)}")
    return found


def _gate_and_probabilities(classifier: Bundle, ood: Bundle, images: Sequence[np.ndarray],
                            findings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` scores of the OOD bundle's scorer and ``(N, F)`` raw probabilities of ``findings``."""
    gate = cast(OODModel, ood.model)
    score = score_images(gate, images, preprocess=ood.preprocess)[ood.card.ood["cutoff"]["scorer"]]
    prob = classifier_probabilities(classifier, images)[:, [classifier.labels.index(f) for f in findings]]
    return score, prob


def rotation_tradeoff(classifier: Bundle, ood: Bundle, manifest: pd.DataFrame,
                      angles: Sequence[float] = (0, 15, 30, 45, 60, 75, 90), *, n_points: int = 19,
                      n_bootstrap: int = 200, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Classifier AUC and OOD gate under growing rotation of labelled images.

    The findings are the classifier's labels present as columns of ``manifest``. Returns
    ``(per_angle, sweep)``: per angle the median OOD score, the fraction the bundle's cutoff rejects,
    the macro AUC over all images and over the retained ones; and :func:`tradeoff_sweep` over the
    pool of all angles (column ``mean_angle_retained``: how rotated the kept images are).
    """
    findings = _findings_for(classifier, list(manifest.columns))
    y = manifest[findings].to_numpy(dtype=int)
    threshold = ood.card.ood["cutoff"]["threshold"]
    base = images_of(manifest)
    rows: list[dict[str, float]] = []
    pooled: dict[str, list[np.ndarray]] = {"score": [], "y": [], "p": [], "angle": []}
    for angle in angles:
        score, prob = _gate_and_probabilities(classifier, ood, rotate_images(base, angle), findings)
        full = cutoff_tradeoff(score, y, prob, [np.inf, threshold], finding_names=findings)
        rows.append({"angle": angle, "n": len(base), "ood_score_median": float(np.median(score)),
                     "rejected_fraction": float(1 - (score <= threshold).mean()),
                     "auc_all": full["auc_macro"].iloc[0], "auc_retained": full["auc_macro"].iloc[1]})
        for k, v in zip(("score", "y", "p", "angle"), (score, y, prob, np.full(len(base), angle, float))):
            pooled[k].append(v)
    score, y_all, p_all, ang = (np.concatenate(pooled[k]) for k in ("score", "y", "p", "angle"))
    sweep = tradeoff_sweep(score, y_all, p_all, bundle_cutoff=threshold, finding_names=findings,
                           n_points=n_points, n_bootstrap=n_bootstrap, seed=seed)
    sweep["mean_angle_retained"] = [float(ang[score <= c].mean()) if (score <= c).any() else np.nan
                                    for c in sweep["cutoff"]]
    return pd.DataFrame(rows), sweep


def shifted_set_tradeoff(classifier: Bundle, ood: Bundle, manifest: pd.DataFrame, *, n_points: int = 19,
                         n_bootstrap: int = 200, seed: int = 0) -> pd.DataFrame:
    """:func:`tradeoff_sweep` of a classifier on a labelled shifted set (e.g. paediatric CXRs, Pneumonia)."""
    findings = _findings_for(classifier, list(manifest.columns))
    score, prob = _gate_and_probabilities(classifier, ood, images_of(manifest), findings)
    return tradeoff_sweep(score, manifest[findings].to_numpy(dtype=int), prob,
                          bundle_cutoff=ood.card.ood["cutoff"]["threshold"], finding_names=findings,
                          n_points=n_points, n_bootstrap=n_bootstrap, seed=seed)
