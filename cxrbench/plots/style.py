"""One style for every figure and table: the plotly template, the chance-line and operating-point looks.

Figures take these instead of choosing their own, so the notebooks, the dashboard and the HTML export look
alike. Nothing here changes global state.
"""

from __future__ import annotations

__all__ = ["CHANCE_LINE", "MPL_CHANCE_LINE", "MPL_OPERATING_POINT", "PLOTLY_TEMPLATE"]

#: the plotly template of every interactive figure
PLOTLY_TEMPLATE = "plotly_white"
#: the diagonal / chance reference line of a plotly figure
CHANCE_LINE = {"color": "#999", "dash": "dot"}
#: the same chance line in a matplotlib figure (``ax.plot(x, y, **MPL_CHANCE_LINE)``)
MPL_CHANCE_LINE = {"color": "#999", "lw": 0.8, "ls": ":"}
#: a validation operating point in a matplotlib figure: the red star of the ROC and calibration figures
MPL_OPERATING_POINT = {"marker": "*", "ls": "none", "color": "red", "ms": 12}
