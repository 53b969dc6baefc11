"""A report with the lung U-Net (``Pipeline.analyze`` with ``unet``; ``cxrbench segment`` runs the same network):
its U-Net on PyTorch in NCHW (as before channels_last), on PyTorch channels_last (the torch default on a CPU now) and
on ONNX Runtime (``unet.onnx``, what ``--backend auto`` runs), each over the same real NIH PNGs back to back.

    python benchmarks/bench_segment.py [--out build/benchmarks] [--n 30] [--rounds 3] [--threads 2]

The three segmenters take turns by block (a block = every file once), ``--rounds`` blocks each; the table gives
the median seconds of the whole report and of its segment step, the ratio to the NCHW baseline, the first-use
export of ``unet.onnx`` and, in its header, the CPU, threads and load average before and after. The rest of the
report: a ResNet18 classifier at 128 px with Chester's saliency on ONNX Runtime and the 64 px autoencoder gate,
as the shared NIH bundles are. Weights are seeded random (speed does not depend on them): the U-Net has the shared
``lung-unet`` bundle's shape (128 px, 16 base channels, depth 4).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from _common import write_table  # noqa: E402

from cxrbench.data import load_manifest, shared_data_root  # noqa: E402
from cxrbench.models.bundle import ModelCard, save_bundle, untrained_classifier_bundle  # noqa: E402
from cxrbench.models.unet import UNet  # noqa: E402
from cxrbench.ood.untrained import untrained_ood_bundle  # noqa: E402
from cxrbench.preprocess import Preprocess  # noqa: E402


def _unet_bundle(path: Path) -> Path:
    torch.manual_seed(0)
    kwargs = {"in_channels": 1, "base_channels": 16, "depth": 4}
    save_bundle(path, UNet(**kwargs), ModelCard(kind="segmentation", builder="unet", builder_kwargs=kwargs,
                                                labels=["lung"], preprocess=Preprocess(size=128).to_dict(),
                                                description="benchmark: seeded random weights"))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/benchmarks")
    p.add_argument("--n", type=int, default=30, help="NIH files a block")
    p.add_argument("--rounds", type=int, default=3, help="blocks of each segmenter")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = shared_data_root()
    if root is None:
        sys.exit("needs ../shared/data")
    blobs = [Path(f).read_bytes() for f in load_manifest(root / "cxr" / "nih")["path"].tolist()[: args.n]]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["CXRBENCH_CACHE"] = str(tmp / "cache")  # a first use (timed); the user's cache untouched
        from cxrbench.export.cache import cached_segmenter_export
        from cxrbench.export.runtime import load_pipeline

        clf = untrained_classifier_bundle(tmp / "clf", arch="resnet18", preprocess=Preprocess(size=128),
                                          description="benchmark")
        ood = untrained_ood_bundle(tmp / "ood", description="benchmark: never rejects")
        unet = _unet_bundle(tmp / "unet")
        t0 = time.perf_counter()
        cached_segmenter_export(unet)
        export_s = time.perf_counter() - t0
        pipe = load_pipeline(clf, ood, unet, backend="auto", threads=args.threads)
        assert pipe.backends()["segmenter"] == "onnxruntime", pipe.backends()
        segmenters = {"PyTorch NCHW": pipe.unet.model,
                      "PyTorch channels_last": load_pipeline(clf, unet=unet, backend="torch").segmenter,
                      "ONNX Runtime": pipe.segmenter}
        totals: dict[str, list[float]] = {k: [] for k in segmenters}
        steps: dict[str, list[float]] = {k: [] for k in segmenters}
        for _ in range(args.rounds):
            for name, segmenter in segmenters.items():
                pipe.segmenter = segmenter
                pipe.analyze(blobs[0], allow_ood=True)  # the block's warm-up
                for blob in blobs:
                    r = pipe.analyze(blob, allow_ood=True)
                    totals[name].append(r.timings["total"])
                    steps[name].append(r.timings["segment"])
    base = statistics.median(totals["PyTorch NCHW"])
    rows = [{"segmenter": name, "report_ms": round(1e3 * statistics.median(totals[name]), 2),
             "segment_ms": round(1e3 * statistics.median(steps[name]), 2),
             "report_ratio_to_nchw": round(statistics.median(totals[name]) / base, 3),
             "reports": len(totals[name])} for name in segmenters]
    rows.append({"segmenter": "first-use export of unet.onnx (parity-checked)", "report_ms": round(1e3 * export_s, 1),
                 "segment_ms": "", "report_ratio_to_nchw": "", "reports": ""})
    load_after = os.getloadavg()
    print(f"threads {args.threads}, load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    rows.append({"segmenter": f"threads {args.threads}; 1-min load {load_before[0]:.2f} -> {load_after[0]:.2f}",
                 "report_ms": "", "segment_ms": "", "report_ratio_to_nchw": "", "reports": ""})
    write_table(rows, args.out, f"segment_{args.threads}threads")


if __name__ == "__main__":
    main()
