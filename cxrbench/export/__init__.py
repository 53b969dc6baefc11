"""Export: ONNX graphs with parity checks (:mod:`.onnx`), the fingerprinted cache of exports (:mod:`.cache`), the
ONNX Runtime backend and ``backend="auto"`` (:mod:`.runtime`) and the browser-only app (:mod:`.web`)."""

from cxrbench.export.onnx import ExportResult, ParityError, export_models, parity_check, read_onnx_card

__all__ = ["ExportResult", "ParityError", "export_models", "parity_check", "read_onnx_card"]
