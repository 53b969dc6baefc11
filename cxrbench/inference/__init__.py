"""Inference: the one path from an image to a report (OOD gate -> calibrated probabilities -> explanation).

:class:`Pipeline` is what every face calls: ``cxrbench predict`` / ``analyze`` / ``explain``, the dashboard,
the notebooks, on PyTorch or ONNX Runtime. :mod:`cxrbench.inference.backend` says what a backend provides;
:mod:`cxrbench.inference.predict` holds the batched forward passes and the prediction tables.
"""

from cxrbench.inference.backend import (
                                        ClassifierBackend,
                                        GateBackend,
                                        GateOutput,
                                        TorchClassifier,
                                        TorchGate,
                                        classifier_backend,
                                        gate_backend,
)
from cxrbench.inference.pipeline import OODResult, Pipeline, RejectedImageError, Report
from cxrbench.inference.predict import (
                                        Predictions,
                                        operating_points_of,
                                        predict_dataset,
                                        predict_files,
                                        predictions_table,
)

__all__ = ["ClassifierBackend", "GateBackend", "GateOutput", "OODResult", "Pipeline", "Predictions",
           "RejectedImageError", "Report", "TorchClassifier", "TorchGate", "classifier_backend", "gate_backend",
           "operating_points_of", "predict_dataset", "predict_files", "predictions_table"]
