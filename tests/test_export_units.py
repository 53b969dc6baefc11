"""cxrbench.export.units: the classifier rewrites traced for the saliency graph keep the forward bit for bit and
give the same input gradient with a shorter backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxrbench.export.units import (
    AffineReluConv,
    ChannelAffine,
    ConvAffine,
    IncrementalDenseBlock,
    autograd_backward,
    conv_input_grad,
    plain_for_gradient,
    rewrite_for_gradient,
)
from cxrbench.models.classifier import build_classifier


def _seeded(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_classifier(arch, num_outputs=14, in_channels=1, pretrained=False).eval()
    for m in model.modules():  # batch-norm statistics as a trained model has them, not the 0 / 1 of a fresh one
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _input_gradient(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    image = x.clone().requires_grad_(True)
    logits = model(image)
    (grad,) = torch.autograd.grad(logits.sum(), image)
    return logits.detach(), grad


@pytest.mark.parametrize("arch, units", [("densenet121", {AffineReluConv: 119, ConvAffine: 1,
                                                          IncrementalDenseBlock: 4, "batch_norm_op": 61}),
                                         ("resnet18", {ConvAffine: 20})])
def test_rewrite_keeps_the_forward_and_the_gradient(arch, units):
    model = _seeded(arch)
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    rewritten = rewrite_for_gradient(model, (x[:1],))
    counts = {kind: sum(type(m) is kind for m in rewritten.modules()) for kind in units if kind != "batch_norm_op"}
    if "batch_norm_op" in units:  # the pre-activation BNs after a concatenation or a pooling, not after a conv
        counts["batch_norm_op"] = sum(isinstance(m, AffineReluConv) and m.affine is None for m in rewritten.modules())
    assert counts == units  # every conv -> BN and BN -> ReLU -> conv chain became one unit
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rewritten.modules())
    with autograd_backward():  # the same forward operations, the backward derived by autograd
        ref_logits, ref_grad = _input_gradient(rewritten, x)
    logits, grad = _input_gradient(rewritten, x)
    assert torch.equal(logits, ref_logits)  # the same forward: the same ReLU masks
    rel = float((grad - ref_grad).abs().max() / ref_grad.abs().max())
    assert rel < 1e-5, rel  # the same sums, rounded differently (the scale folded into the transposed conv)
    assert float(ref_grad.abs().max()) > 0
    plain_logits, _ = _input_gradient(plain_for_gradient(model), x)  # every BN in four operations: rounding only
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)


class _ConvOutputUsedTwice(nn.Module):
    """``bn(conv(x)) + conv(x)``: a conv -> BN chain whose conv output is also used elsewhere (a ConvAffine unit
    would change the forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4).eval()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean((2, 3)))


def test_a_rewrite_that_would_change_the_forward_is_not_used():
    model = _ConvOutputUsedTwice().eval()
    x = torch.rand(1, 1, 16, 16)
    rewritten = rewrite_for_gradient(model, (x,))
    assert not any(isinstance(m, ConvAffine) for m in rewritten.modules())
    assert sum(isinstance(m, ChannelAffine) for m in rewritten.modules()) == 1
    assert torch.equal(rewritten(x), plain_for_gradient(model)(x))
    assert isinstance(model.bn, nn.BatchNorm2d)  # the caller's model is left as it was


@pytest.mark.parametrize("stride, padding, groups, kernel", [(1, 1, 1, 3), (2, 1, 1, 3), (2, 3, 1, 7), (1, 0, 1, 1),
                                                             (2, 0, 1, 1), (1, 1, 4, 3)])
