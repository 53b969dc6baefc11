"""One style for every interactive figure and table: the plotly template and the chance-line look.

Figures take these instead of choosing their own, so the notebooks, the dashboard and the HTML export look
alike. Nothing here changes global state.
"""

from __future__ import annotations

__all__ = ["CHANCE_LINE", "PLOTLY_TEMPLATE"]

#: the plotly template of every interactive figure
PLOTLY_TEMPLATE = "plotly_white"
#: the diagonal / chance reference line of a plotly figure
CHANCE_LINE = {"color": "#999", "dash": "dot"}
