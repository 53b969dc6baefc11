"""Rewrites of a classifier for tracing its input gradient (:mod:`cxrbench.export.gradient`): the same forward
operations, a shorter backward.

Traced as they are, an eval-mode batch norm's backward is two multiplies of the whole gradient tensor (by its
weight, then by ``1 / sqrt(var + eps)``), and a DenseNet block's concatenation of all earlier features sends each
layer's gradient back as a split into one slice per earlier feature, each added to that feature's running sum
(~530 small Adds in DenseNet-121). Here:

* :class:`ConvAffine` (a convolution followed by a batch norm, as in ResNet and DenseNet's stem) and
  :class:`AffineReluConv` (batch norm, ReLU, convolution: DenseNet's pre-activation layers) are one unit each, with
  a hand-written backward that folds the batch norm's per-channel scale into the weights of the transposed
  convolution. ``conv^T(s * g) = conv^T_{W * s}(g)`` and ``s * (mask * conv^T(g)) = mask * conv^T_{W * s}(g)``:
  the same sums, rounded once less; the weights are scaled when ONNX Runtime folds the graph's constants.
* :class:`IncrementalDenseBlock` concatenates each new feature map onto the block's running concatenation
  (``x = cat(x, layer(x))``, as torchxrayvision's own DenseNet does), so each layer's input gradient is one Add.

The forward operations and their order are unchanged (the ReLU masks, which decide the map, are the same), and
:func:`rewrite_for_gradient` checks that: a rewrite whose forward differs in any bit is not used.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AffineReluConv", "ChannelAffine", "ConvAffine", "IncrementalDenseBlock", "conv_input_grad",
           "plain_for_gradient", "rewrite_for_gradient", "transposed_padding"]

_aten = torch.ops.aten


def transposed_padding(in_size: Any, out_size: Any, kernel: Any, stride: Any, padding: Any, dilation: Any
                        ) -> list[int]:
    """The output padding that makes a transposed convolution give back ``in_size`` (H, W)."""
    return [int(in_size[i]) - ((int(out_size[i]) - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1)
                               + 1) for i in range(2)]


def conv_input_grad(grad_out: torch.Tensor, in_shape: Any, weight: torch.Tensor, stride: Any, padding: Any,
                    dilation: Any, groups: int) -> torch.Tensor:
    """The input gradient of a 2-D convolution with ``weight``: a convolution with the kernel flipped and its
    channel axes swapped where the stride is 1 (the same sums; ONNX Runtime's Conv is several times faster than
    its ConvTranspose: ResNet18 224 px 136 vs 172 ms a run), else a transposed convolution."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    extra = transposed_padding(in_shape[2:], grad_out.shape[2:], weight.shape[2:], stride, padding, dilation)
    if groups == 1 and all(s == 1 for s in stride) and not any(extra):
        pad = [dilation[i] * (weight.shape[2 + i] - 1) - padding[i] for i in range(2)]
        if all(p >= 0 for p in pad):
            flipped = weight.transpose(0, 1).flip(2, 3).contiguous()
            return _aten.convolution.default(grad_out, flipped, None, [1, 1], pad, dilation, False, [0, 0], 1)
    return _aten.convolution.default(grad_out, weight, None, stride, padding, dilation, True, extra, groups)