def test_conv_input_grad_is_torchs_convolution_backward(stride, padding, groups, kernel):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 8, 15, 15, generator=g, requires_grad=True)
    weight = torch.randn(12, 8 // groups, kernel, kernel, generator=g)
    out = nn.functional.conv2d(x, weight, None, stride, padding, 1, groups)
    grad_out = torch.randn(out.shape, generator=g)
    (ref,) = torch.autograd.grad(out, x, grad_out)
    got = conv_input_grad(grad_out, x.shape, weight, [stride] * 2, [padding] * 2, [1, 1], groups)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_the_exported_relu_mask_and_batch_norm_are_torchs(tmp_path):
    """``relu_mask`` and ``batch_norm_eval`` as exported (HardSigmoid, BatchNormalization) run in ONNX Runtime as
    in torch: the mask 0 / 1 on the edge values, the batch norm within float rounding."""
    import onnxruntime as ort

    from cxrbench.export.units import batch_norm_eval, onnx_symbolics, relu_mask

    bn = nn.BatchNorm2d(3).eval().requires_grad_(False)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([0.25, 4.0, 1.0]))

    class Both(nn.Module):
        def forward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return relu_mask(a), batch_norm_eval(a, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)

    a = torch.tensor([-1.0, -0.0, 0.0, 1e-30, 1.1754944e-38, 3e38, float("inf"), 0.7]).repeat(3, 1)[None, :, :, None]
    symbolics = onnx_symbolics()
    for name, fn in symbolics.items():
        torch.onnx.register_custom_op_symbolic(name, fn, 18)
    try:
        torch.onnx.export(Both(), (a,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=18)
    finally:
        for name in symbolics:
            torch.onnx.unregister_custom_op_symbolic(name, 18)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    mask, normed = session.run(None, {session.get_inputs()[0].name: a.numpy()})
    assert mask[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] == relu_mask(a)[0, 0, :, 0].tolist()
    finite = torch.isfinite(a) & (a.abs() < 1e30)
    torch.testing.assert_close(torch.from_numpy(normed)[finite], bn(a)[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 2, 0), (1, 2, 0)])
def test_max_pool_backward_is_torchs_first_maximum_rule(kernel, stride, padding):
    """The saliency graph's max-pool backward (the first maximum recomputed from the input) on ties (flat regions,
    as the black borders of radiographs have them) and odd sizes: PyTorch's gradient."""
    from cxrbench.export.gradient import _max_pool2d_backward

    g = torch.Generator().manual_seed(3)
    x = (torch.rand(2, 3, 13, 11, generator=g) * 4).floor().requires_grad_(True)  # values 0..3: many ties
    out = nn.functional.max_pool2d(x, kernel, stride, padding)
    grad_out = torch.randn(out.shape, generator=g)
    (ref,) = torch.autograd.grad(out, x, grad_out)
    got = _max_pool2d_backward(grad_out, x.detach(), [kernel], [stride], [padding], [1, 1], False, torch.empty(0))
    assert torch.equal(got, ref)  # the same positions, and the same sums in the same order


@pytest.mark.parametrize("kernel, stride, padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (1, 2, 0)])
def test_max_pool_backward_in_onnx_runtime_is_torchs_bit_for_bit(tmp_path, kernel, stride, padding):
    """The same backward exported (a one-hot grouped Conv, ArgMax, ScatterElements) and run by ONNX Runtime:
    PyTorch's gradient in every bit, ties included."""
    import onnx
    import onnxruntime as ort

    from cxrbench.export.gradient import _max_pool2d_backward

    class Backward(nn.Module):
        def forward(self, grad_out, x):
            return _max_pool2d_backward(grad_out, x, [kernel], [stride], [padding], [1, 1], False, torch.empty(0))

    g = torch.Generator().manual_seed(4)
    x = ((torch.rand(1, 4, 15, 12, generator=g) * 4).floor() - 2).requires_grad_(True)  # negatives: padding never wins
    out = nn.functional.max_pool2d(x, kernel, stride, padding)
    grad_out = torch.randn(out.shape, generator=g)
    (ref,) = torch.autograd.grad(out, x, grad_out)
    torch.onnx.export(Backward(), (grad_out, x.detach()), str(tmp_path / "m.onnx"), dynamo=False, opset_version=18,
                      input_names=["g", "x"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert {"Conv", "ArgMax", "ScatterElements"} <= ops
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"g": grad_out.numpy(), "x": x.detach().numpy()})
    assert np.array_equal(got, ref.numpy())
