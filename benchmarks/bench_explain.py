"""Explanation speed: seconds per image at 224 px for each method, DenseNet-121 and ResNet18 (1 channel), batch 1.

Untrained weights (speed does not depend on them). Per-finding methods explain one finding; Chester's
saliency explains all 14 at once in one backward pass; ``saliency_per_finding x14`` is the cost of all
14 separate maps. Also the deletion + insertion curves (10 steps) of one map. Median and min of
``--repeat`` runs after one warm-up; ``--threads`` torch threads (1 by default: the CPU is shared).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import peak_rss_mb, timed, write_table  # noqa: E402

from cxrbench.explain import EXPLAINERS, get_explainer  # noqa: E402
from cxrbench.explain.metrics import deletion_insertion  # noqa: E402
from cxrbench.labels import NIH_FINDINGS  # noqa: E402
from cxrbench.models.classifier import build_classifier  # noqa: E402

CHESTER_BROWSER_SALIENCY_S = 17.0  # Chester §4: the saliency map in the browser


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="build/benchmarks", help="folder for the table (CSV + Markdown)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per method (median reported)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--archs", nargs="+", default=["densenet121", "resnet18"])
    p.add_argument("--methods", nargs="+", default=EXPLAINERS, choices=EXPLAINERS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(1, 1, args.size, args.size) * 2 - 1
    rows = []
    for arch in args.archs:
        model = build_classifier(arch, len(NIH_FINDINGS), 1, pretrained=False).eval()
        with torch.no_grad():
            model(x)
            med, best = timed(lambda: model(x), args.repeat)
        rows.append({"arch": arch, "method": "forward only (prediction)", "findings": 14, "median_s": med,
                     "min_s": best})
        cases = [(m, None if m == "saliency" else [1]) for m in args.methods]
        if "saliency_per_finding" in args.methods:
            cases.append(("saliency_per_finding", list(range(len(NIH_FINDINGS)))))
        for method, targets in cases:
            explainer = get_explainer(method, model)
            explainer(x, targets=targets)  # warm-up
            med, best = timed(lambda: explainer(x, targets=targets), args.repeat)
            label = method if method != "saliency_per_finding" or len(targets) == 1 else f"{method} x14"
            rows.append({"arch": arch, "method": label, "findings": 14 if targets is None else len(targets),
                         "median_s": med, "min_s": best})
            print(f"{arch:12s} {label:28s} {med:8.3f} s", flush=True)
        heat = np.random.default_rng(0).random((1, args.size, args.size))
        med, best = timed(lambda: deletion_insertion(model, x, heat, [1], steps=10), max(1, args.repeat // 2))
        rows.append({"arch": arch, "method": "deletion+insertion curves (10 steps)", "findings": 1,
                     "median_s": med, "min_s": best})
    for row in rows:
        row["size_px"], row["threads"], row["repeats"] = args.size, args.threads, args.repeat
        row["vs_chester_browser"] = (f"{CHESTER_BROWSER_SALIENCY_S / row['median_s']:.0f}x faster"
                                     if row["method"] == "saliency" else "")
    rows.append({"arch": "-", "method": "peak RSS (MB)", "findings": 0, "median_s": peak_rss_mb(),
                 "min_s": float("nan"), "size_px": args.size, "threads": args.threads, "repeats": args.repeat,
                 "vs_chester_browser": ""})
    write_table(rows, args.out, "explain")


if __name__ == "__main__":
    main()
