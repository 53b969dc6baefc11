"""Figures the notebooks show (matplotlib for static figures; plotly where interaction helps).

Each function takes data, not file names, and returns the figure so a notebook can show or save it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["bar_chart", "heatmap", "image_grid", "show_equalisation"]


def image_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    size: float = 2.4,
    cmap: str = "gray",
    contours: Sequence[np.ndarray | None] | None = None,
    suptitle: str | None = None,
):
    """Grid of ``(H, W)`` images in [0, 1] (or RGB), optional titles and mask contours (red)."""
    import matplotlib.pyplot as plt

    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        img = images[k]
        ax.imshow(img, cmap=None if img.ndim == 3 else cmap, vmin=0, vmax=1, interpolation="lanczos")
        if contours is not None and contours[k] is not None:
            ax.contour(contours[k].astype(float), levels=[0.5], colors="red", linewidths=0.8)
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def bar_chart(values: pd.Series, *, title: str = "", xlabel: str = "", log: bool = False, color: str = "#3b6ea8"):
    """Horizontal bar chart of a labelled series (largest on top)."""
    import matplotlib.pyplot as plt

    values = values.sort_values()
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(values) + 1))
    ax.barh(values.index.astype(str), values.to_numpy(), color=color)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def heatmap(table: pd.DataFrame, *, title: str = "", fmt: str = "{:.2f}", cmap: str = "viridis", annotate: bool = True):
    """A labelled matrix (e.g. label co-occurrence) with values written in the cells."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(0.55 * table.shape[1] + 2, 0.45 * table.shape[0] + 1.5))
    im = ax.imshow(table.to_numpy(dtype=float), cmap=cmap)
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    if annotate:
        vmax = np.nanmax(table.to_numpy(dtype=float))
        for (i, j), v in np.ndenumerate(table.to_numpy(dtype=float)):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
                    color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def show_equalisation(image: np.ndarray, variants: dict[str, np.ndarray]):
    """The image and its equalised variants, each above its grey-level histogram."""
    import matplotlib.pyplot as plt

    items = {"original": image, **variants}
    fig, axes = plt.subplots(2, len(items), figsize=(3 * len(items), 5.5))
    for k, (name, img) in enumerate(items.items()):
        axes[0, k].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(name)
        axes[0, k].axis("off")
        axes[1, k].hist(img.ravel(), bins=64, range=(0, 1), color="#555")
        axes[1, k].set_yticks([])
    fig.tight_layout()
    return fig


def roc_figure(y_true: np.ndarray, scores: np.ndarray, findings: Sequence[str], operating_points=None,
               *, title: str = "ROC per finding (star: operating point fitted on validation)", ncols: int = 4):
    """Chester Fig. 3 as an interactive plotly figure: one ROC panel per finding, the operating point starred.

    ``scores`` are raw probabilities (N, F); ``operating_points`` an OperatingPoints or (F,) thresholds.
    Findings without both classes show an empty panel titled "no positives".
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    from sklearn.metrics import roc_auc_score, roc_curve

    from cxrbench.evaluation.metrics import _threshold_array

    findings = list(findings)
    thr = _threshold_array(operating_points, tuple(findings))
    nrows = int(np.ceil(len(findings) / ncols))
    titles = []
    for j, f in enumerate(findings):
        y = y_true[:, j]
        titles.append(f"{f} (AUC {roc_auc_score(y, scores[:, j]):.2f}, n+={int(y.sum())})" if 0 < y.sum() < len(y)
                      else f"{f} (no positives)" if y.sum() == 0 else f"{f} (no negatives)")
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=titles, horizontal_spacing=0.04, vertical_spacing=0.08)
    for j, f in enumerate(findings):
        r, c = j // ncols + 1, j % ncols + 1
        y = y_true[:, j]
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(color="#bbb", dash="dot"),
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
    fig.update_xaxes(range=[0, 1], showticklabels=False)
    fig.update_yaxes(range=[0, 1], showticklabels=False)
    fig.update_layout(title=title, height=260 * nrows, width=260 * ncols, margin=dict(l=20, r=20, t=60, b=20))
    fig.update_annotations(font_size=10)
    return fig


def calibration_curves(operating_points: dict[str, float], *, title: str = "Chester Eq. 1: f_opt maps each operating point to 0.5"):
    """The piecewise-linear map f_opt for each finding's operating point (matplotlib)."""
    import matplotlib.pyplot as plt

    from cxrbench.evaluation.calibration import calibrate

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
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def training_curves(history: pd.DataFrame):
    """Train/validation loss and validation macro AUC per epoch (from a run's metrics.csv)."""
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
