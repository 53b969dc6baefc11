"""Figures of the OOD gate: training curves, reconstructions with their error (Chester Fig. 4/7), score
distributions per set (Fig. 5), and what the gate buys the classifier (Fig. 6, rotation) (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch

from cxrbench._types import to_numpy
from cxrbench.explain.overlay import ERROR_SCALE, error_overlay
from cxrbench.ood.scoring import SCORER_NAMES, OODModel, error_map, score_batch

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ood_training_figure", "reconstruction_figure", "rotation_figure", "score_distribution_figure",
           "tradeoff_figure"]


def ood_training_figure(history: pd.DataFrame) -> Figure:
    """Training losses and validation median SSIM / L1 per epoch (a run's ``metrics.csv``)."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for col in ("train_loss", "d_loss", "g_adv_loss"):
        if col in history:
            a.plot(history["epoch"], history[col], ".-", label=col)
    a.plot(history["epoch"], history["val_l1"], ".-", label="val_l1")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend(fontsize=8)
    b.plot(history["epoch"], history["val_ssim_median"], ".-", color="C2")
    b.set_xlabel("epoch")
    b.set_ylabel("validation median SSIM(x, D(E(x)))")
    fig.tight_layout()
    return fig


def reconstruction_figure(model: OODModel, x: torch.Tensor, titles: Sequence[str] | None = None, *,
                          error_scale: float | None = None) -> Figure:
    """Input, reconstruction and the input with the per-pixel L1 error in red (Chester Fig. 4/7).

    ``x``: ``(N, 1, 64, 64)`` in [0, 1]; error saturates red at ``error_scale`` (default
    :data:`cxrbench.explain.overlay.ERROR_SCALE`, the dashboard's). Titles get the SSIM.
    """
    import matplotlib.pyplot as plt

    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.no_grad():
        recon = model.reconstruct(x)
    err = to_numpy(error_map(x, recon, "l1")[:, 0])
    ssim = score_batch(model, x)["ssim_raw"]
    fig, axes = plt.subplots(3, len(x), figsize=(1.6 * len(x), 5.0), squeeze=False)
    for k in range(len(x)):
        grey = to_numpy(x[k, 0])
        red = error_overlay(grey, err[k], scale=error_scale or ERROR_SCALE, alpha=1.0)
        for row, img in enumerate((grey, to_numpy(recon[k, 0]), red)):
            axes[row, k].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[row, k].axis("off")
        name = titles[k] if titles is not None else ""
        axes[0, k].set_title(f"{name}\nSSIM {ssim[k]:.2f}", fontsize=7)
    for row, label in enumerate(("input", "D(E(x))", "error (red)")):
        axes[row, 0].text(-6, 32, label, rotation=90, va="center", ha="right", fontsize=8)
    fig.tight_layout()
    return fig


def score_distribution_figure(in_scores: dict[str, np.ndarray], set_scores: dict[str, dict[str, np.ndarray]],
                              scorers: Sequence[str] = SCORER_NAMES, *, cutoff: dict[str, Any] | None = None,
                              in_name: str = "in-distribution (held out)") -> Figure:
    """Box plots of each scorer's values per set, one panel per scorer (Chester Fig. 5); cutoff dashed."""
    import matplotlib
    import matplotlib.pyplot as plt

    new_api = tuple(int(v) for v in matplotlib.__version__.split(".")[:2]) >= (3, 10)
    horizontal = {"orientation": "horizontal"} if new_api else {"vert": False}
    names = [in_name, *set_scores]
    fig, axes = plt.subplots(1, len(scorers), figsize=(3.4 * len(scorers), 0.35 * len(names) + 1.5), squeeze=False,
                             sharey=True)
    for ax, scorer in zip(axes[0], scorers):
        data = [in_scores[scorer], *(set_scores[n][scorer] for n in set_scores)]
        ax.boxplot(data, widths=0.6, flierprops={"markersize": 2}, **horizontal)
        ax.set_yticks(range(1, len(names) + 1), names, fontsize=8)
        ax.set_title({"ssim": "1 - SSIM"}.get(scorer, scorer), fontsize=9)
        if cutoff and cutoff.get("scorer") == scorer:
            ax.axvline(cutoff["threshold"], color="red", ls="--", lw=1, label="bundle cutoff")
            ax.legend(fontsize=7, loc="lower right")
    axes[0, 0].invert_yaxis()  # shared by every panel: the in-distribution set on top
    axes[0, 0].set_ylabel("evaluation set")
    axes[0, 0].figure.supxlabel("score (higher = more out-of-distribution)", fontsize=9)
    fig.tight_layout()
    return fig


def rotation_figure(per_angle: pd.DataFrame) -> Figure:
    """Per rotation angle: fraction the gate rejects, and the classifier's AUC on all / retained images."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(per_angle["angle"], per_angle["rejected_fraction"], "o-", color="C3")
    a.set_ylabel("fraction rejected by the OOD gate")
    b.plot(per_angle["angle"], per_angle["auc_all"], "o-", label="all images")
    b.plot(per_angle["angle"], per_angle["auc_retained"], "s--", label="retained images")
    b.set_ylabel("macro AUC")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xlabel("rotation (degrees)")
    fig.tight_layout()
    return fig


def tradeoff_figure(table: pd.DataFrame, *, title: str = "", ax: Axes | None = None) -> Figure:
    """Retained fraction vs macro AUC of the retained images, bootstrap CI band, bundle cutoff starred (Fig. 6)."""
    import matplotlib.pyplot as plt

    own = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    t = table.sort_values("retained_fraction")
    ax.plot(t["retained_fraction"], t["auc_macro"], "o-", ms=3, label="AUC of retained images")
    if "auc_macro_ci_low" in t:
        ax.fill_between(t["retained_fraction"], t["auc_macro_ci_low"], t["auc_macro_ci_high"], alpha=0.25,
                        label="95 % bootstrap CI")
    marked = t[t["bundle_cutoff"].astype(bool)] if "bundle_cutoff" in t else t.iloc[:0]
    if len(marked):
        ax.plot(marked["retained_fraction"], marked["auc_macro"], "r*", ms=14, label="bundle cutoff")
    ax.set_xlabel("fraction of images retained by the OOD gate")
    ax.set_ylabel("AUC (retained images)")
    ax.set_xlim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig = cast("Figure", ax.figure)
    if own:  # a figure given with ``ax`` keeps its own layout
        fig.tight_layout()
    return fig
