"""The dashboard's static form: what a page without a kernel (nbconvert's HTML, a papermill-executed notebook) shows.

Widgets do not render without a kernel. Like the explorers (:class:`cxrbench.plots.explorers.base.Explorer`), the
:class:`~cxrbench.app.dashboard.Dashboard` offers ``text/html`` beside its widget view: :func:`dashboard_html`
draws the last report (verdict, the calibrated bars of the very figure the widget shows, the explanation map
with its caption and colour bar, the timing) in plain HTML and CSS, no script. Jupyter and Voila draw the live
widget and ignore it; :func:`cxrbench.cli.notebooks.export_html` drops the saved widget state, so the exported
page shows this instead.

:func:`cxrbench.app.dashboard.show_dashboard` is what notebook 05 displays: outside Voila it first analyses one
example image, so the exported page shows a result; in Voila the page opens empty, waiting for an upload.
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any

__all__ = ["dashboard_html", "served_by_voila"]

NOTE = ("a snapshot of the dashboard after analysing the image above; serve the notebook with Voila "
        "(make demo) to upload your own image and move the controls")


def served_by_voila() -> bool:
    """Whether this kernel was started by Voila (it sets ``VOILA_BASE_URL`` in every kernel's environment)."""
    return "VOILA_BASE_URL" in os.environ


def _bars_html(figure: Any) -> str:
    """The bars of the dashboard's plotly figure as HTML rows: finding, a bar to scale, the value, the test label."""
    bar = figure.data[0]
    colours = bar.marker.color if isinstance(bar.marker.color, (list, tuple)) else [bar.marker.color] * len(bar.x)
    labels = [str(row[2]) for row in bar.customdata] if bar.customdata is not None else [""] * len(bar.x)
    rows = []
    for finding, value, colour, label in reversed(list(zip(bar.y, bar.x, colours, labels))):  # highest on top
        shown = value is not None and value == value  # NaN: an untrained output, no bar
        width = f"{100 * min(max(float(value), 0.0), 1.0):.1f}%" if shown else "0"
        number = f"{float(value):.3f}" if shown else "not trained by this model"
        rows.append("<tr class='cxr-bar'><td style='text-align:right;padding-right:6px;white-space:nowrap'>"
                    f"{html.escape(str(finding))}</td><td style='width:300px;position:relative'>"
                    f"<div style='width:{width};height:14px;background:{colour}'></div>"
                    "<div style='position:absolute;left:50%;top:0;bottom:0;border-left:1px dashed #555'></div></td>"
                    f"<td style='padding-left:6px'>{number}</td>"
                    "<td style='padding-left:8px;color:#555;white-space:nowrap;text-align:left'>"
                    f"<small>{html.escape(label)}</small></td></tr>")
    return ("<table class='cxr-static-bars' style='border-collapse:collapse;font-size:12px;line-height:1.2'>"
            "<caption style='caption-side:bottom;text-align:left;color:#555'><small>calibrated probability, "
            "0 to 1; dashed line: 0.5, each finding's operating point</small></caption>"
            + "".join(rows) + "</table>")


def _png_img(png: bytes, alt: str) -> str:
    return (f"<img src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}' alt='{html.escape(alt)}' "
            "style='width:384px;max-width:100%'>")


def dashboard_html(dashboard: Any) -> str:
    """A :class:`~cxrbench.app.dashboard.Dashboard`'s current state as one HTML snippet: its verdict, bars, map,
    caption, timing and model summary (for pages without a kernel); before any image, the model summary and a line
    saying none was analysed."""
    parts = ["<div class='cxr-dashboard-static'><p><b style='font-size:18px'>cxrbench · chest X-ray check</b> "
             "<span style='color:#555'>(static snapshot)</span></p>"]
    if dashboard.report is None and not dashboard.verdict.value:
        parts.append("<p class='cxr-static-empty'>No image analysed yet: in Voila (<code>make demo</code>) upload "
                     "a chest X-ray or pick an example.</p>")
    else:
        if dashboard.report is not None:  # the live page names it in its picker or upload button
            parts.append(f"<p class='cxr-static-image'>Image analysed: <b>{html.escape(dashboard.report.source)}</b>"
                         "</p>")
        parts.append(f"<div class='cxr-static-verdict'>{dashboard.verdict.value}</div>")
        left = []
        if dashboard.banner.layout.display != "none" and dashboard.banner.value:
            left.append(dashboard.banner.value)
        if dashboard.figure is not None:
            left.append(_bars_html(dashboard.figure))
        right = []
        if dashboard.overlay.value and dashboard.overlay.layout.visibility != "hidden":
            right.append(_png_img(dashboard.overlay.value, "explanation map over the image"))
        right.append(f"<div style='width:384px;line-height:1.3'>{dashboard.caption.value}</div>")
        if dashboard.colour_bar.layout.display != "none":
            right.append(f"<div style='width:384px'>{dashboard.colour_bar.value}</div>")
        parts.append("<div style='display:flex;flex-wrap:wrap;align-items:flex-start;gap:24px'>"
                     f"<div style='max-width:660px'>{''.join(left)}</div><div>{''.join(right)}</div></div>")
        parts.append(f"<div class='cxr-static-timing'>{dashboard.timing.value}</div>")
    parts.append(f"<div class='cxr-static-about'>{dashboard.about.value}</div>")
    parts.append(f"<p><small><i>{NOTE}</i></small></p></div>")
    return "".join(parts)
