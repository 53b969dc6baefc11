"""Classifier factory: CheXNet-style DenseNet-121 and 1-channel ResNet18, outputting logits.

Both classes subclass torchvision's models, so their state-dict keys are torchvision's
(``features.denseblock1.denselayer1.norm1.weight``, ``classifier.weight``; ``conv1.weight``,
``fc.weight``) and torchvision ImageNet weights and CheXNet checkpoints load into them.
Differences from torchvision: the forward uses a non-inplace final ReLU, every ``nn.ReLU`` is made
non-inplace (so that a hook on any module, as Grad-CAM's, sees a tensor no later operation overwrites; where
nothing looks, :func:`inplace_relus` runs them in place again: logits and input gradients), optional
dropout before the head (parameter-free, so it adds no state-dict key), and helper attributes
(``arch``, ``in_channels``, ``num_outputs``, ``feature_dim``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from cxrbench.models.weights import (
    TORCHVISION_WEIGHTS,
    _load_checked,
    _rename_old_dense_keys,
    adapt_first_conv,
    load_torchvision_backbone,
)

__all__ = [
    "ARCHITECTURES",
    "DenseNet121",
    "ResNet18",
    "ResNet50",
    "build_classifier",
    "classifier_layer",
    "disable_inplace_relu",
    "embed",
    "feature_layer",
    "feature_maps",
    "from_torchxrayvision",
    "inplace_relus",
]


def disable_inplace_relu(model: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every ``nn.ReLU`` of ``model`` (in place); return ``model``."""
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def _relus_to_switch(model: nn.Module) -> list[nn.ReLU]:
    """The out-of-place ``nn.ReLU`` modules of ``model``, in one walk over its modules; none when a module hook is
    registered on ``model``, one of its modules or globally."""
    from torch.nn.modules import module as torch_module

    if any(getattr(torch_module, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
            "_global_backward_pre_hooks")):
        return []
    relus = []
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return []
        if isinstance(m, nn.ReLU) and not m.inplace:
            relus.append(m)
    return relus


@contextlib.contextmanager
def inplace_relus(model: nn.Module) -> Iterator[nn.Module]:
    """Run the ``nn.ReLU`` modules of a cxrbench classifier (or a DDP-style wrapper of one) in place for the
    duration, as torchvision builds them; their flags are restored on exit, also after an exception.

    The classes keep non-inplace ReLUs (the module doc), so that a hook on any module sees tensors that no later
    operation overwrites. Where nothing looks at the inner tensors they are not needed: each ReLU of torchvision's
    DenseNet and ResNet overwrites a tensor that nothing else reads (a batch norm's output, a residual sum; the
    backward reads the ReLU's output, and a batch norm its input), so the logits and every gradient are the same
    in every bit, and a forward allocates ~120 (DenseNet-121) fewer feature-map tensors. Measured on a 2-core
    EPYC (Zen 5), 2 threads, interleaved, the PyTorch report (saliency) of DenseNet-121 at 224 px: 3,400 -> 1,300-2,700
    page faults, 87.6 -> 84.8 ms (41 rounds; 3-10 % in other runs, as the allocator returns more or less memory
    to the system); ResNet18's report and a training step (128 px, batch 16, bf16 + channels_last: 252.4 vs
    252.3 ms, so the trainer does not use it): no change.

    Another model, or one with a module hook registered (on it, a submodule, or globally), runs unchanged. The
    flags are the model's, so one call at a time per model (as for the explainers' eval-mode switch): two threads
    sharing a model could leave it with in-place ReLUs.
    """
    try:
        _unwrap(model)
    except TypeError:
        relus: list[nn.ReLU] = []
    else:
        relus = _relus_to_switch(model)
    # a plain attribute: object.__setattr__ stores it as nn.Module.__setattr__ would, 10x faster (120 ReLUs in
    # DenseNet-121; this runs on every logits call)
    for relu in relus:
        object.__setattr__(relu, "inplace", True)
    try:
        yield model
    finally:
        for relu in relus:
            object.__setattr__(relu, "inplace", False)


