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
* Two custom operators keep ONNX Runtime in its blocked (NCHWc) layout, where its convolutions run, instead of
  reordering to plain NCHW and back around every elementwise operator: :func:`relu_mask` (one HardSigmoid
  instead of Greater + Cast) and :func:`batch_norm_eval` for the batch norms that follow a concatenation or a
  pooling (one BatchNormalization; after a convolution ORT would fold it into the convolution's weights, which
  rounds the forward differently and moved a seeded ResNet18's maps by up to 18 % of their maximum, so there
  :func:`channel_affine`, a depthwise 1x1 Conv that ORT does not fold). DenseNet-121's graph as ORT runs it:
  2,699 -> 1,138 nodes, 479 -> 125 reorders.
* :class:`AffineReluConv` reads its backward's mask from the ReLU's output (``r > 0`` exactly where ``a > 0``), so
  the batch norm's output has the ReLU as its one reader and ORT fuses the ReLU into that depthwise Conv or
  BatchNormalization: DenseNet-121's graph 1,138 -> 1,019 nodes, the same maps in every bit, 90.8 -> 84.9 ms
  (minimum of 60 interleaved runs; 25th percentile 100.4 -> 97.2).

The forward is PyTorch's up to float rounding, and the ReLU masks, which decide the map, are the same as without
the units: :func:`rewrite_for_gradient` runs both forwards and uses the units only when they agree in every bit.
Measured (DenseNet-121, 224 px, 2 threads, ``saliency.onnx`` alone, interleaved): 8,968 -> 3,964 ONNX nodes,
export 49 -> 8-11 s, a run 98.5 -> 85.4 ms with relu_mask and batch_norm_eval (minimum of 30; the median
161 -> 138 ms at load 2.7), 89.4 -> 86.9 ms (median 104 -> 98 ms) with channel_affine. The maps of a trained
DenseNet-121 (NIH, 224 px) then differ from PyTorch's on 0.04 % of the pixels (before: none beyond 1e-4 of the
maximum), within the parity rule's 0.5 %; a seeded ResNet18's still agree to 9e-7.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RELU_MASK_ALPHA", "AffineReluConv", "ChannelAffine", "ConvAffine", "IncrementalDenseBlock",
           "autograd_backward", "batch_norm_eval", "channel_affine", "conv_input_grad", "onnx_symbolics",
           "plain_for_gradient", "relu_mask", "rewrite_for_gradient", "transposed_padding"]

_aten = torch.ops.aten
#: ``HardSigmoid(a) = max(0, min(1, alpha * a + beta))`` with this alpha and beta 0 is 1 for every ``a >= 2**-127``
#: (every normal float and the larger denormals; ``alpha * a`` may overflow to inf: min gives 1) and 0 for ``a <= 0``
RELU_MASK_ALPHA = 2.0 ** 127


@torch.library.custom_op("cxrbench::relu_mask", mutates_args=())
def relu_mask(a: torch.Tensor) -> torch.Tensor:
    """``float(a > 0)``: a ReLU's backward mask. In ONNX one ``HardSigmoid`` (alpha :data:`RELU_MASK_ALPHA`, beta 0)
    instead of ``Greater`` + ``Cast``: ONNX Runtime runs HardSigmoid and the Mul after it in its blocked (NCHWc)
    layout, next to the convolutions, so no reorders around them. The same 0/1 except for positive denormals
    below ``2**-127`` (there a fraction)."""
    return (a > 0).to(a.dtype)


