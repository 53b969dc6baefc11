"""Feature extraction speed and memory: LBP, HOG and ResNet18 (1-channel, 224 px) for 500 and 1,000 images.

Images: the 481 NIH + 450 paediatric dev images (256 px PNGs), cycled to reach N. Every (kind, N) runs in
a fresh subprocess, so its peak resident memory (``ru_maxrss``) is its own; ``rss_after_import_mb`` is
the same process before extracting, so ``peak - after_import`` is what extraction added. Preprocessing:
224 px, histogram equalisation, [-1, 1]; chunks of 64 images into an on-disk cache; one torch thread
(``CXRBENCH_BENCH_THREADS`` to change). ``--repeat`` is not used: each (kind, N) runs once. The CNN is randomly
initialised (speed does not depend on the weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import parse_args, peak_rss_mb, write_table  # noqa: E402

KINDS = ("lbp", "hog", "cnn")
SIZES = (500, 1000)


def _child(kind: str, n: int, threads: int) -> None:
    """Extract ``kind`` features of ``n`` images; print one JSON line with the measurements."""
    import pandas as pd
    import torch

    from cxrbench.data import load_manifest, shared_data_root
    from cxrbench.hybrid.extraction import extract_features
    from cxrbench.models.classifier import build_classifier
    from cxrbench.preprocess import Preprocess

    torch.set_num_threads(threads)
    root = shared_data_root()
    paths = [p for sub in ("nih", "pediatric") for p in load_manifest(root / "cxr" / sub)["path"]]
    manifest = pd.DataFrame({"path": [paths[i % len(paths)] for i in range(n)]})
    model = build_classifier("resnet18", 14, in_channels=1).eval() if kind == "cnn" else None
    pp = Preprocess(size=224, equalize="hist", normalize="minus1_1")
    rss0 = peak_rss_mb()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        feats = extract_features(manifest, kind, pp, Path(d) / f"{kind}.npy", chunk_size=64, model=model,
                                 progress=False)
        seconds = time.perf_counter() - t0
        dim = int(feats.shape[1])
        del feats
    print(json.dumps({"kind": kind, "n_images": n, "dim": dim, "seconds": seconds, "images_per_s": n / seconds,
                      "rss_after_import_mb": rss0, "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    threads = int(os.environ.get("CXRBENCH_BENCH_THREADS", "1"))
    args = parse_args(__doc__)
    from cxrbench.data import shared_data_root

    if shared_data_root() is None:
        sys.exit("needs ../shared/data (or CXRBENCH_SHARED_DATA)")
    rows = []
    for kind in KINDS:
        for n in SIZES:
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(n), str(threads)], check=True,
                                 capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["extraction_mb"] = row["peak_rss_mb"] - row["rss_after_import_mb"]
            row["torch_threads"] = threads
            rows.append(row)
            print(row, flush=True)
    write_table(rows, args.out, "features")


if __name__ == "__main__":
    main()
