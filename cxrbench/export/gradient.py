"""The input-gradient (Chester saliency) graph as ONNX: forward and backward w.r.t. the input in one graph.

ONNX has no backward operators, and neither exporter can trace autograd directly with the pinned torch
2.14.1: ``torch.onnx.export(..., dynamo=True)`` of a module that calls ``torch.func.vjp`` fails in
``torch.export`` ("attempted to apply meta conversion to view functorch tensor"), and the legacy exporter
never sees the backward. What works:

1. :func:`torch.fx.experimental.proxy_tensor.make_fx` traces the whole function -- forward, then
   ``torch.autograd.grad`` -- into a graph of plain ATen operators, with a decomposition table that turns
   every backward operator into forward ones: ``convolution_backward`` (input gradient only) into a
   convolution with the kernel flipped and its channel axes swapped where the stride is 1 (the same sums; ONNX
   Runtime's Conv is faster than its ConvTranspose: ResNet18 224 px 136 vs 172 ms a run), else a transposed
   convolution, ``avg_pool2d_backward`` into a depthwise transposed convolution with a
   ``1 / (kh kw)`` kernel (neither has a decomposition in torch, and the ONNX exporter has no translation:
   "No ONNX function found for <OpOverload(op='aten.convolution_backward', overload='default')>", the same for
   ``aten.avg_pool2d_backward``), torch's own decomposition for ``native_batch_norm_backward`` (BN in eval: a
   per-channel scale), ``threshold_backward`` (the ReLU mask) as
   ``grad * float(y > 0)`` (:func:`_threshold_backward`); ``max_pool2d_with_indices_backward``
   recomputes PyTorch's first-maximum rule from the input (:func:`_max_pool2d_backward`: ties are common in
   radiographs and ONNX does not fix which tied position MaxPool's indices name). The classifier is traced as
   rewritten by :func:`cxrbench.export.units.rewrite_for_gradient`: eval-mode batch norms as the per-channel
   affine map they compute (their traced backward was ~25 operators a layer, two thirds of DenseNet-121's
   graph), conv -> BN and BN -> ReLU -> conv chains as units whose backward folds the BN scale into the
   transposed convolution, DenseNet blocks grown one concatenation at a time, and the ReLU masks and batch
   norms as operators ONNX Runtime runs in its blocked layout (see that module for the forward it keeps and the
   numbers: DenseNet-121's graph 8,968 -> 3,108 ONNX nodes, export 49 -> 8-11 s);
2. the TorchScript-based ONNX exporter converts that graph of plain ATen operators: Conv, ConvTranspose, Where,
   ... (the dynamo exporter gives the same graph, but re-traces and re-decomposes it first and then runs
   onnxscript's optimizer: for DenseNet-121 at 224 px 222 s + 214 s against 23 s for this one, make_fx 39 s ->
   27 s, on a loaded 2-core CPU, with the same ONNX Runtime speed and maps).

The graph (``saliency.onnx``) has a fixed batch of 1 (the trace bakes shapes in; the browser analyses one
image at a time):

    x   (1, C, S, S) float32 model input
    w   (1, F) float32 weights of the logits: all ones = Chester's summed saliency of every finding,
        one-hot = the saliency of one finding (any weights: the gradient of ``sum_i w_i logit_i``)
    ->  logits, probabilities, calibrated (as the classifier graph), saliency (1, 1, S, S) =
        ``max(0, sum_c d(sum_i w_i logit_i) / dx_c)``, exactly :class:`cxrbench.explain.ChesterSaliency`'s raw map.

Parity. The input gradient is a discontinuous function of the input: where a ReLU's input is within float32
rounding of 0, or a max-pool window's two largest values are within rounding of each other, a kernel that
rounds differently (MLAS in ONNX Runtime, its WebAssembly build, oneDNN in PyTorch) routes that unit's gradient
differently, and the map changes in that unit's receptive field (a 7x7 patch for a stem unit: up to 3.5 % and
20 % of the map's maximum on two NIH images, ResNet18, onnxruntime-web vs ONNX Runtime; elsewhere the maps agree
to ~1e-7). Exact ties (flat regions) are broken as PyTorch does (the first maximum); near-ties cannot be. So the
check is on every pixel, with the share allowed outside ``tolerance`` (relative to the map's maximum) capped at
:data:`MAP_OUTSIDE_SHARE`; ``max_abs_diff`` reports the worst pixel as it is.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cxrbench.export.units import conv_input_grad, onnx_symbolics, relu_mask, rewrite_for_gradient, transposed_padding

__all__ = ["MAP_OUTSIDE_SHARE", "SALIENCY_OUTPUTS", "gradient_program", "saliency_parity", "saliency_reference",
           "write_saliency_onnx"]

SALIENCY_OUTPUTS = ("logits", "probabilities", "calibrated", "saliency")
#: the largest share of a map's pixels that may differ from PyTorch's by more than the tolerance (relative to its max)
MAP_OUTSIDE_SHARE = 0.005
_aten = torch.ops.aten


def _convolution_backward(grad_out: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                          stride: Any, padding: Any, dilation: Any, transposed: bool, output_padding: Any,
                          groups: int, output_mask: Any) -> tuple[Any, None, None]:
    """The input gradient of a 2-D convolution as a transposed convolution (no weight or bias gradients)."""
    if transposed or output_mask[1] or output_mask[2] or weight.ndim != 4:
        raise NotImplementedError("only the input gradient of a plain 2-D convolution is decomposed "
                                  f"(transposed={transposed}, output_mask={list(output_mask)})")
    return conv_input_grad(grad_out, inp.shape, weight, stride, padding, dilation, groups), None, None


def _avg_pool2d_backward(grad_out: torch.Tensor, inp: torch.Tensor, kernel: Any, stride: Any, padding: Any,
                         ceil_mode: bool, count_include_pad: bool, divisor: Any) -> torch.Tensor:
    """Average-pool backward as a depthwise transposed convolution with a constant ``1 / (kh kw)`` kernel."""
    kernel = list(kernel) * (2 if len(kernel) == 1 else 1)
    stride = list(stride or kernel) * (2 if len(stride or kernel) == 1 else 1)
    padding = list(padding) * (2 if len(padding) == 1 else 1)
    if ceil_mode or divisor is not None or (any(padding) and not count_include_pad):
        raise NotImplementedError(f"avg_pool2d backward with ceil_mode={ceil_mode}, divisor={divisor}, "
                                  f"count_include_pad={count_include_pad} and padding {padding} is not decomposed")
    channels = inp.shape[1]
    weight = torch.full((channels, 1, kernel[0], kernel[1]), 1.0 / (kernel[0] * kernel[1]), dtype=grad_out.dtype)
    extra = transposed_padding(inp.shape[2:], grad_out.shape[2:], kernel, stride, padding, [1, 1])
    return _aten.convolution.default(grad_out, weight, None, stride, padding, [1, 1], True, extra, channels)


def _max_pool2d_backward(grad_out: torch.Tensor, inp: torch.Tensor, kernel: Any, stride: Any, padding: Any,
                         dilation: Any, ceil_mode: bool, indices: torch.Tensor) -> torch.Tensor:
    """Max-pool backward with PyTorch's rule, the *first* maximum of each window in row-major order, recomputed
    from the input instead of read from ``indices``, and PyTorch's sums: bit for bit its gradient.

    ONNX MaxPool's arg-max indices are not specified for ties, and radiographs have them (flat black borders
    give equal values in a window): onnxruntime-web's kernel picked other positions than PyTorch's, which moved
    the saliency map by up to 3.5 % of its maximum. Here a grouped convolution with one-hot kernels lays out every
    window's values (exact: one product by 1, the others by 0; the input padded with float32's lowest value, as
    max pooling pads with -inf), ONNX's ArgMax, specified to name the first maximum, gives each window's
    position, and one ``ScatterElements`` (reduction add, in the order of the windows, as PyTorch adds) sends the
    gradient there. Measured alone (ONNX Runtime, 2 threads, (1, 64, 112, 112) -> 56 px, the stem of ResNet18
    and DenseNet-121, 300 interleaved runs): 3.5 / 4.8 ms (min / median) against 4.9 / 6.1 with SpaceToDepth windows
    and a Gather of the offsets, and 6.5 / 9.1 for the comparisons, masks and one-hot transposed convolution
    used before. Inputs with an infinity in a window are not PyTorch's (0 * inf): a network gives none.
    """
    kh, kw = (list(kernel) * 2)[:2] if len(kernel) == 1 else list(kernel)
    sh, sw = (list(stride or kernel) * 2)[:2] if len(stride or kernel) == 1 else list(stride or kernel)
    ph, pw = (list(padding) * 2)[:2] if len(padding) == 1 else list(padding)
    if ceil_mode or any(d != 1 for d in dilation):
        raise NotImplementedError(f"max_pool2d backward with ceil_mode={ceil_mode}, dilation={list(dilation)}")
    n, c, h, w = inp.shape
    oh, ow = grad_out.shape[2:]
    padded = torch.nn.functional.pad(inp, [pw, pw, ph, ph], value=float(torch.finfo(inp.dtype).min))
    one_hot = torch.eye(kh * kw, dtype=inp.dtype).reshape(kh * kw, 1, kh, kw).repeat(c, 1, 1, 1)
    windows = _aten.convolution.default(padded, one_hot, None, [sh, sw], [0, 0], [1, 1], False, [0, 0], c)
    first = torch.argmax(windows.reshape(n, c, kh * kw, oh, ow), 2)  # k = i * kw + j of the first maximum
    row = torch.div(first, kw, rounding_mode="trunc")
    offset = row * (w - kw) + first - (ph * w + pw)  # (i - ph) * w + (j - pw) with j = k - i * kw
    base = (torch.arange(n * c, dtype=torch.int64).reshape(n, c, 1, 1) * (h * w)
            + (torch.arange(oh, dtype=torch.int64) * (sh * w)).reshape(1, 1, oh, 1)
            + (torch.arange(ow, dtype=torch.int64) * sw).reshape(1, 1, 1, ow))
    grad = torch.zeros(n * c * h * w, dtype=grad_out.dtype).scatter_add(0, (base + offset).reshape(-1),
                                                                         grad_out.reshape(-1))
    return grad.reshape(n, c, h, w)


def _threshold_backward(grad_out: torch.Tensor, inp: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU backward as ``grad * float(inp > threshold)``: the same values as torch's ``where(inp <= threshold,
    0, grad)`` for finite gradients, but ONNX Runtime's Where (with a broadcast 0) is ~7x slower than
    Greater + Cast + Mul (one (1, 128, 56, 56) map, 2 threads: 2.2 vs 0.30 ms; DenseNet-121 has 121 of them).
    The mask is :func:`cxrbench.export.units.relu_mask` (one HardSigmoid in ONNX) for the ReLU's threshold 0, else
    ``aten::_to_copy`` of the comparison, exported by :func:`_to_copy_symbolic`."""
    if threshold == 0:
        return grad_out * relu_mask(inp)
    return grad_out * (inp > threshold).to(grad_out.dtype)


