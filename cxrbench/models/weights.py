"""Weight loaders for outside formats: torchvision ImageNet weights, CheXNet checkpoints (into any model).

These loaders fill a model they are given, so the classifier factory (:mod:`cxrbench.models.classifier`)
builds on them; :func:`cxrbench.models.classifier.from_torchxrayvision`, which builds its own model, lives there.

Everything here loads with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects. Nothing is downloaded unless the caller asks for it (``allow_download=True``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PickledCheckpointError",
    "WeightsUnavailableError",
    "adapt_first_conv",
    "adapt_conv_weight",
    "first_conv",
    "load_chexnet_checkpoint",
    "load_torchvision_backbone",
    "torchvision_weights_path",
]

#: torchvision ImageNet weights per architecture: (enum class name, member name).
TORCHVISION_WEIGHTS: dict[str, tuple[str, str]] = {
    "densenet121": ("DenseNet121_Weights", "IMAGENET1K_V1"),
    "resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"),
}

# Before torchvision 0.2, dense-layer module names contained dots ('norm.1'); CheXNet checkpoints
# and torchvision's own densenet files still use them. Same pattern as torchvision.models.densenet.
_OLD_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_HEAD_PREFIXES = ("classifier.", "fc.")


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are not on this machine and downloading was not allowed."""


class PickledCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects (e.g. a whole model), which cxrbench never unpickles."""


#: how to turn a pickled whole model into a file cxrbench reads, in the environment that made it
STATE_DICT_HINT = ("in the environment that made it (with the code of its model class), load it there and save "
                   "only its weights: `torch.save(model.state_dict(), 'state_dict.pt')`, then pass that file")


# --------------------------------------------------------------------------------------------
# first convolution
# --------------------------------------------------------------------------------------------
def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """Return ``(qualified name, module)`` of the model's input convolution.

    Uses ``model.first_conv_name`` when the model defines it (cxrbench classifiers do), else the
    first ``nn.Conv2d`` in registration order.
    """
    name = getattr(model, "first_conv_name", None)
    if name is not None:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"model.first_conv_name={name!r} is a {type(module).__name__}, not nn.Conv2d")
        return name, module
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise TypeError(f"{type(model).__name__} has no nn.Conv2d")


def adapt_conv_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Map a conv kernel ``(C_out, C_in, k, k)`` to ``(C_out, in_channels, k, k)``.

    Each new input channel gets ``sum_c W[:, c] / in_channels``: a grey image fed on all new
    channels then gives the same response as on all old ones. For 3 -> 1 this is the usual
    "sum of the RGB kernels"; for 1 -> 3 each channel gets a third of the kernel.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a conv weight of shape (C_out, C_in, k, k), got {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if weight.shape[1] == in_channels:
        return weight.clone()
    summed = weight.sum(dim=1, keepdim=True) / in_channels
    return summed.repeat(1, in_channels, 1, 1).contiguous()


def adapt_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the model's input conv by one taking ``in_channels``, keeping the filters' response.

    Works in place and returns ``model``; sets ``model.in_channels`` when the model has that attribute.
    """
    name, conv = first_conv(model)
    if conv.in_channels == in_channels:
        return model
    if conv.groups != 1:
        raise ValueError(f"cannot adapt grouped first conv {name!r} (groups={conv.groups})")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=_pair(conv.kernel_size),
        stride=_pair(conv.stride),
        padding=conv.padding if isinstance(conv.padding, str) else _pair(conv.padding),
        dilation=_pair(conv.dilation),
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(adapt_conv_weight(conv.weight, in_channels))
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if hasattr(model, "in_channels"):
        setattr(model, "in_channels", in_channels)  # a plain int (torch types Module attributes as tensors)
    return model


def _pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's ``(h, w)`` setting (torch stores them as tuples of any length)."""
    return values[0], values[1]


# --------------------------------------------------------------------------------------------
# state-dict helpers
# --------------------------------------------------------------------------------------------
def _read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read with ``torch.load(weights_only=True)``.

    A file of pickled objects (a whole ``nn.Module`` saved with ``torch.save(model)``, as torchxrayvision's
    DenseNet files are) is refused with :class:`PickledCheckpointError` naming the file and saying how to
    save a state dict instead; nothing in it is unpickled.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only raises for a global it does not allow
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        needs = f": it needs the class {found.group(1)}" if found else ""
        raise PickledCheckpointError(
            f"{path} is a pickled model or other Python objects, not a state dict of tensors "
            f"(torch.load(weights_only=True) refuses it{needs}). cxrbench never unpickles files; "
            f"{STATE_DICT_HINT}.") from None
    except Exception as err:  # pickle errors come in many types
        raise ValueError(
            f"could not load {path} with torch.load(weights_only=True): {err}. cxrbench never unpickles "
            "arbitrary objects; re-save the file as a plain state dict (tensors only)."
        ) from err
    return _unwrap_state_dict(obj, source=str(path))


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TypeError(f"{source}: expected a state dict (str -> Tensor) or a dict with key 'state_dict'")
    return dict(obj)


