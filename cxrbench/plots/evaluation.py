"""Figures of a classifier's evaluation: ROC per finding with its operating point (plotly), Chester's
calibration map f_opt, and the training curves of a run (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from cxrbench.evaluation.calibration import calibrate
from cxrbench.evaluation.metrics import threshold_array
from cxrbench.plots.style import CHANCE_LINE, PLOTLY_TEMPLATE

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go
    from matplotlib.figure import Figure

__all__ = ["calibration_figure", "roc_figure", "training_figure"]


def _roc_titles(y_true: np.ndarray, scores: np.ndarray, findings: Sequence[str]) -> list[str]:
    """One panel title per finding: its AUC and positives, or why there is no curve."""
    titles = []
    for j, f in enumerate(findings):
        y = y_true[:, j]
        if 0 < y.sum() < len(y):
            titles.append(f"{f} (AUC {roc_auc_score(y, scores[:, j]):.2f}, n+={int(y.sum())})")
        else:
            titles.append(f"{f} (no positives)" if y.sum() == 0 else f"{f} (no negatives)")
    return titles


def roc_figure(y_true: np.ndarray, scores: np.ndarray, findings: Sequence[str], operating_points: Any = None,
               *, title: str = "ROC per finding (star: operating point fitted on validation)",
               ncols: int = 4) -> go.Figure:
    """Chester Fig. 3 as an interactive plotly figure: one ROC panel per finding, the operating point starred.

    ``y_true`` (N, F) 0/1; ``scores`` raw probabilities (N, F); ``operating_points`` an OperatingPoints,
    a dict or (F,) thresholds (see :func:`cxrbench.evaluation.metrics.threshold_array`). Findings without
    both classes show an empty panel titled "no positives" / "no negatives".
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    findings = list(findings)
    thr = threshold_array(operating_points, findings)
    nrows = int(np.ceil(len(findings) / ncols))
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=_roc_titles(y_true, scores, findings),
                        horizontal_spacing=0.07, vertical_spacing=min(0.3, 0.36 / nrows))
    for j, f in enumerate(findings):
        r, c = j // ncols + 1, j % ncols + 1
        y = y_true[:, j]
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=CHANCE_LINE,
                                 showlegend=False, hoverinfo="skip"), row=r, col=c)
        if not 0 < y.sum() < len(y):
            continue
        fpr, tpr, th = roc_curve(y, scores[:, j])
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f, showlegend=False, line=dict(color="#3b6ea8"),
                                 customdata=np.minimum(th, 1.0),
                                 hovertemplate="FPR %{x:.2f}<br>TPR %{y:.2f}<br>threshold %{customdata:.3f}"),
                      row=r, col=c)
        if not np.isnan(thr[j]):
            pred = scores[:, j] >= thr[j]
            op_tpr, op_fpr = pred[y == 1].mean(), pred[y == 0].mean()
            fig.add_trace(go.Scatter(x=[op_fpr], y=[op_tpr], mode="markers", showlegend=False,
                                     marker=dict(symbol="star", size=14, color="red"),
                                     hovertemplate=f"operating point {thr[j]:.3f}<br>FPR %{{x:.2f}} TPR %{{y:.2f}}"),
                          row=r, col=c)
    ticks = dict(range=[-0.02, 1.02], tickvals=[0, 0.5, 1], showticklabels=True, title_standoff=2,
                 title_font_size=10, tickfont_size=9)
    fig.update_xaxes(title_text="false positive rate", **ticks)
    fig.update_yaxes(title_text="true positive rate", **ticks)
    fig.update_layout(title=title, height=280 * nrows + 40, width=270 * ncols, template=PLOTLY_TEMPLATE,
                      margin=dict(l=50, r=20, t=80, b=40))
    fig.update_annotations(font_size=10)
    return fig


def calibration_figure(operating_points: dict[str, float], *,
                       title: str = "Chester Eq. 1: f_opt maps each operating point to 0.5") -> Figure:
    """The piecewise-linear map f_opt for each finding's operating point (finding -> threshold in [0, 1])."""
    import matplotlib.pyplot as plt

    x = np.linspace(0, 1, 201)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for f, opt in operating_points.items():
        if opt is None or not np.isfinite(opt):
            continue
        ax.plot(x, calibrate(x, [opt]), lw=1, label=f"{f} ({opt:.2f})")
        ax.plot([opt], [0.5], "r*", ms=7)
    ax.axhline(0.5, color="#999", lw=0.5, ls=":")
    ax.set_xlabel("raw probability (sigmoid of the logit)")
    ax.set_ylabel("calibrated probability")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2, loc="lower right")  # the curves run from (0, 0) to (1, 1): that corner is free
    fig.tight_layout()
    return fig


def training_figure(history: pd.DataFrame) -> Figure:
    """Train/validation loss and validation macro AUC per epoch (a classifier run's ``metrics.csv``)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(history["epoch"], history["train_loss"], "o-", label="train")
    a.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("BCE loss")
    a.legend()
    b.plot(history["epoch"], history["val_auc"], "o-", color="C2")
    b.set_xlabel("epoch")
    b.set_ylabel("validation macro AUC")
    b.axhline(0.5, color="#999", lw=0.5, ls=":")
    fig.tight_layout()
    return fig
