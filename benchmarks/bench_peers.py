"""cxrbench next to its peers, measured side by side in one process (interleaved rounds, medians, ratios).

* **Full report**, DenseNet-121 and ResNet18 at 224 px: cxrbench's ``Pipeline.analyze`` (read the PNG bytes,
  OOD gate, 14 calibrated probabilities, Chester saliency) on PyTorch (one pass) and on the auto backend (ONNX
  Runtime: ``saliency.onnx``, forward + input gradient in one graph; its first-use export is timed too) vs a
  torchxrayvision-style chain (``skimage`` read,
  ``xrv.datasets.normalize``, ``XRayCenterCrop``, ``XRayResizer``, forward, ``autograd.grad`` of the summed
  outputs): torchxrayvision's own ``DenseNet(weights=None)``, and for ResNet18 the same chain on the same network.
  A last row gives the fp32 floor of the ORT report: the saliency graph's convolution FLOPs at ORT's best
  ``MatMul`` rate on this CPU, and that floor as a fraction of the chain.
* **Grad-CAM**, DenseNet-121, 1 and 3 targets: cxrbench's ``GradCAM`` vs pytorch-grad-cam and captum's
  ``LayerGradCam`` (upsampled).
* **Forward**, DenseNet-121 at batch 1 and 16: PyTorch eager vs ONNX Runtime on cxrbench's export.
* **Training step**, DenseNet-121 and ResNet18 at 128 px, batch 16, Adam: fp32 vs channels_last vs bf16 autocast
  vs both (what ``--precision auto`` picks on a CPU with avx512_bf16 or AMX).
* **3000 px DICOM**, DenseNet-121: cxrbench's whole report of a 12-bit windowed DICOM (a real radiograph upscaled),
  and its stages (read, gate, classify, explain).

Every contender of a comparison runs once per round, the rounds interleaved, so a machine whose load changes
affects all of them alike, each after 20 ms of quiet (:data:`SETTLE_S`: the threads of the one before stop
spinning); the table gives the median seconds, the ratio to cxrbench (peer / cxrbench: > 1 means
cxrbench is faster) and, in its header, the CPU, its bf16 flags, the threads and the load average before and
after. Weights are random everywhere (``weights=None``): speed does not depend on them.

Needs the ``bench`` extra: ``pip install --no-deps torchxrayvision grad-cam ttach opencv-python-headless``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")  # many models in one process (see NOTES)
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # dicom_factory: the tests' DICOM writer
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import conv_gflop, machine, markdown, ort_matmul_gflops  # noqa: E402

Contenders = dict[str, Callable[[], object]]
JOBS = ("report", "dicom", "gradcam", "forward", "train")


#: seconds of quiet before each timed call: PyTorch's OpenMP threads (libgomp) spin for a few ms after each parallel
#: region, so whatever runs right after a PyTorch contender shares the 2 cores with them. Measured (ResNet18 report on
#: ONNX Runtime alternating with the torchxrayvision chain, 2-core Zen 5 EPYC, 31 rounds): 28.6 ms right after the
#: chain, 27.2 after 3 ms of quiet, 26.5 after 5 ms, 26.1 after 20 ms (24.1 with no chain in the process); the chain
#: 36.1 ms without pauses, 37.0-39.1 with them (its cores idle for a moment too). Ratio 0.79 -> 0.68.
SETTLE_S = 0.02


def interleaved(contenders: Contenders, rounds: int) -> dict[str, float]:
    """Median seconds of each contender over ``rounds`` rounds, one call of each per round (after a warm-up), each
    call after :data:`SETTLE_S` of quiet (not timed), so that no contender is timed with the one before still
    spinning."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def rows_of(task: str, medians: dict[str, float], reference: str) -> list[dict]:
    base = medians[reference]
    return [{"task": task, "contender": name, "median_ms": round(1e3 * s, 1),
             "ratio_to_cxrbench": round(s / base, 2)} for name, s in medians.items()]


