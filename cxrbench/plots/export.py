"""Figures of the export: the preprocessing study of Chester Fig. 9, browser vs Python predictions (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["browser_study_figure"]


def browser_study_figure(python: Mapping[str, np.ndarray], browser: Mapping[str, Mapping[str, np.ndarray]],
                         findings: Sequence[str], *, value: str = "calibrated", bins: int = 21) -> Figure:
    """Chester Fig. 9: per finding, the histogram of browser - Python differences, one colour per resize path.

    ``python[value]`` and ``browser[mode][value]`` are ``(N, F)`` probabilities of the same images
    (:func:`cxrbench.export.web.study.python_reference`, :func:`cxrbench.export.web.study.browser_arrays`).
    """
    import matplotlib.pyplot as plt

    ref = np.asarray(python[value], dtype=np.float64)
    diffs = {m: np.asarray(a[value], dtype=np.float64) - ref for m, a in browser.items()}
    finite = np.concatenate([d[np.isfinite(d)] for d in diffs.values()])
    span = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-6)
    edges = np.linspace(-span, span, bins + 1)
    cols = 7 if len(findings) > 7 else len(findings)
    rows = int(np.ceil(len(findings) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.9 * rows), sharex=True, squeeze=False)
    for j, (ax, finding) in enumerate(zip(axes.ravel(), findings)):
        for mode, d in diffs.items():
            col = d[:, j][np.isfinite(d[:, j])]
            if col.size:
                ax.hist(col, bins=edges, alpha=0.55, label=mode)
        ax.set_title(finding, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(findings):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    fig.supxlabel(f"browser - Python ({value} probability), {ref.shape[0]} images", fontsize=9)
    fig.supylabel("images", fontsize=9)
    fig.tight_layout()
    return fig
