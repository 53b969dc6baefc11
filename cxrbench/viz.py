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
