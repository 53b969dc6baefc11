"""Figures of a dataset: label counts, a labelled matrix (co-occurrence) and what equalisation does (matplotlib)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["bar_figure", "equalisation_figure", "heatmap_figure"]


def bar_figure(values: pd.Series, *, title: str = "", xlabel: str = "count", ylabel: str | None = None,
               log: bool = False, color: str = "#3b6ea8") -> Figure:
    """Horizontal bars of a labelled series (e.g. images per finding), largest on top; ``log``: log x axis.

    ``ylabel`` defaults to the index's name (else "label")."""
    import matplotlib.pyplot as plt

    values = values.sort_values()
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(values) + 1))
    ax.barh(values.index.astype(str), values.to_numpy(), color=color)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel if ylabel is not None else str(values.index.name or "label"))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def heatmap_figure(table: pd.DataFrame, *, title: str = "", fmt: str = "{:.2f}", cmap: str = "viridis",
                   annotate: bool = True, xlabel: str | None = None, ylabel: str | None = None,
                   value_label: str = "value") -> Figure:
    """A labelled matrix (e.g. label co-occurrence) with its values written in the cells (``fmt``).

    Axis titles default to the columns' / index's names (else "column" / "row"); ``value_label`` titles the
    colour bar."""
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
    fig.colorbar(im, ax=ax, shrink=0.8, label=value_label)
    ax.set_xlabel(xlabel if xlabel is not None else str(table.columns.name or "column"))
    ax.set_ylabel(ylabel if ylabel is not None else str(table.index.name or "row"))
    ax.set_title(title)
    fig.tight_layout()
    return fig


def equalisation_figure(image: np.ndarray, variants: dict[str, np.ndarray]) -> Figure:
    """The ``(H, W)`` [0, 1] image and its equalised variants (name -> image), each above its grey-level histogram."""
    import matplotlib.pyplot as plt

    items = {"original": image, **variants}
    fig, axes = plt.subplots(2, len(items), figsize=(3 * len(items), 5.5))
    for k, (name, img) in enumerate(items.items()):
        axes[0, k].imshow(img, cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(name)
        axes[0, k].axis("off")
        axes[1, k].hist(img.ravel(), bins=64, range=(0, 1), color="#555")
        axes[1, k].set_xlabel("grey level")
        axes[1, k].set_ylabel("pixels")
        axes[1, k].ticklabel_format(axis="y", style="sci", scilimits=(0, 3))
    fig.tight_layout()
    return fig
