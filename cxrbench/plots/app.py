"""Figures of the dashboard: a report's calibrated probabilities as interactive bars (plotly)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from cxrbench.plots.style import PLOTLY_TEMPLATE

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from cxrbench.inference.pipeline import Report

__all__ = ["probability_figure"]


def probability_figure(report: Report, test_auc: Mapping[str, float | None] | None = None) -> go.Figure:
    """Horizontal plotly bars of the calibrated probabilities, 0.5 marked; on hover the raw value, the
    operating point and, where given, the finding's AUC on the model's test split (how far to trust it)."""
    import plotly.graph_objects as go

    table = report.table().iloc[::-1]  # highest on top
    colours = ["#c0392b" if v >= 0.5 else "#2e6da4" for v in table["calibrated"].fillna(0)]
    given = [(test_auc or {}).get(f) for f in table["finding"]]
    auc = np.array([np.nan if a is None else a for a in given], dtype=float)
    fig = go.Figure(go.Bar(
        x=table["calibrated"], y=table["finding"], orientation="h", marker_color=colours,
        customdata=np.stack([table["raw"], table["operating_point"], auc], axis=1),
        hovertemplate="%{y}<br>calibrated %{x:.3f}<br>raw %{customdata[0]:.3f}"
                      "<br>operating point %{customdata[1]:.3f}"
                      + ("<br>test AUC of this finding %{customdata[2]:.2f}" if test_auc else "") + "<extra></extra>"))
    fig.add_vline(x=0.5, line_dash="dash", line_color="#555", annotation_text="operating point",
                  annotation_position="top")
    fig.update_layout(xaxis=dict(range=[0, 1], title="calibrated probability"), height=420, width=520,
                      margin=dict(l=10, r=10, t=30, b=40), template=PLOTLY_TEMPLATE)
    return fig
