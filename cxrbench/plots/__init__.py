"""Every figure cxrbench draws, one naming scheme: ``<what>_figure(data, ...)`` returns the figure
(matplotlib for static figures, plotly where interaction helps), so a notebook can show or save it.

Each takes data, not file names. By domain: :mod:`.images` (image grids), :mod:`.data` (label counts,
co-occurrence, equalisation), :mod:`.evaluation` (ROC, calibration, training curves), :mod:`.ood`
(the OOD gate, Chester Fig. 4-7), :mod:`.explain` (faithfulness curves), :mod:`.hybrid` (the report's
table), :mod:`.export` (browser vs Python, Fig. 9), :mod:`.app` (the dashboard's probability bars).
Tables a notebook shows are ``<what>_table`` (:mod:`.tables`: wide tables shaped to fit a page); one look
for all of them in :mod:`.style`. matplotlib and plotly are imported on the first figure.
"""

from cxrbench.plots.app import probability_figure
from cxrbench.plots.data import bar_figure, equalisation_figure, heatmap_figure
from cxrbench.plots.evaluation import calibration_figure, roc_figure, training_figure
from cxrbench.plots.explain import faithfulness_figure
from cxrbench.plots.export import browser_study_figure
from cxrbench.plots.hybrid import comparison_figure
from cxrbench.plots.images import image_grid_figure
from cxrbench.plots.ood import (
    ood_training_figure,
    reconstruction_figure,
    rotation_figure,
    score_distribution_figure,
    tradeoff_figure,
)
from cxrbench.plots.tables import readable_table

__all__ = ["bar_figure", "browser_study_figure", "calibration_figure", "comparison_figure", "equalisation_figure",
           "faithfulness_figure", "heatmap_figure", "image_grid_figure", "ood_training_figure", "probability_figure",
           "readable_table", "reconstruction_figure", "roc_figure", "rotation_figure", "score_distribution_figure",
           "tradeoff_figure", "training_figure"]