def _to_copy_symbolic(g: Any, self: Any, dtype: Any, *_: Any) -> Any:
    """TorchScript exporter symbolic for ``aten::_to_copy`` to float32 (the ReLU masks of
    :func:`_threshold_backward`); the exporter has none of its own."""
    from torch.onnx import symbolic_helper

    scalar_type = symbolic_helper._maybe_get_const(dtype, "i")
    if scalar_type != 6:  # torch.float32 (c10::ScalarType::Float)
        raise NotImplementedError(f"aten::_to_copy to scalar type {scalar_type} in the saliency graph: "
                                  "only casts to float32 are exported")
    return g.op("Cast", self, to_i=1)  # onnx.TensorProto.FLOAT


def _decompositions() -> dict[Any, Callable[..., Any]]:
    from torch._decomp import get_decompositions

    table = get_decompositions([_aten.native_batch_norm_backward,
                                _aten._native_batch_norm_legit_no_training, _aten.native_batch_norm])
    table[_aten.threshold_backward.default] = _threshold_backward
    table[_aten.convolution_backward.default] = _convolution_backward
    table[_aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    table[_aten.max_pool2d_with_indices_backward.default] = _max_pool2d_backward
    return table


class _SaliencyFunction(nn.Module):
    """``(x, w) -> logits, probabilities, calibrated, saliency`` of a classifier graph module (eager, for tracing)."""

    def __init__(self, calibrated_classifier: nn.Module) -> None:
        super().__init__()
        self.net = calibrated_classifier

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward, then the input gradient of ``sum(w * logits)``, summed over channels and rectified."""
        image = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits, p, calibrated = self.net(image)
            (gradient,) = torch.autograd.grad((logits * w).sum(), image)
        return logits.detach(), p.detach(), calibrated.detach(), gradient.sum(1, keepdim=True).clamp_min(0.0)


def gradient_program(calibrated_classifier: nn.Module, channels: int, size: int, n_outputs: int) -> nn.Module:
    """The traced forward + input-gradient graph (an ``fx.GraphModule`` of forward ATen operators only).

    ``calibrated_classifier``: :class:`cxrbench.export.onnx.CalibratedClassifier` (``cam=False``), traced as the
    copy :func:`cxrbench.export.units.rewrite_for_gradient` makes (in-place ReLUs off, batch norms as per-channel
    affine maps, the units with folded backward). Inputs as in the module doc.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from cxrbench.explain.base import prepared_model

    probe = (torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0)),)
    net = rewrite_for_gradient(calibrated_classifier.eval(), probe)  # a copy: the caller's model is left as it is
    for p in net.parameters():
        p.requires_grad_(False)  # only the input gradient: no weight gradients in the graph
    with prepared_model(net):
        example = (torch.zeros(1, channels, size, size), torch.ones(1, n_outputs))
        program = make_fx(_SaliencyFunction(net), decomposition_table=_decompositions())(*example)
    bad = sorted({str(n.target) for n in program.graph.nodes
                  if n.op == "call_function" and "backward" in str(n.target)})
    if bad:
        raise NotImplementedError(f"backward operators left in the saliency graph: {bad}")
    return program


