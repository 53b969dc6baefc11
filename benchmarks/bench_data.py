"""Data foundation speeds: NIH label table, patient split, reading and caching the 481 NIH dev images."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from _common import parse_args, peak_rss_mb, timed, write_table  # noqa: E402

from cxrbench.data import CXRDataset, load_manifest, patient_split, read_nih_table, shared_data_root  # noqa: E402
from cxrbench.io import read_image  # noqa: E402
from cxrbench.preprocess import Preprocess  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    root = shared_data_root()
    if root is None:
        sys.exit("needs ../shared/data (or CXRBENCH_SHARED_DATA)")
    torch.set_num_threads(2)
    rows = []
    table_path = root / "nih_metadata" / "Data_Entry_2017_v2020.csv.gz"
    med, best = timed(lambda: read_nih_table(table_path), args.repeat)
    rows.append({"step": "read NIH label table (112,120 rows)", "median_s": med, "min_s": best,
                 "per_image_ms": med / 112120 * 1e3})
    table = read_nih_table(table_path)
    med, best = timed(lambda: patient_split(table, seed=0), args.repeat)
    rows.append({"step": "patient split 70/10/20 of the full table", "median_s": med, "min_s": best,
                 "per_image_ms": med / len(table) * 1e3})

    nih = load_manifest(root / "cxr" / "nih")
    paths = nih["path"].tolist()
    med, best = timed(lambda: [read_image(p) for p in paths], args.repeat)
    rows.append({"step": f"read_image x{len(paths)} NIH dev PNGs", "median_s": med, "min_s": best,
                 "per_image_ms": med / len(paths) * 1e3})
    for size in (224, 128):
        def build(size=size):
            with tempfile.TemporaryDirectory() as d:
                rep = CXRDataset(nih, Preprocess(size=size), cache_dir=d).build_cache(workers=2)
                assert rep.n_failed == 0
        med, best = timed(build, args.repeat)
        rows.append({"step": f"decode + crop/resize + cache x{len(paths)} at {size} px (2 threads)", "median_s": med,
                     "min_s": best, "per_image_ms": med / len(paths) * 1e3})
    with tempfile.TemporaryDirectory() as d:
        ds = CXRDataset(nih, Preprocess(size=224), cache_dir=d)
        ds.build_cache()
        med, best = timed(lambda: [ds[i] for i in range(len(ds))], args.repeat)
        rows.append({"step": f"items from a warm cache x{len(ds)} at 224 px", "median_s": med, "min_s": best,
                     "per_image_ms": med / len(ds) * 1e3})
        plain = CXRDataset(nih, Preprocess(size=224), cache_dir=None)
        med, best = timed(lambda: [plain[i] for i in range(len(plain))], 1)
        rows.append({"step": f"items without cache (decode every time) x{len(plain)} at 224 px", "median_s": med,
                     "min_s": best, "per_image_ms": med / len(plain) * 1e3})
    rows.append({"step": "peak RSS (MB)", "median_s": peak_rss_mb(), "min_s": float("nan"),
                 "per_image_ms": float("nan")})
    write_table(rows, args.out, "data")


if __name__ == "__main__":
    main()
