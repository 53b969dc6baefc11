"""Inference: the one path from an image to a report (OOD gate -> calibrated probabilities -> explanation).

:class:`Pipeline` is what every face calls: ``cxrbench predict`` / ``analyze`` / ``explain`` / ``segment``,
the dashboard, the notebooks and the ONNX Runtime backend. :mod:`cxrbench.inference.predict` holds the
batched forward passes and the prediction tables it is made of.
"""

from cxrbench.inference.pipeline import OODResult, Pipeline, RejectedImageError, Report
from cxrbench.inference.predict import (
                                        Predictions,
                                        operating_points_of,
                                        predict_dataset,
                                        predict_files,
                                        predictions_table,
)

__all__ = ["OODResult", "Pipeline", "Predictions", "RejectedImageError", "Report", "operating_points_of",
           "predict_dataset", "predict_files", "predictions_table"]