@relu_mask.register_fake
def _(a: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(a)


@torch.library.custom_op("cxrbench::batch_norm_eval", mutates_args=())
def batch_norm_eval(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                    var: torch.Tensor, eps: float) -> torch.Tensor:
    """An eval-mode batch norm as PyTorch computes it; in ONNX one ``BatchNormalization``, which ONNX Runtime runs
    in its blocked layout (the four-operator form of :class:`ChannelAffine` runs in plain NCHW, with reorders to
    and from every convolution). Used where no convolution comes just before: there ONNX Runtime would fold it into
    the convolution's weights and round the forward differently."""
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


@batch_norm_eval.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
      eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("cxrbench::channel_affine", mutates_args=())
def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per channel (``scale`` (C, 1, 1, 1), ``shift`` (C,)): an eval-mode batch norm right
    after a convolution. In ONNX a depthwise 1x1 Conv: ONNX Runtime runs it in its blocked layout and does not fold
    it into the convolution before it (a Mul + Add or a BatchNormalization there would be folded, which rounds the
    forward differently: a seeded ResNet18's maps moved by up to 18 % of their maximum)."""
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


@channel_affine.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def onnx_symbolics() -> dict[str, Any]:
    """TorchScript-exporter symbolics of this module's custom operators (``name -> function``)."""
    from torch.onnx import symbolic_helper

    def mask(g: Any, a: Any) -> Any:
        return g.op("HardSigmoid", a, alpha_f=RELU_MASK_ALPHA, beta_f=0.0)

    def batch_norm(g: Any, x: Any, weight: Any, bias: Any, mean: Any, var: Any, eps: Any) -> Any:
        return g.op("BatchNormalization", x, weight, bias, mean, var,
                    epsilon_f=float(symbolic_helper._maybe_get_const(eps, "f")))

    def depthwise(g: Any, x: Any, scale: Any, shift: Any) -> Any:
        channels = symbolic_helper._get_tensor_sizes(scale)[0]
        return g.op("Conv", x, scale, shift, group_i=channels, kernel_shape_i=[1, 1])

    return {"cxrbench::relu_mask": mask, "cxrbench::batch_norm_eval": batch_norm,
            "cxrbench::channel_affine": depthwise}


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
    7e-7). ``scale`` (``weight * rsqrt(var + eps)``) is its input gradient.

    ``depthwise``: inside a unit (:class:`ConvAffine`, :class:`AffineReluConv` after a convolution) the map is
    :func:`channel_affine` instead, ``x * scale + shift`` with the shift rounded once from float64, which ONNX
    Runtime runs as a blocked depthwise convolution."""

    def __init__(self, bn: nn.BatchNorm2d, *, depthwise: bool = False) -> None:
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None  # eval statistics (checked by the caller)
        n, self.depthwise = bn.num_features, depthwise
        with torch.no_grad():
            invstd = torch.rsqrt(bn.running_var + bn.eps)
            weight = bn.weight if bn.weight is not None else torch.ones(n)
            bias = bn.bias if bn.bias is not None else torch.zeros(n)
            stats = {"mean": bn.running_mean, "invstd": invstd, "weight": weight, "bias": bias,
                     "scale": invstd * weight}
        for name, value in stats.items():
            self.register_buffer(name, value.detach().reshape(1, -1, 1, 1).clone())
        if depthwise:
            with torch.no_grad():  # the depthwise form's weights: (C, 1, 1, 1) and (C,), the shift rounded once
                shift = (bias.double() - bn.running_mean.double() * self.scale.reshape(-1).double()).float()
            self.register_buffer("dw_scale", self.scale.reshape(-1, 1, 1, 1).clone())
            self.register_buffer("dw_shift", shift.detach().clone())

    mean: torch.Tensor
    invstd: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor
    dw_scale: torch.Tensor
    dw_shift: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) * invstd * weight + bias`` per channel; ``depthwise``: :func:`channel_affine` (inside a
        unit, whose backward is hand-written; the same values in plain operations for autograd)."""
        if not self.depthwise:
            return (x - self.mean) * self.invstd * self.weight + self.bias
        if _HAND_WRITTEN[0]:
            return channel_affine(x, self.dw_scale, self.dw_shift)
        return x * self.dw_scale.reshape(1, -1, 1, 1) + self.dw_shift.reshape(1, -1, 1, 1)


_HAND_WRITTEN = [True]  # False inside autograd_backward() (tests: not thread-safe, and not meant to be)


@contextlib.contextmanager
def autograd_backward() -> Iterator[None]:
    """Run the units with their forward as plain operations, so that autograd derives the backward (the
    reference the hand-written backward is tested against)."""
    _HAND_WRITTEN[0] = False
    try:
        yield
    finally:
        _HAND_WRITTEN[0] = True


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
        a = (batch_norm_eval(x, unit.bn_weight, unit.bn_bias, unit.bn_mean, unit.bn_var, unit.eps)
             if unit.affine is None else unit.affine(x))
        r = torch.relu(a)  # the mask is read from the ReLU's output (r > 0 exactly where a > 0), so that the
        ctx.unit, ctx.in_shape = unit, x.shape  # batch norm's output has one reader and ORT fuses the ReLU into it
        ctx.save_for_backward(r)
        return _conv(unit.conv, r)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        unit, (r,) = ctx.unit, ctx.saved_tensors  # scale * mask * conv^T(g) = mask * conv^T with W's inputs scaled
        weight = unit.conv.weight * unit.scale.reshape(1, -1, 1, 1)
        return _grad_through(unit.conv, g, ctx.in_shape, weight) * relu_mask(r), None


class ConvAffine(nn.Module):
    """``affine(conv(x))``: a convolution and the eval-mode batch norm after it, with the folded backward."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.affine = conv, ChannelAffine(bn, depthwise=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``affine(conv(x))``; its backward is one transposed convolution."""
        if not _HAND_WRITTEN[0]:
            return self.affine(_conv(self.conv, x))
        return _ConvAffineFunction.apply(x, self)


class AffineReluConv(nn.Module):
    """``conv(relu(bn(x)))``: an eval-mode batch norm, its ReLU and the convolution, with the folded backward.

    ``batch_norm_op``: the batch norm as :func:`batch_norm_eval` (one ONNX BatchNormalization, run in ONNX
    Runtime's blocked layout); False (a batch norm right after a convolution, which ONNX Runtime would fold into
    that convolution's weights): as :class:`ChannelAffine`."""

    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    bn_mean: torch.Tensor
    bn_var: torch.Tensor
    scale: torch.Tensor

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d, *, batch_norm_op: bool = True) -> None:
        super().__init__()
        self.conv, self.eps = conv, float(bn.eps)
        self.affine = None if batch_norm_op else ChannelAffine(bn, depthwise=True)
        assert bn.running_mean is not None and bn.running_var is not None and bn.weight is not None
        assert bn.bias is not None  # an eval-mode BN with its affine (checked by the caller)
        with torch.no_grad():  # scale: the batch norm's input gradient, weight / sqrt(var + eps) per channel
            stats = {"scale": bn.weight * torch.rsqrt(bn.running_var + bn.eps)}
            if batch_norm_op:  # the statistics batch_norm_eval reads (else the ChannelAffine holds its own)
                stats |= {"bn_weight": bn.weight, "bn_bias": bn.bias, "bn_mean": bn.running_mean,
                          "bn_var": bn.running_var}
        for name, value in stats.items():
            self.register_buffer(name, value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``conv(relu(bn(x)))``; its backward is one transposed convolution and the ReLU mask."""
        if not _HAND_WRITTEN[0]:
            a = (F.batch_norm(x, self.bn_mean, self.bn_var, self.bn_weight, self.bn_bias, False, 0.0, self.eps)
                 if self.affine is None else self.affine(x))
            return _conv(self.conv, torch.relu(a))
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
    conv_outputs = {id(out) for m, _inp, out in calls if isinstance(m, nn.Conv2d)}
    units: list[tuple[str, tuple[nn.Module, ...]]] = []
    used: set[int] = set()
    for i, (m, _inp, out) in enumerate(calls):
        if id(m) in used or id(m) not in once:
            continue
        nxt = calls[i + 1] if i + 1 < len(calls) else None
        nxt2 = calls[i + 2] if i + 2 < len(calls) else None
        if (_is_eval_bn(m) and m.weight is not None and m.bias is not None
                and nxt and nxt2 and isinstance(nxt[0], nn.ReLU) and isinstance(nxt2[0], nn.Conv2d)
                and nxt[1] is out and nxt2[1] is nxt[2] and id(nxt[0]) in once and id(nxt2[0]) in once):
            # after a convolution the four-operator form (ONNX Runtime would fold a BatchNormalization into it)
            kind = "affine_relu_conv" if id(_inp) in conv_outputs else "bn_relu_conv"
            units.append((kind, (m, nxt[0], nxt2[0])))
            used |= {id(m), id(nxt[0]), id(nxt2[0])}
        elif isinstance(m, nn.Conv2d) and nxt and _is_eval_bn(nxt[0]) and nxt[1] is out and id(nxt[0]) in once:
            units.append(("conv_bn", (m, nxt[0])))
            used |= {id(m), id(nxt[0])}
    return units


def rewrite_for_gradient(net: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """A copy of ``net`` (eval mode, no in-place ReLUs) with the units of the module doc and the other batch norms
    as :class:`ChannelAffine`; or :func:`plain_for_gradient`'s copy when the units' forward differs in any bit on
    ``example`` from the same copy without units (an architecture whose modules are not called as the hooks saw).
    """
    out = _prepared_copy(net)
    units = _units(_execution_order(out, example))
    names = {id(m): name for name, m in out.named_modules()}
    forms = {names[id(mods[1] if kind == "conv_bn" else mods[0])]: kind for kind, mods in units}
    for kind, mods in units:
        if kind == "conv_bn":
            conv, bn = mods
            _set(out, conv, ConvAffine(conv, bn))  # type: ignore[arg-type]
            _set(out, bn, nn.Identity())
        else:
            bn, relu, conv = mods
            _set(out, conv, AffineReluConv(bn, conv, batch_norm_op=kind == "bn_relu_conv"))  # type: ignore[arg-type]
            _set(out, bn, nn.Identity())
            _set(out, relu, nn.Identity())
    _swap_batch_norms(out)
    reference = _prepared_copy(net)  # the same forward operations, without the units' backward
    _swap_batch_norms(reference, forms)
    return out if _same_forward(reference, out, example) else plain_for_gradient(net)


def _without_inplace(net: nn.Module) -> nn.Module:
    out = copy.deepcopy(net).eval()
    for module in out.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]
    return out


def _prepared_copy(net: nn.Module) -> nn.Module:
    """An eval-mode copy without in-place activations and with DenseNet blocks as :class:`IncrementalDenseBlock`."""
    from torchvision.models.densenet import _DenseBlock

    out = _without_inplace(net)
    for module in list(out.modules()):
        if isinstance(module, _DenseBlock):
            _set(out, module, IncrementalDenseBlock(module))
    return out


def _swap_batch_norms(net: nn.Module, forms: Mapping[str, str] | None = None) -> None:
    """Every eval-mode batch norm becomes a :class:`ChannelAffine`, in place; ``forms`` (name -> unit kind of
    :func:`_units`): those of a ``bn_relu_conv`` unit stay PyTorch's (:func:`batch_norm_eval` computes the same),
    the others of a unit become the depthwise form."""
    forms = forms or {}
    for name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            kind = forms.get(f"{name}.{child_name}".lstrip("."))
            if _is_eval_bn(child) and kind != "bn_relu_conv":
                setattr(module, child_name, ChannelAffine(child, depthwise=kind is not None))


def _same_forward(a: nn.Module, b: nn.Module, example: tuple[torch.Tensor, ...]) -> bool:
    with torch.no_grad():
        ra, rb = a(*example), b(*example)
    ra, rb = (ra,) if isinstance(ra, torch.Tensor) else ra, (rb,) if isinstance(rb, torch.Tensor) else rb
    return all(torch.equal(x, y) for x, y in zip(ra, rb))


def plain_for_gradient(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with only the batch norms as :class:`ChannelAffine` (the rewrite that always holds)."""
    out = _without_inplace(net)
    _swap_batch_norms(out)
    return out