class _HeadMixin(nn.Module):
    """Shared pieces: spatial features -> pooled embedding -> dropout -> linear head (logits)."""

    arch: str
    first_conv_name: str
    feature_layer_name: str
    classifier_layer_name: str
    head_dropout: nn.Module
    num_outputs: int
    in_channels: int
    #: set by :func:`from_torchxrayvision`: the pathology names and torchxrayvision's operating points
    labels: tuple[str, ...]
    xrv_operating_points: np.ndarray | None
    pretrained_weights: str | None = None  # e.g. "DenseNet121_Weights.IMAGENET1K_V1", set by build_classifier

    def _finish_init(self, num_outputs: int, in_channels: int, dropout: float) -> None:
        """After torchvision's constructor: the sizes, the head's dropout, the first conv and non-inplace ReLUs."""
        self.num_outputs = num_outputs
        self.in_channels = 3
        self.head_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if in_channels != 3:
            adapt_first_conv(self, in_channels)
        disable_inplace_relu(self)

    def forward_features(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, D)`` float of an input ``(B, C, H, W)``."""
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), (1, 1)), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_outputs)`` of an input ``(B, in_channels, H, W)`` float."""
        return self.get_submodule(self.classifier_layer_name)(self.head_dropout(self.embed(x)))

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch} expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )


class DenseNet121(_HeadMixin, DenseNet):
    """torchvision DenseNet-121 with logits head, non-inplace ReLUs and ``in_channels`` input channels.

    ``features`` ends with ``norm5`` (no ReLU); the ReLU after it is applied, non-inplace, in
    :meth:`forward_features`, so a hook on ``features`` sees the pre-ReLU maps ``(B, 1024, H/32, W/32)``.
    """

    features: nn.Sequential  # set by torchvision (which ships no type hints)

    arch = "densenet121"
    first_conv_name = "features.conv0"
    feature_layer_name = "features"
    classifier_layer_name = "classifier"
    feature_dim = 1024

    def __init__(self, num_outputs: int = 14, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, num_classes=num_outputs)
        self._finish_init(num_outputs, in_channels, dropout)

    def forward_features(self, x: Tensor) -> Tensor:
        """ReLU'd final feature maps ``(B, 1024, h, w)``; h = w = H/32 for an ``(B, C, H, W)`` input."""
        self._check_input(x)
        return F.relu(self.features(x), inplace=False)


class ResNet18(_HeadMixin, ResNet):
    """torchvision ResNet18 with logits head, non-inplace ReLUs and ``in_channels`` input channels.

    Note: torchvision's ``BasicBlock`` adds the shortcut in place (``out += identity``); a full
    backward hook on a block's inner ``bn2`` would therefore fail, hooks on ``layer1..4`` are fine.
    """

    conv1: nn.Conv2d  # set by torchvision (which ships no type hints)
    bn1: nn.BatchNorm2d
    relu: nn.ReLU
    maxpool: nn.MaxPool2d
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    arch = "resnet18"
    first_conv_name = "conv1"
    feature_layer_name = "layer4"
    classifier_layer_name = "fc"
    feature_dim = 512

    def __init__(self, num_outputs: int = 14, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_outputs)
        self._finish_init(num_outputs, in_channels, dropout)

    def forward_features(self, x: Tensor) -> Tensor:
        """Output of ``layer4``: ``(B, 512, h, w)``, h = w = H/32 for an ``(B, C, H, W)`` input."""
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _forward_impl(self, x: Tensor) -> Tensor:  # keep torchvision's entry point consistent
        return self.forward(x)


class ResNet50(ResNet18):
    """torchvision ResNet-50 (bottleneck blocks) with the same head and helpers as :class:`ResNet18`.

    The architecture of torchxrayvision's ``resnet50-res512-all`` (1 input channel, 512 px), which
    ``cxrbench import xrv`` converts; ``cxrbench train classifier`` does not offer it.
    """

    arch = "resnet50"
    feature_dim = 2048

    def __init__(self, num_outputs: int = 14, in_channels: int = 1, dropout: float = 0.0) -> None:
        ResNet.__init__(self, Bottleneck, [3, 4, 6, 3], num_classes=num_outputs)
        self._finish_init(num_outputs, in_channels, dropout)


ARCHITECTURES: dict[str, type[_HeadMixin]] = {"densenet121": DenseNet121, "resnet18": ResNet18,
                                              "resnet50": ResNet50}


