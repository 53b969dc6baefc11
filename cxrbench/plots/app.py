"""Figures of the dashboard: a report's calibrated probabilities as interactive bars (plotly)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from cxrbench.evaluation.reliability import FindingReliability
from cxrbench.plots.style import PLOTLY_TEMPLATE

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from cxrbench.inference.pipeline import Report

__all__ = ["MUTED_COLOURS", "STRONG_COLOURS", "probability_figure"]

#: (at or above the operating point, below it)
STRONG_COLOURS = ("#c0392b", "#2e6da4")
#: the same for findings that are not reliable (:mod:`cxrbench.evaluation.reliability`)
MUTED_COLOURS = ("#e8b9b3", "#bccde0")


def probability_figure(report: Report, reliability: Mapping[str, FindingReliability] | None = None) -> go.Figure:
    """Horizontal plotly bars of the calibrated probabilities, 0.5 marked, highest on top.

    With ``reliability`` (:func:`~cxrbench.evaluation.reliability.finding_reliability`) each bar is labelled on
    the right with its finding's test AUC, CI and positives; findings that are not reliable are drawn in
    :data:`MUTED_COLOURS` and marked "not reliable". On hover: the raw value, the operating point and the same.
    A finding the weights never trained (``report.untrained``) has no bar, only the words "not trained by this model".
    """
    import plotly.graph_objects as go

    table = report.table().iloc[::-1]  # highest on top
    rel = [(reliability or {}).get(f) for f in table["finding"]]
    colours = [(MUTED_COLOURS if r is not None and r.reliable is False else STRONG_COLOURS)[0 if v >= 0.5 else 1]
               for v, r in zip(table["calibrated"].fillna(0), rel)]
    texts = [_bar_label(r) for r in rel]
    bar = dict(type="bar", x=table["calibrated"], y=table["finding"], orientation="h", marker_color=colours,
               customdata=np.stack([table["raw"], table["operating_point"], np.array(texts, dtype=object)], axis=1),
               hovertemplate="%{y}<br>calibrated %{x:.3f}<br>raw %{customdata[0]:.3f}"
                             "<br>operating point %{customdata[1]:.3f}"
                             + ("<br>test %{customdata[2]}" if reliability else "") + "<extra></extra>")
    untrained = set(getattr(report, "untrained", ()))
    notes = [dict(x=0.01, y=finding, xanchor="left", showarrow=False, text="<i>not trained by this model</i>",
                  font=dict(size=11, color="#8a8a8a")) for finding in table["finding"] if finding in untrained]
    # the 0.5 line and its label as add_vline(annotation_position="top") draws them
    notes.append(dict(x=0.5, xref="x", y=1, yref="y domain", xanchor="center", yanchor="bottom", showarrow=False,
                      text="operating point"))
    right = 10
    if reliability:
        right = 250
        for finding, text, r in zip(table["finding"], texts, rel):
            muted = r is not None and r.reliable is False
            notes.append(dict(x=1.0, xref="paper", xanchor="left", xshift=6, y=finding, yref="y", showarrow=False,
                              text=f"<i>{text}</i>" if muted else text, align="left",
                              font=dict(size=10.5, color="#8a8a8a" if muted else "#333")))
    # one Figure from whole dicts: plotly validates it once (add_annotation per finding took ~0.25 s a figure)
    return go.Figure(data=[bar], layout=dict(
        shapes=[dict(type="line", x0=0.5, x1=0.5, xref="x", y0=0, y1=1, yref="y domain",
                     line=dict(color="#555", dash="dash"))],
        annotations=notes, xaxis=dict(range=[0, 1], title="calibrated probability"), height=370, width=650,
        margin=dict(l=10, r=right, t=22, b=36), template=PLOTLY_TEMPLATE, showlegend=False))


def _bar_label(r: FindingReliability | None) -> str:
    if r is None:
        return ""
    return r.label + (" · not reliable" if r.reliable is False else "")
