"""The benchmarks' fp32 floor (issue 16): ``conv_gflop`` counts the convolutions of an exported graph from the
shapes of one real run, ``ort_matmul_gflops`` measures the CPU's ORT MatMul rate, and ``machine`` names the CPU
with its family, so that tables from two "AMD EPYC" VMs of different generations are told apart."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from _common import conv_gflop, machine, ort_matmul_gflops  # noqa: E402


class _Net(nn.Module):
    """A 7x7 stride-2 stem, a 3x3 conv after a padding whose shape ONNX's shape inference leaves open, and a
    stride-2 transposed convolution back up (as the saliency graphs have them)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 7, stride=2, padding=3, bias=False)
        self.conv = nn.Conv2d(8, 16, 3, bias=True)
        self.up = nn.ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        pad = int(y.shape[-1] > 0)  # data-dependent in the trace's eyes: a Pad whose amount is computed
        y = nn.functional.pad(y, (pad, pad, pad, pad))
        return self.up(torch.relu(self.conv(y)))


def test_conv_gflop_counts_conv_and_transposed_conv_from_the_run_shapes(tmp_path):
    path = tmp_path / "net.onnx"
    net = _Net().eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 64, 64),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    # by hand: stem 2 * (8*32*32) * (1*7*7); conv 2 * (16*32*32) * (8*3*3) on the padded 34 px;
    # transposed conv 2 * (16*32*32) input elements * (4*3*3)
    expected = 2 * (8 * 32 * 32 * 49 + 16 * 32 * 32 * 72 + 16 * 32 * 32 * 36)
    assert round(conv_gflop(path) * 1e9) == expected


def test_ort_matmul_rate_is_a_plausible_cpu_rate():
    rate = ort_matmul_gflops(1, n=256, runs=3)
    assert 1 < rate < 10_000  # GFLOP/s of one thread: far above a Python loop, far below any CPU's peak


def test_machine_names_the_cpu_family_where_cpuinfo_has_it():
    text = machine()
    assert text.endswith(" cores")
    info = Path("/proc/cpuinfo")
    if info.is_file() and "cpu family" in info.read_text():
        assert re.search(r"\(family \d+, model \d+\), \d+ cores$", text), text
