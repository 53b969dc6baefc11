"""The explainer base class: layer lookup, hooks, targets, model state and map post-processing.

Every explainer in :mod:`cxrbench.explain` is a small subclass of :class:`Explainer` that only
implements :meth:`Explainer._compute`. The base class owns everything that is easy to get wrong:

* **Logits, never probabilities.** Maps are computed from the model's raw outputs (pre-sigmoid),
  never from sigmoid or calibrated outputs.
* **Targets.** ``targets=None`` explains every output; a list of output indices explains those
  findings for every image; a list of per-image lists explains different findings per image.
* **Hooks released.** The forward hook on the target layer lives inside a context manager and is
  removed on return *and* on exceptions.
* **In-place ReLUs.** torchvision's DenseNet and ResNet use ``nn.ReLU(inplace=True)`` and
  DenseNet's ``forward`` calls ``F.relu(features, inplace=True)`` on the output of ``features``.
  During a call every ``inplace`` activation module is switched to ``inplace=False``, and the
  hook hands a *clone* of the captured activation on to the rest of the network, so no later
  in-place operation can overwrite the captured tensor or its gradient. Gradients are taken with
  :func:`torch.autograd.grad` on the captured tensor (no module backward hooks are used).
* **Model state untouched.** The model runs in ``eval()`` mode during a call and every module's
  ``training`` flag and every ``inplace`` flag is restored afterwards; parameters'
  ``requires_grad`` and ``.grad`` are never modified. A method that only differentiates with respect to the
  input (:attr:`Explainer.input_gradients_only`: saliency, Integrated Gradients, SmoothGrad) runs a cxrbench
  classifier with its ReLUs in place instead (:func:`cxrbench.models.classifier.inplace_relus`: the same bits,
  fewer tensors; not while a hook is registered).
* **Finite maps at input resolution.** Maps are upsampled bilinearly to the input size and
  returned as ``(B, F, H, W)`` float32 NumPy arrays without NaN or Inf.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

Targets = Sequence[int] | Sequence[Sequence[int]] | None
#: targets chosen from the logits of the explainer's own forward pass: ``(B, N)`` float32 logits -> targets
TargetChooser = Callable[[np.ndarray], Targets]
Normalize = Literal["minmax"] | None


def _resolve_layers(
    model: nn.Module,
    target_layer: nn.Module | None = None,
    fc: nn.Linear | None = None,
) -> tuple[nn.Module, nn.Linear | None]:
    """Find the feature layer (last conv block) and the final linear layer of a classifier.

    Parameters
    ----------
    model : nn.Module
        A torchvision-style DenseNet (``features`` / ``classifier``) or ResNet (``layer4`` /
        ``fc``), or any model when both layers are given explicitly.
    target_layer, fc : nn.Module, optional
        Explicit overrides; used as given.

    Returns
    -------
    (target_layer, fc)
        ``fc`` is None when the model has no recognised final ``nn.Linear`` (only CAM needs it).

    Raises
    ------
    ValueError
        If no feature layer is given and none is found by attribute name.
    """
    if target_layer is None:
        if hasattr(model, "features") and isinstance(getattr(model, "classifier", None), nn.Linear):
            target_layer = model.get_submodule("features")  # torchvision DenseNet
        elif hasattr(model, "layer4"):
            target_layer = model.get_submodule("layer4")  # torchvision ResNet
        elif isinstance(getattr(model, "features", None), nn.Module):
            target_layer = model.get_submodule("features")
        else:
            raise ValueError(
                f"cannot find the feature layer of {type(model).__name__}: it has neither "
                "`features` (DenseNet) nor `layer4` (ResNet); pass target_layer= explicitly"
            )
    if not isinstance(target_layer, nn.Module):
        raise TypeError(f"target_layer must be an nn.Module, got {type(target_layer).__name__}")
    if fc is None:
        for name in ("classifier", "fc"):
            candidate = getattr(model, name, None)
            if isinstance(candidate, nn.Linear):
                fc = candidate
                break
    elif not isinstance(fc, nn.Linear):
        raise TypeError(f"fc must be an nn.Linear, got {type(fc).__name__}")
    return target_layer, fc


@contextlib.contextmanager
def prepared_model(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode with in-place activations disabled; restore both on exit.

    Every module with a boolean ``inplace`` attribute (``nn.ReLU``, ``nn.ReLU6``,
    ``nn.LeakyReLU``, ``nn.Dropout``, ...) is set to ``inplace=False`` for the duration.
    """
    training_flags = [(module, module.training) for module in model.modules()]
    inplace_modules = [
        module for module in model.modules() if isinstance(getattr(module, "inplace", None), bool)
    ]
    inplace_flags = [module.inplace for module in inplace_modules]
    try:
        model.eval()
        for module in inplace_modules:
            setattr(module, "inplace", False)  # a bool flag (nn.Module's stubs type attributes as tensors)
        yield model
    finally:
        for module, flag in zip(inplace_modules, inplace_flags):
            module.inplace = flag
        for module, training in training_flags:
            module.training = training


