"""Interactive explorers a student learns by moving (ipywidgets): a threshold per finding (notebook 02), the OOD
cutoff (notebook 03) and an explanation method x finding picker (notebook 04).

Each builder returns an ipywidgets box whose controls can be driven from Python (``explorer.slider.value = ...``)
and whose shown numbers sit in ``explorer.values``; in a page without a kernel (nbconvert HTML) the box shows a
static snapshot of its first state (:class:`~cxrbench.plots.explorers.base.Explorer`).
"""

from cxrbench.plots.explorers.cutoff import CutoffExplorer, cutoff_explorer, rotation_cutoff_explorer
from cxrbench.plots.explorers.methods import METHOD_DESCRIPTIONS, MethodPicker, method_picker
from cxrbench.plots.explorers.threshold import ThresholdExplorer, threshold_explorer

__all__ = ["METHOD_DESCRIPTIONS", "CutoffExplorer", "MethodPicker", "ThresholdExplorer", "cutoff_explorer",
           "method_picker", "rotation_cutoff_explorer", "threshold_explorer"]