class ChannelAffine(nn.Module):
    """An eval-mode ``BatchNorm2d`` as the per-channel affine map it computes, in the operations of torch's own
    decomposition (``(x - mean) * rsqrt(var + eps) * weight + bias``: the same rounding as before the swap; the
    fused ``x * scale + shift``, which ONNX Runtime folds into the Conv before it, was 7 % faster for DenseNet-121
    but moved 0.1 % of the map's pixels by up to 0.5 % of its maximum, near-ties that this form keeps within
    7e-7). ``scale`` (``weight * rsqrt(var + eps)``) is its input gradient."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None  # eval statistics (checked by the caller)
        n = bn.num_features
        with torch.no_grad():
            invstd = torch.rsqrt(bn.running_var + bn.eps)
            weight = bn.weight if bn.weight is not None else torch.ones(n)
            stats = {"mean": bn.running_mean, "invstd": invstd, "weight": weight,
                     "bias": bn.bias if bn.bias is not None else torch.zeros(n), "scale": invstd * weight}
        for name, value in stats.items():
            self.register_buffer(name, value.detach().reshape(1, -1, 1, 1).clone())

    mean: torch.Tensor
    invstd: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) * invstd * weight + bias``, per channel."""
        return (x - self.mean) * self.invstd * self.weight + self.bias


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _grad_through(conv: nn.Conv2d, g: torch.Tensor, in_shape: Any, weight: torch.Tensor) -> torch.Tensor:
    return conv_input_grad(g, in_shape, weight, conv.stride, conv.padding, conv.dilation, conv.groups)


class _ConvAffineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, unit: ConvAffine) -> torch.Tensor:
        ctx.unit, ctx.in_shape = unit, x.shape
        return unit.affine(_conv(unit.conv, x))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        unit = ctx.unit  # conv^T(scale * g) = conv^T with the output channels of W scaled
        weight = unit.conv.weight * unit.affine.scale.reshape(-1, 1, 1, 1)
        return _grad_through(unit.conv, g, ctx.in_shape, weight), None


class _AffineReluConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, unit: AffineReluConv) -> torch.Tensor:
        a = unit.affine(x)
        ctx.unit, ctx.in_shape = unit, x.shape
        ctx.save_for_backward(a)
        return _conv(unit.conv, torch.relu(a))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        unit, (a,) = ctx.unit, ctx.saved_tensors  # scale * mask * conv^T(g) = mask * conv^T with W's inputs scaled
        weight = unit.conv.weight * unit.affine.scale.reshape(1, -1, 1, 1)
        return _grad_through(unit.conv, g, ctx.in_shape, weight) * (a > 0).to(g.dtype), None


class ConvAffine(nn.Module):
    """``affine(conv(x))``: a convolution and the eval-mode batch norm after it, with the folded backward."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.affine = conv, ChannelAffine(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``affine(conv(x))``; its backward is one transposed convolution."""
        return _ConvAffineFunction.apply(x, self)


class AffineReluConv(nn.Module):
    """``conv(relu(affine(x)))``: a pre-activation batch norm, its ReLU and the convolution, folded backward."""

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> None:
        super().__init__()
        self.affine, self.conv = ChannelAffine(bn), conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(relu(affine(x)))``; its backward is one transposed convolution and the ReLU mask."""
        return _AffineReluConvFunction.apply(x, self)


class IncrementalDenseBlock(nn.Module):
    """A torchvision ``_DenseBlock`` that grows one concatenation (``x = cat(x, layer(x))``): the same values."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block.children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output: its input and every layer's new features, concatenated in order."""
        for layer in self.layers:
            x = torch.cat([x, _dense_layer(layer, x)], 1)
        return x


