"""Figures of explanation quality: mean deletion and insertion curves per method (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cxrbench.explain.metrics import FaithfulnessCurves

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["faithfulness_figure"]


def faithfulness_figure(curves: dict[str, FaithfulnessCurves], methods: Sequence[str] | None = None) -> Figure:
    """Mean deletion and insertion curves per method (default: all of ``curves``), mean AUC in the legend."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for m in methods or list(curves):
        c = curves[m]
        axes[0].plot(c.fractions, c.deletion.mean(0), label=f"{m} (AUC {c.deletion_auc.mean():.3f})")
        axes[1].plot(c.fractions, c.insertion.mean(0), label=f"{m} (AUC {c.insertion_auc.mean():.3f})")
    score = next(iter(curves.values())).score if curves else "probability"
    for ax, name in zip(axes, ("deletion (lower is better)", "insertion (higher is better)")):
        ax.set(title=name, xlabel="fraction of pixels", ylabel=f"{score} of the target finding")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
