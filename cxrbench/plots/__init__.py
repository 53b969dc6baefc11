"""Every figure cxrbench draws (matplotlib static, plotly interactive)."""

from cxrbench.plots.figures import bar_chart, heatmap, image_grid, show_equalisation

__all__ = ["bar_chart", "heatmap", "image_grid", "show_equalisation"]
