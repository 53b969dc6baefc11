"""Time from bytes to a full report (OOD gate + calibrated probabilities + Chester saliency) at 224 px.

DenseNet-121 (14 outputs, 1 channel) and the 64 px autoencoder gate, on >= 20 real NIH PNGs read as
bytes; median per stage and in total, and the peak memory. Weights are random (timing does not depend
on them) unless --classifier / --ood name trained bundles.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from _common import peak_rss_mb, write_table  # noqa: E402

from cxrbench.data import load_manifest, shared_data_root  # noqa: E402
from cxrbench.inference.pipeline import Pipeline  # noqa: E402
from cxrbench.models.bundle import untrained_classifier_bundle  # noqa: E402
from cxrbench.ood.untrained import untrained_ood_bundle  # noqa: E402


def _bundles(tmp: Path, arch: str) -> tuple[Path, Path]:
    return (untrained_classifier_bundle(tmp / "clf", arch=arch, description="benchmark"),
            untrained_ood_bundle(tmp / "ood", description="benchmark: never rejects"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="build/benchmarks")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classifier", default=None)
    p.add_argument("--ood", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = shared_data_root()
    if root is None:
        sys.exit("needs ../shared/data")
    files = load_manifest(root / "cxr" / "nih")["path"].tolist()[: args.n]
    blobs = [(Path(f).name, Path(f).read_bytes()) for f in files]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for arch in ("densenet121", "resnet18"):
            clf, ood = (args.classifier, args.ood) if args.classifier else _bundles(Path(d) / arch, arch)
            pipe = Pipeline.from_paths(clf, ood=ood)
            for method in ("saliency", "gradcam", None):
                pipe.analyze(blobs[0][1], name=blobs[0][0], explain=method)  # warm-up
                stages: dict[str, list[float]] = {}
                for name, blob in blobs:
                    r = pipe.analyze(blob, name=name, explain=method)
                    for k, v in r.timings.items():
                        stages.setdefault(k, []).append(v)
                row = {"classifier": arch, "explain": method or "none", "n_images": len(blobs),
                       "threads": args.threads}
                row.update({f"{k}_median_s": round(statistics.median(v), 4) for k, v in stages.items()})
                rows.append(row)
                print(row, flush=True)
    rows.append({"classifier": "peak RSS MB", "explain": "", "n_images": 0, "threads": args.threads,
                 "total_median_s": round(peak_rss_mb())})
    write_table(rows, args.out, f"pipeline_{args.threads}threads")


if __name__ == "__main__":
    main()