def saliency_reference(model: nn.Module, x: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    """PyTorch's saliency for the weighted logits: ``(B, 1, S, S)``.

    All-ones weights give :class:`cxrbench.explain.ChesterSaliency` (summed over every output) and a one-hot
    row its per-finding map; other weights are the same gradient of ``sum_i w_i logit_i``.
    """
    from cxrbench.explain import get_explainer

    w = np.asarray(weights, dtype=np.float32)
    out = np.empty((x.shape[0], 1, *x.shape[-2:]), np.float32)
    for b in range(x.shape[0]):
        chosen = np.flatnonzero(w[b])
        if np.all(w[b][chosen] == 1.0):  # the explainer itself
            out[b] = get_explainer("saliency", model)(x[b:b + 1], targets=[chosen.tolist()])[0]
        else:
            image = x[b:b + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad((model(image) * torch.from_numpy(w[b:b + 1])).sum(), image)
            out[b] = g.sum(1).clamp_min(0.0).detach().numpy()
    return out


def write_saliency_onnx(program: nn.Module, channels: int, size: int, n_outputs: int, path: Path, *,
                        opset: int) -> None:
    """Write the traced program (:func:`gradient_program`) to ``path`` (opset >= 18).

    The TorchScript-based exporter (``dynamo=False``) converts the graph of plain ATen operators directly; the
    dynamo exporter re-traces and re-decomposes it first (DenseNet-121: ~220 s and another ~210 s in
    onnxscript's optimizer on a loaded 2-core CPU, against seconds), for the same operators and the same maps.
    No constant folding: the flipped kernels of :func:`_convolution_backward` stay ``Transpose``/``Slice`` of the
    forward's weights (ONNX Runtime folds them when it loads the graph), so the file holds each weight once.
    """
    example = (torch.zeros(1, channels, size, size), torch.ones(1, n_outputs))
    opset = max(18, opset)
    symbolics = {"aten::_to_copy": _to_copy_symbolic, **onnx_symbolics()}
    for name, fn in symbolics.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(program.train(False), example, str(path), dynamo=False, opset_version=opset,
                              input_names=["x", "w"], output_names=list(SALIENCY_OUTPUTS), do_constant_folding=False)
        finally:
            for name in symbolics:
                torch.onnx.unregister_custom_op_symbolic(name, opset)


def saliency_parity(session: Any, model: nn.Module, x: torch.Tensor, *, tolerance: float) -> list[dict[str, Any]]:
    """ONNX Runtime's saliency maps (``session`` of ``saliency.onnx``) vs PyTorch's, summed and for one finding
    per image, one image at a time.

    Rows ``logits`` (absolute difference, as the other graphs), ``saliency_all`` (every finding summed) and
    ``saliency_finding`` (image b explains finding ``b mod F``). For the maps ``max_abs_diff`` and
    ``mean_abs_diff`` are relative to the largest reference value; a map passes when at most
    :data:`MAP_OUTSIDE_SHARE` of its pixels differ by more than ``tolerance`` of that maximum (see the module doc:
    the gradient is discontinuous where a ReLU input or a max-pool's two largest values are within float32
    rounding, and another kernel's rounding sends one unit's gradient elsewhere), ``outside_tolerance`` that share.
    """
    n_out = session.get_inputs()[1].shape[1]
    with torch.no_grad():
        ref_logits = model(x).numpy()
    rows = []
    for kind in ("all", "finding"):
        weights = np.ones((x.shape[0], n_out), np.float32)
        if kind == "finding":
            weights = np.eye(n_out, dtype=np.float32)[np.arange(x.shape[0]) % n_out]
        ref = saliency_reference(model, x, weights)
        runs = [session.run(["logits", "saliency"], {"x": x[b:b + 1].numpy(), "w": weights[b:b + 1]})
                for b in range(x.shape[0])]
        got = np.concatenate([r[1] for r in runs])
        scale = float(np.abs(ref).max()) or 1.0
        diff = np.abs(ref.astype(np.float64) - got) / scale if got.shape == ref.shape else np.array([np.inf])
        outside = float(np.mean(diff > tolerance))
        rows.append({"graph": "saliency", "output": f"saliency_{kind}", "n_images": int(x.shape[0]),
                     "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "tolerance": tolerance,
                     "outside_tolerance": outside,
                     "passed": bool(np.isfinite(got).all() and outside <= MAP_OUTSIDE_SHARE)})
    logit_diff = np.abs(np.concatenate([r[0] for r in runs]).astype(np.float64) - ref_logits)
    rows.insert(0, {"graph": "saliency", "output": "logits", "n_images": int(x.shape[0]),
                    "max_abs_diff": float(logit_diff.max()), "mean_abs_diff": float(logit_diff.mean()),
                    "tolerance": tolerance, "outside_tolerance": float(np.mean(logit_diff > tolerance)),
                    "passed": bool(logit_diff.max() <= tolerance)})
    return rows
