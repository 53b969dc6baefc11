"""Figures of the hybrid-feature track: the report's comparison table as grouped bars (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["comparison_figure"]


def comparison_figure(table: pd.DataFrame, metrics: Sequence[str] = ("Micro-F1", "Macro-F1", "Macro AUC"), *,
                      title: str = "Hybrid-feature classifiers on the test split (hatched: degenerate)") -> Figure:
    """Grouped bars, one group per row of :func:`cxrbench.hybrid.experiment.run_hybrid_experiment`'s table and
    one bar per metric; degenerate rows hatched; chance AUC dotted."""
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
    ax.set_xlabel("classifier | features")
    ax.set_ylabel("score on the test split")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=len(metrics) + 1, loc="upper right")
    fig.tight_layout()
    return fig