@contextlib.contextmanager
def captured_activations(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the output of ``layer`` during forward passes; the hook is removed on exit.

    Yields a list that receives one tensor per forward call. The network downstream of ``layer``
    receives a clone, so an in-place operation after ``layer`` (DenseNet's
    ``F.relu(features, inplace=True)``) cannot alter the recorded tensor.
    """
    store: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"target layer {type(layer).__name__} returned {type(output).__name__}, "
                "expected a (B, K, h, w) tensor"
            )
        store.append(output)
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def target_matrix(targets: Targets, batch_size: int, num_outputs: int) -> torch.Tensor:
    """Turn a ``targets`` argument into a ``(B, F)`` int64 matrix of output indices.

    Parameters
    ----------
    targets : None, list[int] or list[list[int]]
        None: all ``num_outputs`` outputs for every image. list[int]: the same findings for every
        image. list[list[int]]: per-image findings; every inner list must have the same length F.
    batch_size, num_outputs : int
        B and the number of model outputs.
    """
    if targets is None:
        return torch.arange(num_outputs).repeat(batch_size, 1)
    if isinstance(targets, torch.Tensor):
        targets = targets.tolist()
    if isinstance(targets, (int, np.integer, str)) or not isinstance(targets, Sequence | np.ndarray):
        raise TypeError(f"targets must be None, a list of ints or a list of lists, got {targets!r}")
    if len(targets) == 0:
        raise ValueError("targets is empty; pass None to explain every output")
    per_image = all(isinstance(t, Sequence | np.ndarray) and not isinstance(t, str) for t in targets)
    if per_image:
        if len(targets) != batch_size:
            raise ValueError(f"per-image targets has {len(targets)} lists for a batch of {batch_size}")
        nested = cast(Sequence[Sequence[int]], targets)  # every item is a sequence (checked above)
        lengths = {len(t) for t in nested}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"per-image target lists must be non-empty and of equal length, got {lengths}")
        rows = [list(t) for t in nested]
    else:
        rows = [list(cast(Sequence[int], targets))] * batch_size
    for row in rows:
        for index in row:
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
                raise TypeError(f"target indices must be ints, got {index!r}")
            if not 0 <= index < num_outputs:
                raise ValueError(f"target index {index} out of range for {num_outputs} model outputs")
    return torch.tensor(rows, dtype=torch.int64)


def selected_logit_sum(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of ``logits[b, index[b]]``; ``index`` is (B,) or (B, F) int64."""
    index = index.to(logits.device)
    if index.ndim == 1:
        index = index[:, None]
    return logits.gather(1, index).sum()


def resize_maps(maps: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize the last two axes of ``maps`` (any leading shape) to ``size`` = (H, W).

    Returns float32 NumPy; ``align_corners=False`` (pixel-centre convention, as skimage).
    """
    tensor = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps)
    tensor = tensor.detach().to("cpu", torch.float32)
    if tensor.ndim < 2:
        raise ValueError(f"maps must have at least 2 dimensions (H, W), got shape {tuple(tensor.shape)}")
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor.numpy().copy()
    lead = tensor.shape[:-2]
    flat = tensor.reshape(-1, 1, *tensor.shape[-2:])
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size).numpy()


def minmax_normalize(maps: np.ndarray) -> np.ndarray:
    """Scale each (H, W) map (last two axes) to [0, 1]; a constant map becomes all zeros."""
    maps = np.asarray(maps, dtype=np.float32)
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    safe_span = np.where(span > 0, span, 1.0)
    return np.where(span > 0, (maps - low) / safe_span, 0.0).astype(np.float32)


def gaussian_smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blur each (H, W) map (last two axes) with standard deviation ``sigma`` pixels."""
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0 (pixels), got {sigma}")
    maps = np.asarray(maps, dtype=np.float32)
    if sigma == 0:
        return maps
    sigmas = (0.0,) * (maps.ndim - 2) + (float(sigma), float(sigma))
    return ndimage.gaussian_filter(maps, sigma=sigmas, mode="nearest").astype(np.float32)


def postprocess_maps(
    maps: np.ndarray, *, relu: bool = False, sigma: float | None = None, normalize: Normalize = None
) -> np.ndarray:
    """Apply, in this order, ReLU, Gaussian smoothing (``sigma`` in pixels) and min-max scaling."""
    if normalize not in ("minmax", None):
        raise ValueError(f"normalize must be 'minmax' or None, got {normalize!r}")
    maps = np.asarray(maps, dtype=np.float32)
    if relu:
        maps = np.maximum(maps, 0.0)
    if sigma is not None:
        maps = gaussian_smooth(maps, sigma)
    if normalize == "minmax":
        maps = minmax_normalize(maps)
    return maps


class Explainer(abc.ABC):
    """Base class: call an instance on a batch to get one map per image and finding.

    Parameters
    ----------
    model : nn.Module
        Classifier mapping (B, C, H, W) float32 to (B, N) logits.
    target_layer : nn.Module, optional
        Layer whose output is the final feature map (B, K, h, w); default DenseNet ``features``,
        ResNet ``layer4``. Only used by CAM and Grad-CAM.
    fc : nn.Linear, optional
        Final linear layer (N, K); default DenseNet ``classifier``, ResNet ``fc``. Only CAM uses it.
    normalize : {"minmax", None}
        Scale each map to [0, 1] (a constant map becomes zeros). Default None (raw values).
    sigma : float, optional
        Gaussian smoothing of each map, standard deviation in input pixels. Default None.
    relu : bool
        Clip negative values to 0 after computing the map. Default False.
    """

    #: Registry name of the method.
    name: ClassVar[str] = ""
    #: Whether the method needs the target layer (CAM, Grad-CAM).
    uses_target_layer: ClassVar[bool] = False
    #: Whether the method back-propagates (all but CAM).
    needs_gradients: ClassVar[bool] = True
    #: Whether ``_compute`` runs the plain model once and hands its logits to :meth:`_target_index`
    #: (saliency, CAM, Grad-CAM): then :meth:`explain_with_logits` needs no forward pass of its own.
    records_logits: ClassVar[bool] = False
    #: Whether the maps need only gradients with respect to the input (no hook on a layer): a cxrbench classifier
    #: then runs with in-place ReLUs (:func:`cxrbench.models.classifier.inplace_relus`, the same values)
    input_gradients_only: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        *,
        target_layer: nn.Module | None = None,
        fc: nn.Linear | None = None,
        normalize: Normalize = None,
        sigma: float | None = None,
        relu: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if normalize not in ("minmax", None):
            raise ValueError(f"normalize must be 'minmax' or None, got {normalize!r}")
        if sigma is not None and (not np.isfinite(sigma) or sigma < 0):
            raise ValueError(f"sigma must be a finite number >= 0 (pixels) or None, got {sigma}")
        self.model = model
        self.target_layer: nn.Module | None
        self.fc: nn.Linear | None
        if self.uses_target_layer:
            self.target_layer, self.fc = _resolve_layers(model, target_layer, fc)
        else:
            self.target_layer, self.fc = target_layer, fc
        self.normalize: Normalize = normalize
        self.sigma = sigma
        self.relu = relu

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> np.ndarray:
        """Explain a batch.

        Parameters
        ----------
        x : torch.Tensor
            (B, C, H, W) float input, preprocessed exactly as for prediction.
        targets : None, list[int] or list[list[int]]
            Output indices to explain (see :func:`target_matrix`); None explains all outputs.

        Returns
        -------
        np.ndarray
            (B, F, H, W) float32, finite; F = number of targets (1 for the summed saliency map).
        """
        return self._explain(x, targets, with_logits=False)[1]

    def explain_with_logits(self, x: torch.Tensor, targets: Targets | TargetChooser = None
                            ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and maps of a batch from one forward pass: ``((B, N) float32 logits, (B, F, H, W) maps)``.

        ``targets`` as in :meth:`__call__`, or a function of the ``(B, N)`` logits returning them (so the
        findings to explain can be chosen from the probabilities of the same forward pass). The logits are
        those of the explainer's forward in eval mode (equal to a ``torch.no_grad()`` forward up to float
        rounding); a method whose forward passes are not the plain model's (Integrated Gradients,
        SmoothGrad) gets them from one extra no-grad forward.
        """
        return self._explain(x, targets, with_logits=True)  # type: ignore[return-value]

    def _explain(self, x: torch.Tensor, targets: Targets | TargetChooser, *, with_logits: bool
                 ) -> tuple[np.ndarray | None, np.ndarray]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if self.needs_gradients and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} needs gradients and cannot run inside torch.inference_mode(); "
                "call it outside (torch.no_grad() is fine)"
            )
        x = x.detach()
        self._logits: np.ndarray | None = None
        with prepared_model(self.model), torch.enable_grad(), self._activations():
            if callable(targets) and not self.records_logits:
                targets = targets(self._plain_logits(x))
            raw = self._compute(x, cast(Targets, targets))
            logits = self._logits if self._logits is not None or not with_logits else self._plain_logits(x)
        maps = resize_maps(raw, (x.shape[-2], x.shape[-1]))
        if not np.isfinite(maps).all():
            warnings.warn(
                f"{type(self).__name__}: non-finite values in the maps were set to 0",
                RuntimeWarning,
                stacklevel=2,
            )
            maps = np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
        return logits, postprocess_maps(maps, relu=self.relu, sigma=self.sigma, normalize=self.normalize)

    def _activations(self) -> contextlib.AbstractContextManager[object]:
        """In-place ReLUs for a method that needs only input gradients (see :attr:`input_gradients_only`)."""
        if not self.input_gradients_only:
            return contextlib.nullcontext()
        from cxrbench.models.classifier import inplace_relus  # torchvision's import only where it is used

        return inplace_relus(self.model)

    def _plain_logits(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            self._logits = _check_logits(self.model(x), x).detach().float().cpu().numpy()
        return self._logits

    def _target_index(self, logits: torch.Tensor, targets: Targets | TargetChooser) -> torch.Tensor:
        """The ``(B, F)`` target matrix for the logits of this call's forward pass, which are kept for
        :meth:`explain_with_logits`; ``targets`` may be a function of them (:data:`TargetChooser`)."""
        self._logits = logits.detach().float().cpu().numpy()
        if callable(targets):
            targets = targets(self._logits.copy())
        return target_matrix(targets, logits.shape[0], logits.shape[1])

    @abc.abstractmethod
    def _compute(self, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Return raw maps (B, F, h, w) for input ``x`` (B, C, H, W); runs inside eval mode."""

    def _forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward ``x``, returning logits (B, N) and the target layer's output (B, K, h, w)."""
        assert self.target_layer is not None
        with captured_activations(self.target_layer) as store:
            logits = self.model(x)
        if len(store) != 1:
            raise RuntimeError(
                f"target layer {type(self.target_layer).__name__} ran {len(store)} times in one "
                "forward pass; pass a layer that runs exactly once as target_layer="
            )
        return _check_logits(logits, x), store[0]


def _check_logits(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return (B, N) logits for a batch of {x.shape[0]}, got {shape}")
    return logits
