"""What the :class:`~cxrbench.inference.pipeline.Pipeline` needs from whatever runs the models.

Two small protocols, so PyTorch and ONNX Runtime (:mod:`cxrbench.export.runtime`) are backends of the
same pipeline instead of two pipelines:

- :class:`ClassifierBackend`: logits for a batch; explanation maps for a batch where the backend can
  compute them (``explain_methods`` says which).
- :class:`GateBackend`: every OOD score and the reconstruction of a batch, in one call.
- :class:`OnePassBackend` (optional): logits and maps from one forward pass, the findings to explain chosen
  from those logits; the pipeline then runs the network once per report.

:class:`TorchClassifier` and :class:`TorchGate` run torch networks. A bundle whose ``model`` already
follows a protocol (the ONNX Runtime adapters do) is used as it is: see :func:`classifier_backend` and
:func:`gate_backend`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from cxrbench.explain import EXPLAINERS, get_explainer
from cxrbench.explain.base import Explainer, TargetChooser, Targets
from cxrbench.ood.scoring import OODModel, score_with_reconstruction

__all__ = ["ClassifierBackend", "GateBackend", "GateOutput", "OnePassBackend", "TorchClassifier", "TorchGate",
           "classifier_backend", "gate_backend"]


class GateOutput(NamedTuple):
    """``scores``: scorer name -> ``(B,)`` float64 (higher = more OOD); ``reconstruction``: ``(B, 1, s, s)``
    float32 in [0, 1] (s = the gate's input side, 64 px)."""

    scores: dict[str, np.ndarray]
    reconstruction: np.ndarray


@runtime_checkable
class ClassifierBackend(Protocol):
    """A classifier ready to serve the pipeline."""

    #: ``"torch"``, ``"onnxruntime"``, ...
    name: str
    #: explainer names (:data:`cxrbench.explain.EXPLAINERS`) this backend can compute
    explain_methods: tuple[str, ...]

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """``(B, C, S, S)`` float32 model input (after :class:`~cxrbench.preprocess.Preprocess`) -> ``(B, F)``
        float32 logits."""

    def explain(self, x: torch.Tensor, method: str, targets: Targets = None, **options: Any) -> np.ndarray:
        """Maps ``(B, K, S, S)`` float32 of the logits (see :mod:`cxrbench.explain`); ``ValueError`` for a
        method outside ``explain_methods``. ``options``: post-processing (``normalize``, ``sigma``, ...)."""


@runtime_checkable
class OnePassBackend(Protocol):
    """A :class:`ClassifierBackend` that also gives the logits and the maps of one forward pass."""

    explain_methods: tuple[str, ...]

    def explain_with_logits(self, x: torch.Tensor, method: str, targets: Targets | TargetChooser = None,
                            **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """``((B, F) float32 logits, (B, K, S, S) maps)``; ``targets`` may be a function of the logits
        (:data:`cxrbench.explain.base.TargetChooser`). ``ValueError`` for a method outside ``explain_methods``."""


@runtime_checkable
class GateBackend(Protocol):
    """An OOD model ready to serve the pipeline's gate."""

    name: str

    def score(self, x: torch.Tensor) -> GateOutput:
        """``(B, 1, s, s)`` float32 in [0, 1] -> every score and the reconstruction."""


class TorchClassifier:
    """A torch classifier (``(B, C, S, S)`` -> ``(B, F)`` logits) as a :class:`ClassifierBackend`.

    The model is moved to ``device`` and put in eval mode once; explainers are built on first use and
    kept in :attr:`explainers` (keyed by method and options), so a second call pays only for the maps.
    """

    name = "torch"
    explain_methods = tuple(EXPLAINERS)

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.explainers: dict[tuple[str, tuple[tuple[str, Any], ...]], Explainer] = {}

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> np.ndarray:
        """``(B, F)`` float32 logits of the batch ``x``, computed on the model's device."""
        from cxrbench.models.classifier import inplace_relus  # torchvision's import only where it is used

        with inplace_relus(self.model):  # the same logits, fewer tensors (a cxrbench classifier without hooks)
            return self.model(x.to(self.device)).float().cpu().numpy()

    def explainer(self, method: str, **options: Any) -> Explainer:
        """The (cached) explainer for ``method`` with post-processing ``options``."""
        key = (method, tuple(sorted(options.items())))
        if key not in self.explainers:
            self.explainers[key] = get_explainer(method, self.model, **options)
        return self.explainers[key]

    def explain(self, x: torch.Tensor, method: str, targets: Targets = None, **options: Any) -> np.ndarray:
        """``(B, F, H, W)`` maps of ``method`` for ``targets`` on the batch ``x``."""
        return self.explainer(method, **options)(x.to(self.device), targets=targets)

    def explain_with_logits(self, x: torch.Tensor, method: str, targets: Targets | TargetChooser = None,
                            **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """Logits and maps from the explainer's own forward pass (:meth:`Explainer.explain_with_logits`)."""
        return self.explainer(method, **options).explain_with_logits(x.to(self.device), targets)


class TorchGate:
    """A torch OOD model (ALI or autoencoder, :class:`cxrbench.ood.scoring.OODModel`) as a :class:`GateBackend`."""

    name = "torch"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if not isinstance(self.model, OODModel):
            raise TypeError(f"{type(model).__name__} is not an OOD model "
                            "(it needs latent_mean, reconstruct, latent_dim and image_size)")
        self.ood_model: OODModel = self.model

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> GateOutput:
        """The OOD scores of the batch ``x`` and its reconstruction (one encode)."""
        scores, reconstruction = score_with_reconstruction(self.ood_model, x.to(self.device))
        return GateOutput(scores, reconstruction.float().cpu().numpy())


def classifier_backend(model: Any, device: str | torch.device = "cpu") -> ClassifierBackend:
    """``model`` itself when it is a :class:`ClassifierBackend`, else a :class:`TorchClassifier` around it."""
    if isinstance(model, ClassifierBackend):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch classifier or a ClassifierBackend, got {type(model).__name__}")
    return TorchClassifier(model, device)


def gate_backend(model: Any, device: str | torch.device = "cpu") -> GateBackend:
    """``model`` itself when it is a :class:`GateBackend`, else a :class:`TorchGate` around it."""
    if isinstance(model, GateBackend):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch OOD model or a GateBackend, got {type(model).__name__}")
    return TorchGate(model, device)
