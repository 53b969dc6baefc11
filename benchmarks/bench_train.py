"""Classifier training throughput: images/s at 128 and 224 px, cached uint8 vs per-step PNG decoding.

One row per (architecture, size, data path, device): a few warm-up steps, then timed optimizer steps
(Adam, BCE with pos_weight, batch 16, the real 481 NIH dev images), and the time one epoch of the full
NIH training split (78,484 images, 70 % of 112,120) would take at that rate. On CUDA (e.g. through the
device tool) the optimised path adds bf16 autocast and channels_last.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from _common import parse_args, peak_rss_mb, write_table  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cxrbench.data import CXRDataset, load_manifest, shared_data_root  # noqa: E402
from cxrbench.models.classifier import build_classifier  # noqa: E402
from cxrbench.preprocess import Preprocess  # noqa: E402
from cxrbench.train.runtime import autocast  # noqa: E402

NIH_TRAIN_IMAGES = 78_484


def measure(arch: str, size: int, cached: bool, device: torch.device, optimised: bool, steps: int, cache_root: str):
    root = shared_data_root()
    manifest = load_manifest(root / "cxr" / "nih")
    ds = CXRDataset(manifest, Preprocess(size=size), cache_dir=cache_root if cached else None)
    if cached:
        ds.build_cache()
    loader = DataLoader(ds, batch_size=16, shuffle=True, num_workers=0, drop_last=True)
    model = build_classifier(arch, 14, 1).to(device)
    if optimised and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.BCEWithLogitsLoss(pos_weight=ds.pos_weight().to(device))
    model.train()
    it = iter(loader)
    done, t0 = 0, None
    for step in range(steps + 2):
        try:
            x, y, _ = next(it)
        except StopIteration:
            it = iter(loader)
            x, y, _ = next(it)
        if step == 2:  # after warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        if optimised and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, optimised):
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= 2:
            done += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = done / (time.perf_counter() - t0)
    return rate


def main() -> None:
    args = parse_args(__doc__)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(2)
    steps = 20 if device.type == "cuda" else 4
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for arch in ("densenet121", "resnet18"):
            for size in (128, 224):
                variants = [(True, True), (False, False)] if device.type == "cuda" else [(True, False), (False, False)]
                for cached, optimised in variants:
                    rate = measure(arch, size, cached, device, optimised, steps, cache)
                    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (2 threads)"
                    rows.append({"device": str(name),
                                 "arch": arch, "size": size,
                                 "data": "uint8 cache" if cached else "PNG decode per step",
                                 "precision": ("bf16 + channels_last" if optimised and device.type == "cuda"
                                               else "float32"),
                                 "images_per_s": round(rate, 2),
                                 "full_NIH_epoch_h": round(NIH_TRAIN_IMAGES / rate / 3600, 2)})
                    print(rows[-1], flush=True)
    rows.append({"device": "peak RSS MB", "arch": "", "size": 0, "data": "", "precision": "",
                 "images_per_s": round(peak_rss_mb()), "full_NIH_epoch_h": float("nan")})
    write_table(rows, args.out, "train_" + device.type)


if __name__ == "__main__":
    main()
