"""What every explorer shares: controls above, a picture (a matplotlib figure as PNG) beside its numbers, and a
static form for pages without a kernel.

An explorer is an ``ipywidgets.VBox``. In Jupyter and Voila the frontend draws the live widget; nbconvert's HTML
export and a papermill-executed notebook have no kernel to move it, so :meth:`Explorer._repr_mimebundle_` also
offers ``text/html``: the current picture and numbers as a snapshot, which nbconvert shows when the notebook
carries no widget state (:func:`cxrbench.cli.notebooks.export_html` drops it). The figure is a
``matplotlib.figure.Figure`` made without pyplot, so the inline backend never shows it a second time.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

import ipywidgets as w
import matplotlib
from matplotlib.figure import Figure

__all__ = ["Explorer", "figure_png"]

#: resolution of the explorers' pictures (dots per inch of the matplotlib figure)
DPI = 96


def figure_png(figure: Figure, dpi: int = DPI) -> bytes:
    """The PNG bytes of a matplotlib figure (drawn with the Agg canvas, in memory)."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class Explorer(w.VBox):
    """Controls, a picture and its numbers; subclasses draw into :attr:`figure` and fill :attr:`values`.

    ``values`` holds the numbers shown for the current state (floats and ints, the same ones the text
    shows), ``numbers`` is the HTML widget showing them and ``picture`` the PNG of ``figure``.
    """

    def __init__(self, title: str, controls: Sequence[w.Widget], figsize: tuple[float, float],
                 numbers_width: str = "300px") -> None:
        self.title = title
        self.figure = Figure(figsize=figsize, dpi=DPI)
        self.picture = w.Image(format="png", layout=w.Layout(width=f"{int(figsize[0] * DPI)}px"))
        self.numbers = w.HTML(layout=w.Layout(width=numbers_width, margin="0 0 0 12px"))
        self.values: dict[str, Any] = {}
        header = w.HTML(f"<b>{html.escape(title)}</b>")
        super().__init__([header, w.HBox(list(controls), layout=w.Layout(flex_flow="row wrap")),
                          w.HBox([self.picture, self.numbers], layout=w.Layout(align_items="flex-start"))])

    def _new_layout(self) -> None:
        """Clear the figure for new axes, laid out (constrained) at the next :meth:`_show`."""
        self.figure.clear()
        self.figure.set_layout_engine("constrained")

    def _show(self, numbers_html: str) -> None:
        """Publish the figure drawn into :attr:`figure` and the numbers' HTML.

        After the first save following :meth:`_new_layout` the figure has no layout engine (``None``, not
        ``"none"``, whose placeholder makes every save draw twice): the axes stay where that layout put them, so
        a control that only changes markers or pixels redraws in half the time."""
        self.picture.value = figure_png(self.figure)
        with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
            self.figure.set_layout_engine(None)
        self.numbers.value = numbers_html

    def state_line(self) -> str:
        """One line naming the controls' current settings (for the static snapshot)."""
        return ""

    def static_html(self) -> str:
        """The current picture and numbers as one HTML snippet (what a page without a kernel shows)."""
        png = base64.b64encode(self.picture.value).decode("ascii")
        note = ("a snapshot at the settings above; open the notebook in Jupyter or Voila and run it to move "
                "the controls")
        return (f"<div class='cxr-explorer-static'><p><b>{html.escape(self.title)}</b>"
                f"<br><small>{html.escape(self.state_line())}</small></p>"
                "<div style='display:flex;align-items:flex-start;gap:12px;flex-wrap:wrap'>"
                f"<img src='data:image/png;base64,{png}' alt='{html.escape(self.title)}'>"
                f"<div style='flex:1 1 {self.numbers.layout.width};max-width:900px'>{self.numbers.value}</div></div>"
                f"<p><small><i>{note}</i></small></p></div>")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/html"] = self.static_html()
        return data
