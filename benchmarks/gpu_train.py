"""GPU training throughput of the real trainer (issue 16, item 6): DenseNet-121 at 224 px, batch 64-256.

Not part of ``make benchmarks`` (which runs on the CPU): run it where there is a CUDA device, e.g.::

    python benchmarks/gpu_train.py --out build/benchmarks                 # batch 64, 128, 256 on one GPU
    torchrun --nproc_per_node 2 benchmarks/gpu_train.py --batch 128 --tag torchrun-2   # two processes, one GPU
    python benchmarks/gpu_train.py --smoke                                # a CPU check of this script (seconds)

Each row is one :func:`cxrbench.train.train_classifier` run, as ``cxrbench train classifier`` runs it: the uint8
cache (decoded once, here with every core before the first run), the trainer's augmentation in ``--workers``
DataLoader workers, the precision policy's choice (``auto``: bf16 autocast + channels_last on CUDA), Adam, a
validation pass per epoch. The 481 NIH images of ../shared/data are too few for a steady epoch, so the training
rows are repeated ``--repeat`` times (the same files; validation and test rows once). ``images_per_s`` is the
trainer's own figure for the last epoch (the first one pays for the CUDA context and, with ``--cudnn-benchmark``,
cuDNN's autotuning), over all processes; ``gpu_util`` the median and peak of ``nvidia-smi``'s utilisation sampled
every 0.25 s during the run (validation and the test evaluation included); ``nih_epoch_s`` the time one full NIH
training epoch (78,484 images) would take at that rate. The goal is >= 2,000 img/s (an NIH epoch < 45 s); the
README has the H200's table (2026-12-04: 2,461 img/s at batch 256).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from _common import write_table  # noqa: E402

from cxrbench.data import CXRDataset, load_manifest, patient_split, shared_data_root  # noqa: E402
from cxrbench.train.classifier import ClassifierConfig, train_classifier  # noqa: E402
from cxrbench.train.runtime import dist_info  # noqa: E402

NIH_TRAIN_IMAGES = 78_484


class GpuSampler:
    """``nvidia-smi``'s GPU utilisation (%) every 0.25 s in a background thread (nothing without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                       "-lms", "250"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def summary(self) -> str:
        if not self.samples:
            return "n/a (no nvidia-smi)"
        return f"{statistics.median(self.samples):.0f} % median, {max(self.samples):.0f} % peak"


def run_id() -> str:
    """The same id in every process of a torchrun job, else this process's."""
    return os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))


def repeated_manifest(repeat: int, seed: int = 0) -> tuple[pd.DataFrame, pd.Series]:
    """The shared NIH manifest with its training rows ``repeat`` times, and the split of every row."""
    root = shared_data_root()
    if root is None or not (root / "cxr" / "nih").is_dir():
        sys.exit("gpu_train.py needs the NIH images of ../shared/data (or $CXRBENCH_SHARED_DATA)")
    manifest = load_manifest(root / "cxr" / "nih")
    split = patient_split(manifest, (0.7, 0.1, 0.2), seed=seed)
    train, rest = manifest[split.to_numpy() == "train"], manifest[split.to_numpy() != "train"]
    rows = pd.concat([train] * repeat + [rest], ignore_index=True)
    names = ["train"] * (len(train) * repeat) + split[split.to_numpy() != "train"].tolist()
    rows.attrs.update(manifest.attrs)
    return rows, pd.Series(names, index=rows.index, name="split")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/benchmarks")
    p.add_argument("--arch", default="densenet121", choices=("densenet121", "resnet18"))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--repeat", type=int, default=60, help="times the training rows are repeated (an epoch)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default="auto", help="auto: under torchrun, each process its GPU (k mod count)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch")
    p.add_argument("--workdir", default=None, help="run folders and cache (kept); default a temporary one")
    p.add_argument("--tag", default="", help="a label for the rows (e.g. torchrun-2)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (cuDNN times its algorithms per shape first)")
    p.add_argument("--smoke", action="store_true", help="a CPU check of this script: ResNet18 64 px, 3 steps")
    args = p.parse_args()
    if args.smoke:
        args.arch, args.size, args.batch, args.workers, args.repeat = "resnet18", 64, [8], 0, 1
        args.epochs, args.device, args.max_steps, args.tag = 1, "cpu", 3, args.tag or "smoke"
        torch.set_num_threads(2)
    elif args.device != "cpu" and not torch.cuda.is_available():
        sys.exit("gpu_train.py: no CUDA device here (run it on a GPU machine, or --smoke for a CPU check)")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    dist = dist_info()
    manifest, split = repeated_manifest(args.repeat)
    rows = []
    # one folder for all processes of a torchrun job (its run id), removed by rank 0 at the end
    tmp = Path(args.workdir or Path(tempfile.gettempdir()) / f"cxrbench-gpu-train-{run_id()}")
    try:
        cache = tmp / "cache"
        base = ClassifierConfig(arch=args.arch, image_size=args.size, epochs=args.epochs, early_stopping_patience=0,
                                num_workers=args.workers, device=args.device, precision=args.precision,
                                max_steps_per_epoch=args.max_steps, eval_bootstrap=20)
        if dist.is_main:  # decode once, with every core, before the timed runs (which then find it done)
            t0 = time.perf_counter()
            CXRDataset(manifest, base.preprocess(), cache_dir=cache).build_cache(workers=os.cpu_count() or 1)
            print(f"uint8 cache of {len(manifest)} rows: {time.perf_counter() - t0:.1f} s", flush=True)
        for batch in args.batch:
            out = tmp / f"run-{batch}"
            config = dataclasses.replace(base, batch_size=batch)
            t0 = time.perf_counter()
            with GpuSampler() as gpu:
                result = train_classifier(manifest, out, config, split=split, cache_dir=cache, progress=False,
                                          data_description="NIH (../shared/data), training rows repeated")
            if not dist.is_main:
                continue
            last = result.history[-1]
            rate = float(last["images_per_s"])
            device = torch.cuda.get_device_name() if args.device != "cpu" else "cpu (2 threads)"
            rows.append({"device": device, "processes": int(last.get("world_size", 1)), "tag": args.tag,
                         "arch": args.arch, "size": args.size, "batch": batch, "workers": args.workers,
                         "precision": result.precision, "cudnn_benchmark": args.cudnn_benchmark,
                         "epoch_images": int(last["train_images"]) * int(last.get("world_size", 1)),
                         "images_per_s": round(rate, 1), "nih_epoch_s": round(NIH_TRAIN_IMAGES / rate, 1),
                         "gpu_util": gpu.summary(), "run_s": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
            # after every row, so that a run stopped by a time limit keeps the rows it finished
            write_table(rows, args.out, "gpu_train" + (f"_{args.tag}" if args.tag else ""))
    finally:
        if dist.is_main and not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