def sample_png() -> bytes:
    """A real NIH PNG from ../shared/data when there is one, else a synthetic phantom (1024 px)."""
    from cxrbench.data import load_manifest, shared_data_root

    root = shared_data_root()
    if root is not None and (root / "cxr" / "nih").is_dir():
        return Path(load_manifest(root / "cxr" / "nih")["path"].iloc[0]).read_bytes()
    from PIL import Image

    from cxrbench.data.synthetic import make_phantom

    buf = io.BytesIO()
    Image.fromarray(np.round(make_phantom(1024, seed=0).image * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def xrv_chain(model: torch.nn.Module, blob: bytes) -> Callable[[], object]:
    """torchxrayvision's README recipe, plus the input gradient of the summed outputs (its saliency)."""
    import skimage.io
    import torchxrayvision as xrv

    transform = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)

    def run():
        img = skimage.io.imread(io.BytesIO(blob))
        img = xrv.datasets.normalize(img, 255)
        img = img.mean(2) if img.ndim == 3 else img
        img = transform[1](transform[0](img[None, ...]))
        x = torch.from_numpy(img)[None].float().requires_grad_(True)
        out = model(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        return torch.sigmoid(out).detach(), grad.clamp_min(0)

    return run


def bench_dicom(tmp: Path, blob: bytes, rounds: int) -> list[dict]:
    """The whole report of a 3000 px 12-bit DICOM (the PNG upscaled), median total and stages, DenseNet-121."""
    from dicom_factory import make_dicom
    from PIL import Image

    from cxrbench.inference.pipeline import Pipeline
    from cxrbench.models.bundle import load_bundle, untrained_classifier_bundle
    from cxrbench.ood.untrained import untrained_ood_bundle

    grey = Image.open(io.BytesIO(blob)).convert("L").resize((3000, 3000), Image.Resampling.BICUBIC)
    dicom = make_dicom(np.round(np.asarray(grey, dtype=np.float64) / 255 * 4095).astype(np.uint16),
                       bits_stored=12, window=(2048, 4096))
    pipe = Pipeline(load_bundle(untrained_classifier_bundle(tmp / "dicom", arch="densenet121")),
                    load_bundle(untrained_ood_bundle(tmp / "ood", description="benchmark: never rejects")))
    pipe.analyze(dicom, name="x.dcm", explain="saliency")
    timings = [pipe.analyze(dicom, name="x.dcm", explain="saliency").timings for _ in range(rounds)]
    stages = {k: round(1e3 * statistics.median(t[k] for t in timings), 1) for k in timings[0] if k != "total"}
    total = statistics.median(t["total"] for t in timings)
    return [{"task": f"full report, 3000 px 12-bit DICOM ({len(dicom) / 1e6:.0f} MB), densenet121 224 px",
             "contender": "cxrbench (" + ", ".join(f"{k} {v}" for k, v in stages.items()) + " ms)",
             "median_ms": round(1e3 * total, 1), "ratio_to_cxrbench": 1.0}]


def bench_reports(tmp: Path, blob: bytes, rounds: int, threads: int, quick: bool = False) -> list[dict]:
    """The report on PyTorch (one pass), on the auto backend (ONNX Runtime's ``saliency.onnx``, exported into a
    fresh cache first: that export's seconds are a row too) and the torchxrayvision chain, interleaved."""
    import torchxrayvision as xrv

    from cxrbench.export.onnx import ParityError, export_models
    from cxrbench.export.runtime import BackendFallbackWarning, backend_note, load_pipeline, pipeline_from_export
    from cxrbench.inference.pipeline import Pipeline
    from cxrbench.models.bundle import load_bundle, untrained_classifier_bundle
    from cxrbench.ood.untrained import untrained_ood_bundle

    ood = untrained_ood_bundle(tmp / "ood", description="benchmark: never rejects")
    os.environ["CXRBENCH_CACHE"] = str(tmp / "cache")  # a first use: the export is timed, the user's cache untouched
    rows = []
    for arch in ("densenet121",) if quick else ("densenet121", "resnet18"):
        bundle = untrained_classifier_bundle(tmp / arch, arch=arch)
        pipe = Pipeline(load_bundle(bundle), load_bundle(ood))
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as fallback:
            warnings.simplefilter("always", BackendFallbackWarning)
            auto = load_pipeline(bundle, ood, backend="auto", explain="saliency", threads=threads)
        export_s = time.perf_counter() - t0
        graph = getattr(auto.classifier_backend, "saliency_path", None)  # the timed saliency.onnx, if any
        contenders = {"cxrbench (PyTorch, one pass)": lambda: pipe.analyze(blob, name="x.png", explain="saliency"),
                      f"cxrbench auto{backend_note(auto)}": lambda: auto.analyze(blob, name="x.png",
                                                                               explain="saliency")}
        if auto.backends()["classifier"] != "onnxruntime":  # the saliency graph failed its parity check on the
            # default images: time ONNX Runtime anyway, on an export whose parity is checked on the timed image
            try:
                checked = export_models(load_bundle(bundle), tmp / f"{arch}-onnx", load_bundle(ood), images=[blob],
                                        threads=threads)
            except ParityError as exc:
                print(f"{arch}: no ONNX Runtime saliency row ({exc})", file=sys.stderr)
            else:
                ort = pipeline_from_export(checked.path, threads=threads)
                graph = ort.classifier_backend.saliency_path
                contenders["cxrbench ONNX Runtime saliency (parity on this image only)"] = lambda: ort.analyze(
                    blob, name="x.png", explain="saliency")
        peer = xrv.models.DenseNet(weights=None).eval() if arch == "densenet121" else pipe.classifier.model
        medians = interleaved({**contenders, "torchxrayvision chain": xrv_chain(peer, blob)}, rounds)
        task = f"full report, {arch} 224 px (gate + 14 calibrated + saliency)"
        rows += rows_of(task, medians, "cxrbench (PyTorch, one pass)")
        if graph is not None:
            rows.append(floor_row(task, Path(graph), threads, medians))
        rows.append({"task": f"first-use ONNX export with the saliency graph, {arch} 224 px (parity-checked)",
                     "contender": "cxrbench auto", "median_ms": round(1e3 * export_s, 1), "ratio_to_cxrbench": 1.0,
                     "note": "; ".join(str(w.message) for w in fallback)})
    return rows


@functools.cache
def matmul_rate(threads: int) -> float:
    """ORT's best MatMul GFLOP/s, measured once per run, so that every floor row of a table uses the same rate."""
    return ort_matmul_gflops(threads)


def floor_row(task: str, graph: Path, threads: int, medians: dict[str, float]) -> dict:
    """An estimate of the fp32 floor of the ONNX Runtime report: the saliency graph's convolution FLOPs at ORT's
    best ``MatMul`` rate on this CPU and these threads, and that floor as a fraction of the torchxrayvision
    chain's median. An estimate, not a bound: ORT's blocked convolution kernels can run somewhat above its
    ``MatMul`` rate (on a 2-core Zen 4, ResNet18's whole saliency graph ran at 186 GFLOP/s against a best MatMul of
    194). The rest of the graph, reading, the gate and post-processing come on top."""
    gflop, peak = conv_gflop(graph), matmul_rate(threads)
    floor_s = gflop / peak
    return {"task": task, "contender": f"fp32 floor: {gflop:.2f} GFLOP of convolutions at ORT's best MatMul rate "
                                       f"({peak:.0f} GFLOP/s, {threads} threads)",
            "median_ms": round(1e3 * floor_s, 1),
            "ratio_to_cxrbench": round(floor_s / medians["cxrbench (PyTorch, one pass)"], 2),
            "note": f"floor / torchxrayvision chain = {floor_s / medians['torchxrayvision chain']:.2f}"}


def bench_gradcam(rounds: int) -> list[dict]:
    import torch.nn.functional as F
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM as PeerGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cxrbench.explain import GradCAM
    from cxrbench.models.classifier import build_classifier

    torch.manual_seed(0)
    model = build_classifier("densenet121", 14, 1).eval()
    x = torch.rand(1, 1, 224, 224)
    ours = GradCAM(model, normalize="minmax")
    peer = PeerGradCAM(model=model, target_layers=[model.features])
    layer = LayerGradCam(model, model.features)
    rows = []
    for targets in ([2], [2, 4, 7]):
        def captum(targets=targets):
            maps = [layer.attribute(x, target=t, relu_attributions=True) for t in targets]
            return F.interpolate(torch.cat(maps, 1), size=(224, 224), mode="bilinear")

        medians = interleaved({"cxrbench": lambda t=targets: ours(x, targets=t),
                               "pytorch-grad-cam": lambda t=targets: [peer(input_tensor=x, targets=[
                                   ClassifierOutputTarget(i)]) for i in t],
                               "captum LayerGradCam": captum}, rounds)
        rows += rows_of(f"Grad-CAM, densenet121 224 px, {len(targets)} target(s)", medians, "cxrbench")
    return rows


def bench_forward(tmp: Path, rounds: int, threads: int) -> list[dict]:
    from cxrbench.export.onnx import GRAPH_FILES, export_models, make_session
    from cxrbench.models.bundle import load_bundle, untrained_classifier_bundle

    bundle = load_bundle(untrained_classifier_bundle(tmp / "fwd", arch="densenet121"))
    export_models(bundle, tmp / "onnx", saliency=False)  # the forward graph is timed here
    session = make_session(tmp / "onnx" / GRAPH_FILES["classifier"], threads)
    model = bundle.model.eval()
    rows = []
    for batch in (1, 16):
        x = torch.rand(batch, 1, 224, 224)

        def eager(x=x):
            with torch.no_grad():
                return model(x)

        medians = interleaved({"cxrbench (PyTorch eager)": eager,
                               "cxrbench (ONNX Runtime)": lambda x=x: session.run(None, {"x": x.numpy()})}, rounds)
        for row in rows_of(f"forward, densenet121 224 px, batch {batch}", medians, "cxrbench (PyTorch eager)"):
            rows.append({**row, "median_ms_per_image": round(row["median_ms"] / batch, 1)})
    return rows


def bench_training(rounds: int, arch: str) -> list[dict]:
    from torch import nn

    from cxrbench.models.classifier import build_classifier
    from cxrbench.train.runtime import Precision

    contenders: Contenders = {}
    x, y = torch.rand(16, 1, 128, 128), (torch.rand(16, 14) > 0.8).float()
    for name, precision in (("fp32", Precision()), ("channels_last", Precision(None, True)),
                            ("bf16 autocast", Precision(torch.bfloat16, False)),
                            ("bf16 autocast + channels_last", Precision(torch.bfloat16, True))):
        torch.manual_seed(0)
        model = build_classifier(arch, 14, 1).train()
        xb = x
        if precision.channels_last:
            model, xb = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt, xb=xb, precision=precision):
            with precision.autocast(torch.device("cpu")):
                loss = nn.functional.binary_cross_entropy_with_logits(model(xb).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        contenders[name] = step
    medians = interleaved(contenders, rounds)
    rows = rows_of(f"training step, {arch} 128 px, batch 16, Adam", medians, "fp32")
    return [{**r, "images_per_s": round(16 / (r["median_ms"] / 1e3), 1)} for r in rows]


def header(threads: int, load_before: tuple[float, ...], rounds: int) -> str:
    from cxrbench.train.runtime import FAST_BF16_FLAGS, cpu_flags

    bf16 = sorted(FAST_BF16_FLAGS & cpu_flags()) or ["none"]
    return (f"{machine()}; bf16 flags: {', '.join(bf16)}; torch {torch.__version__}, onnxruntime {ort_version()}, "
            f"{threads} threads; {rounds} interleaved rounds; 1/5/15-min load average before "
            f"{' / '.join(f'{v:.2f}' for v in load_before)}, after {' / '.join(f'{v:.2f}' for v in os.getloadavg())}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def ort_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return str(onnxruntime.__version__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/benchmarks")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per comparison (medians over them)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", default=list(JOBS), choices=JOBS,
                   help="comparisons to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="the DenseNet-121 report, Grad-CAM and training rows only (same rounds)")
    args = p.parse_args()
    if args.quick:
        args.only = [j for j in args.only if j in ("report", "gradcam", "train")]
    try:
        import pytorch_grad_cam  # noqa: F401
        import torchxrayvision  # noqa: F401
    except ImportError as exc:
        sys.exit(f"bench_peers.py needs the peers: pip install --no-deps torchxrayvision grad-cam ttach "
                 f"opencv-python-headless ({exc})")
    import pandas as pd

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        jobs = {"report": lambda: bench_reports(tmp, sample_png(), args.rounds, args.threads, args.quick),
                "dicom": lambda: bench_dicom(tmp, sample_png(), args.rounds),
                "gradcam": lambda: bench_gradcam(args.rounds),
                "forward": lambda: bench_forward(tmp, args.rounds, args.threads),
                "train": lambda: [r for arch in (("densenet121",) if args.quick else ("densenet121", "resnet18"))
                                  for r in bench_training(args.rounds, arch)]}
        for name in args.only:
            rows += jobs[name]()
            print(pd.DataFrame(rows).to_string(index=False), flush=True)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "peers.csv", index=False)
    head = header(args.threads, load_before, args.rounds)
    (out / "peers.md").write_text(f"<!-- {head} -->\n" + markdown(df.fillna("")))
    (out / "peers.json").write_text(json.dumps({"header": head, "quick": args.quick, "threads": args.threads,
                                                "rounds": args.rounds, "rows": df.to_dict(orient="records")},
                                               indent=1, default=str))
    print(head)
    print(f"wrote {out / 'peers'}.csv, .md and .json")


if __name__ == "__main__":
    main()