def _dense_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ``_DenseLayer`` on one tensor (its own forward would first copy it: ``cat([x])``)."""
    if getattr(layer, "drop_rate", 0) and layer.training:
        return layer(x)
    parts = [getattr(layer, name) for name in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2")]
    for part in parts:
        x = part(x)
    return x


def _is_eval_bn(module: nn.Module) -> bool:
    return (isinstance(module, nn.BatchNorm2d) and module.track_running_stats and module.running_var is not None
            and not module.training)


def _execution_order(net: nn.Module, example: tuple[torch.Tensor, ...]) -> list[tuple[nn.Module, Any, Any]]:
    """``(leaf module, input, output)`` of every leaf call of one forward, in order."""
    calls: list[tuple[nn.Module, Any, Any]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0] if inp else None, out)))
             for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net(*example)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _set(net: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    """Put ``replacement`` wherever ``target`` is a child (found first, then set: it may hold ``target``)."""
    slots = [(module, name) for module in net.modules() for name, child in module.named_children() if child is target]
    for module, name in slots:
        setattr(module, name, replacement)


def _units(calls: list[tuple[nn.Module, Any, Any]]) -> list[tuple[str, tuple[nn.Module, ...]]]:
    """The conv -> BN and BN -> ReLU -> conv chains among the calls (each module called once, each output the
    next module's input)."""
    once = {id(m) for m, *_ in calls if sum(c[0] is m for c in calls) == 1}
    units: list[tuple[str, tuple[nn.Module, ...]]] = []
    used: set[int] = set()
    for i, (m, _inp, out) in enumerate(calls):
        if id(m) in used or id(m) not in once:
            continue
        nxt = calls[i + 1] if i + 1 < len(calls) else None
        nxt2 = calls[i + 2] if i + 2 < len(calls) else None
        if (_is_eval_bn(m) and nxt and nxt2 and isinstance(nxt[0], nn.ReLU) and isinstance(nxt2[0], nn.Conv2d)
                and nxt[1] is out and nxt2[1] is nxt[2] and id(nxt[0]) in once and id(nxt2[0]) in once):
            units.append(("bn_relu_conv", (m, nxt[0], nxt2[0])))
            used |= {id(m), id(nxt[0]), id(nxt2[0])}
        elif isinstance(m, nn.Conv2d) and nxt and _is_eval_bn(nxt[0]) and nxt[1] is out and id(nxt[0]) in once:
            units.append(("conv_bn", (m, nxt[0])))
            used |= {id(m), id(nxt[0])}
    return units


def rewrite_for_gradient(net: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """A copy of ``net`` (eval mode, no in-place ReLUs) with the units of the module doc and the other batch norms
    as :class:`ChannelAffine`; or with only the batch norms swapped (:func:`plain_for_gradient`) when the units' forward
    differs from that in any bit on ``example`` (an architecture whose modules are not called as the hooks saw)."""
    from torchvision.models.densenet import _DenseBlock

    out = copy.deepcopy(net).eval()
    for module in out.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]
    for name, module in list(out.named_modules()):
        if isinstance(module, _DenseBlock):
            _set(out, module, IncrementalDenseBlock(module))
    for kind, mods in _units(_execution_order(out, example)):
        if kind == "conv_bn":
            conv, bn = mods
            _set(out, conv, ConvAffine(conv, bn))  # type: ignore[arg-type]
            _set(out, bn, nn.Identity())
        else:
            bn, relu, conv = mods
            _set(out, conv, AffineReluConv(bn, conv))  # type: ignore[arg-type]
            _set(out, bn, nn.Identity())
            _set(out, relu, nn.Identity())
    for module in list(out.modules()):
        for child_name, child in list(module.named_children()):
            if _is_eval_bn(child):
                setattr(module, child_name, ChannelAffine(child))  # type: ignore[arg-type]
    plain = plain_for_gradient(net)
    return out if _same_forward(plain, out, example) else plain


def _same_forward(a: nn.Module, b: nn.Module, example: tuple[torch.Tensor, ...]) -> bool:
    with torch.no_grad():
        ra, rb = a(*example), b(*example)
    ra, rb = (ra,) if isinstance(ra, torch.Tensor) else ra, (rb,) if isinstance(rb, torch.Tensor) else rb
    return all(torch.equal(x, y) for x, y in zip(ra, rb))


def plain_for_gradient(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with only the batch norms as :class:`ChannelAffine` (the rewrite that always holds)."""
    out = copy.deepcopy(net).eval()
    for module in out.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]
    for module in list(out.modules()):
        for child_name, child in list(module.named_children()):
            if _is_eval_bn(child):
                setattr(module, child_name, ChannelAffine(child))  # type: ignore[arg-type]
    return out