def build_classifier(
    arch: str = "densenet121",
    num_outputs: int = 14,
    in_channels: int = 1,
    pretrained: bool = False,
    dropout: float = 0.0,
    *,
    allow_download: bool = False,
) -> nn.Module:
    """Build a multi-label classifier that outputs ``num_outputs`` logits.

    Parameters
    ----------
    arch
        ``"densenet121"`` (CheXNet), ``"resnet18"`` or ``"resnet50"`` (torchxrayvision's 512 px model).
    num_outputs
        Number of logits (14 for the NIH findings, :data:`cxrbench.labels.NIH_FINDINGS` order).
    in_channels
        Input channels; 1 for grey CXRs (the ImageNet first conv is then the sum of its RGB kernels).
    pretrained
        Load torchvision ImageNet weights into the backbone (the head stays random). The file must
        be in the torch hub cache; else :class:`~cxrbench.models.weights.WeightsUnavailableError`
        is raised immediately, unless ``allow_download=True``.
    dropout
        Dropout probability before the linear head, in [0, 1).

    Returns a ``DenseNet121`` or ``ResNet18`` module with attributes ``arch``, ``in_channels``,
    ``num_outputs``, ``feature_dim`` and ``pretrained_weights`` (a name or None).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    model = ARCHITECTURES[arch](num_outputs=num_outputs, in_channels=in_channels, dropout=dropout)
    model.pretrained_weights = None
    if pretrained:
        load_torchvision_backbone(model, arch, allow_download=allow_download)
        model.pretrained_weights = ".".join(TORCHVISION_WEIGHTS[arch])
    return disable_inplace_relu(model)


def _unwrap(model: nn.Module) -> _HeadMixin:
    """Strip DataParallel/DDP-style ``.module`` wrappers."""
    while not isinstance(model, _HeadMixin) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.get_submodule("module")
    if not isinstance(model, _HeadMixin):
        raise TypeError(f"{type(model).__name__} is not a cxrbench classifier (see build_classifier)")
    return model


def feature_layer(model: nn.Module) -> nn.Module:
    """The last spatial feature module: DenseNet ``features`` (ends at ``norm5``), ResNet ``layer4``."""
    inner = _unwrap(model)
    return inner.get_submodule(inner.feature_layer_name)


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The linear head mapping pooled features ``(B, D)`` to logits ``(B, num_outputs)``."""
    inner = _unwrap(model)
    head = inner.get_submodule(inner.classifier_layer_name)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{inner.arch}'s {inner.classifier_layer_name!r} is a {type(head).__name__}, not nn.Linear")
    return head


def feature_maps(model: nn.Module, x: Tensor) -> Tensor:
    """The rectified final feature maps ``(B, K, h, w)`` of ``x`` (what CAM weighs with the head)."""
    return _unwrap(model).forward_features(x)


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """Pooled features ``(B, D)`` (D = 1024 DenseNet-121, 512 ResNet18) of ``x`` ``(B, C, H, W)`` float.

    Runs with whatever grad mode and train/eval mode the caller set.
    """
    return _unwrap(model).embed(x)


# --------------------------------------------------------------------------------------------
# torchxrayvision (optional)
# --------------------------------------------------------------------------------------------
def from_torchxrayvision(xrv_model_or_weights: Any) -> nn.Module:
    """Turn a torchxrayvision DenseNet (or its weights name, e.g. ``"densenet121-res224-nih"``) into a cxrbench model.

    Returns a 1-channel :class:`~cxrbench.models.classifier.DenseNet121` with one logit per
    torchxrayvision pathology; ``model.labels`` holds the pathology names and
    ``model.xrv_operating_points`` its ``op_threshs`` (or None). torchxrayvision expects input
    scaled to [-1024, 1024], not cxrbench's normalisation: keep that in mind when you compare outputs.
    Raises ``ImportError`` when torchxrayvision is not installed.
    """
    try:
        import torchxrayvision as xrv  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "from_torchxrayvision needs the optional package 'torchxrayvision' (pip install torchxrayvision); "
            "it is not installed in this environment."
        ) from err
    source = (xrv.models.DenseNet(weights=xrv_model_or_weights) if isinstance(xrv_model_or_weights, str)
              else xrv_model_or_weights)
    pathologies = list(getattr(source, "pathologies", []))
    head = source.classifier
    model = _unwrap(build_classifier("densenet121", num_outputs=head.out_features, in_channels=1, pretrained=False))
    state_dict = {k: v for k, v in source.state_dict().items() if k.startswith(("features.", "classifier."))}
    _load_checked(model, _rename_old_dense_keys(state_dict), source="torchxrayvision model")
    model.labels = tuple(pathologies)
    op = getattr(source, "op_threshs", None)
    model.xrv_operating_points = None if op is None else torch.as_tensor(op).detach().cpu().numpy()
    return model