def _rename_old_dense_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _OLD_DENSE_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def _load_checked(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str,
    ignore_missing_prefixes: tuple[str, ...] = (),
) -> nn.Module:
    """``load_state_dict`` with readable errors; BatchNorm ``num_batches_tracked`` may be absent."""
    expected = model.state_dict()
    conv_name, conv = first_conv(model)
    conv_key = f"{conv_name}.weight"
    if conv_key in state_dict and state_dict[conv_key].shape[1] != conv.in_channels:
        state_dict[conv_key] = adapt_conv_weight(state_dict[conv_key], conv.in_channels)
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = [
        k
        for k in expected
        if k not in state_dict
        and not k.endswith("num_batches_tracked")
        and not k.startswith(ignore_missing_prefixes)
    ]
    unexpected = [k for k in state_dict if k not in expected]
    if wrong_shape or missing or unexpected:
        parts = []
        for label, keys in (("shape mismatch", wrong_shape), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" ... (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label} keys, e.g. {keys[:5]}{more}")
        raise ValueError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)
    return model


# --------------------------------------------------------------------------------------------
# torchvision ImageNet weights
# --------------------------------------------------------------------------------------------
def _torchvision_weights(arch: str) -> Any:
    import torchvision.models as tvm

    if arch not in TORCHVISION_WEIGHTS:
        raise ValueError(f"no torchvision weights known for arch {arch!r}; "
                         f"expected one of {sorted(TORCHVISION_WEIGHTS)}")
    enum_name, member = TORCHVISION_WEIGHTS[arch]
    return getattr(getattr(tvm, enum_name), member)


def torchvision_weights_path(arch: str) -> Path:
    """Where torch hub caches the ImageNet weights of ``arch``: ``<torch.hub.get_dir()>/checkpoints/<file>``."""
    from urllib.parse import urlparse

    weights = _torchvision_weights(arch)
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_torchvision_backbone(model: nn.Module, arch: str, *, allow_download: bool = False) -> nn.Module:
    """Load torchvision ImageNet weights into ``model``'s backbone (the head stays as initialised).

    The file is looked up in the torch hub cache first (``$TORCH_HOME/hub/checkpoints``). When it is
    absent, :class:`WeightsUnavailableError` is raised at once unless ``allow_download=True``. A
    different number of input channels is handled by :func:`adapt_conv_weight` (1 channel: RGB sum).
    """
    weights = _torchvision_weights(arch)
    path = torchvision_weights_path(arch)
    if not path.is_file():
        if not allow_download:
            raise WeightsUnavailableError(
                f"pretrained weights {type(weights).__name__}.{weights.name} for {arch!r} are not in the torch hub "
                f"cache: {path} does not exist. Download {weights.url} and put it there (the cache dir follows "
                "$TORCH_HOME), or pass allow_download=True / pretrained=False."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = re.search(r"-([a-f0-9]+)\.", path.name)  # torchvision names carry a SHA-256 prefix
        torch.hub.download_url_to_file(
            weights.url, str(path), hash_prefix=hash_prefix.group(1) if hash_prefix else None, progress=True
        )
    state_dict = _rename_old_dense_keys(_read_state_dict(path))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}
    return _load_checked(model, state_dict, source=str(path), ignore_missing_prefixes=_HEAD_PREFIXES)


# --------------------------------------------------------------------------------------------
# CheXNet (arnoweng/CheXNet model.pth.tar)
# --------------------------------------------------------------------------------------------
def _chexnet_key(key: str) -> str:
    if key.startswith("module."):
        key = key[len("module.") :]
    if key.startswith("densenet121."):
        key = key[len("densenet121.") :]
    if key.startswith("classifier.0."):
        key = "classifier." + key[len("classifier.0.") :]
    return key


def load_chexnet_checkpoint(
    model: nn.Module, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any]
) -> nn.Module:
    """Load a CheXNet reimplementation checkpoint (Weng et al. 2017, ``model.pth.tar``) into ``model``.

    Parameters
    ----------
    model
        A cxrbench DenseNet-121 (``build_classifier("densenet121", num_outputs=14)``); with
        ``in_channels=1`` the 3-channel first conv of the file is summed over RGB.
    path_or_state_dict
        The file (a dict with ``'state_dict'``, read with ``weights_only=True``) or the dict itself.
        Keys like ``module.densenet121.features.denseblock1.denselayer1.norm.1.weight`` and
        ``module.densenet121.classifier.0.weight`` are mapped to torchvision's names.

    Returns the model (loaded in place). Note the file's model ended in a sigmoid; cxrbench models
    output logits, so ``torch.sigmoid(model(x))`` reproduces the original probabilities.
    Raises ``ValueError`` listing missing/unexpected/mis-shaped keys when the file does not fit.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw = _unwrap_state_dict(path_or_state_dict, source="the given state dict")
        source = "the given state dict"
    else:
        raw = _read_state_dict(path_or_state_dict)
        source = str(path_or_state_dict)
    state_dict = _rename_old_dense_keys({_chexnet_key(k): v for k, v in raw.items()})
    return _load_checked(model, state_dict, source=source)
