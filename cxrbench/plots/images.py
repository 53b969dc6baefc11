"""Grids of images (X-rays, overlays, feature maps) with titles and mask contours (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["image_grid_figure"]


def image_grid_figure(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    size: float = 2.4,
    cmap: str = "gray",
    contours: Sequence[np.ndarray | None] | None = None,
    suptitle: str | None = None,
) -> Figure:
    """Grid of ``(H, W)`` images in [0, 1] (or ``(H, W, 3)`` RGB), optional titles and mask contours (red).

    ``contours[k]`` is a ``(H, W)`` mask outlined at 0.5 on image ``k`` (None: no outline); ``size`` is
    the side of one panel in inches.
    """
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
            ax.contour(np.asarray(contours[k]).astype(float), levels=[0.5], colors="red", linewidths=0.8)
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
