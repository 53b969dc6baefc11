"""Helpers shared by the benchmark scripts: argument parsing, timing, writing the table."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default="build/benchmarks", help="folder for the table (CSV + Markdown)")
    p.add_argument("--repeat", type=int, default=3)
    return p.parse_args()


def timed(fn: Callable[[], object], repeat: int = 3) -> tuple[float, float]:
    """Median and min seconds of ``fn()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 1024 / 1024


def machine() -> str:
    """The CPU model, its x86 family and model numbers where ``/proc/cpuinfo`` has them, and the core count.
    Cloud VMs name different CPUs alike: a Zen 4 and a Zen 5 both read "AMD EPYC", and the Zen 5 runs these
    benchmarks about 2x faster, so only the family (25, 26) tells their tables apart."""
    model = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if not key and fields:
                break  # the first processor's block is enough
            fields.setdefault(key, value.strip())
    except OSError:
        pass
    model = fields.get("model name", model)
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{model}, {os.cpu_count()} cores"


def write_table(rows: list[dict], out: str, name: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / f"{name}.csv", index=False)
    header = f"<!-- {machine()}, python {platform.python_version()}, {time.strftime('%Y-%m-%d')} -->\n"
    (folder / f"{name}.md").write_text(header + markdown(df))
    print(df.to_string(index=False))
    print(f"wrote {folder / name}.csv and .md")
    return df


def markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (floats to 4 significant digits)."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def conv_gflop(path: str | os.PathLike, threads: int = 1) -> float:
    """GFLOP (multiply and add counted apart) of the ``Conv`` and ``ConvTranspose`` nodes of the ONNX graph at
    ``path`` for one image: their shapes are read from one run of the graph on zeros (batch 1; ones for inputs
    of one row, such as the saliency graph's finding weights), so shapes that ONNX's shape inference leaves
    open (pads, windows) count too. Conv: 2 x output elements x ``weight[1:]``; ConvTranspose: 2 x input
    elements x ``weight[1:]``."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    present = {o.name for o in model.graph.output}
    wanted = {n.input[0] for n in convs} | {n.output[0] for n in convs}
    wanted |= {n.input[1] for n in convs if n.input[1] not in weights}
    for name in sorted(wanted - present):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node's output
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {}
    for arg in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in arg.shape]
        feed[arg.name] = (np.ones if len(shape) == 2 else np.zeros)(shape, dtype=np.float32)
    names = [o.name for o in session.get_outputs()]
    shapes = {name: value.shape for name, value in zip(names, session.run(None, feed))}
    shapes.update(weights)
    total = 0
    for node in convs:
        kernel = int(np.prod(shapes[node.input[1]][1:]))
        elements = int(np.prod(shapes[node.output[0] if node.op_type == "Conv" else node.input[0]]))
        total += 2 * elements * kernel
    return total / 1e9


def ort_matmul_gflops(threads: int, n: int = 1024, runs: int = 20) -> float:
    """The best GFLOP/s of ONNX Runtime's float32 ``MatMul`` (``n`` x ``n`` by ``n`` x ``n``) on ``threads``
    intra-op threads over ``runs`` runs: what ORT's fp32 kernels reach on this CPU (its blocked convolutions can
    run a little above it, so a floor from this rate is an estimate, not a bound)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    arg = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", arg[:2], arg[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION, 9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.random((n, n), dtype=np.float32), "b": rng.random((n, n), dtype=np.float32)}
    session.run(None, feed)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
