"""``cxrbench data list|check|split|phantoms|cache``: the catalogue, a local copy's check, patient splits,
synthetic phantoms and the uint8 image cache."""

from __future__ import annotations

import argparse
import time

from cxrbench.cli.options import Subcommands

__all__ = ["add_data_commands"]


def _data_list(args: argparse.Namespace) -> int:
    from cxrbench.data.catalog import list_datasets

    for name, spec in list_datasets().items():
        print(f"{name:24s} [{spec.role}] {spec.title}")
        if args.verbose:
            print(f"{'':24s} licence: {spec.licence}\n{'':24s} source: {spec.source}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from cxrbench.data.catalog import check_dataset

    result = check_dataset(args.name, args.root, decode=args.decode)
    print(result.report(show=args.show))
    return 0 if result.ok else 1


def _data_split(args: argparse.Namespace) -> int:
    from cxrbench.data import check_patient_disjoint, load_manifest, patient_split, save_split, split_summary

    fractions = tuple(float(f) for f in args.fractions.split("/"))
    t0 = time.perf_counter()
    df = load_manifest(args.root, on_missing=args.on_missing)
    split = patient_split(df, fractions, seed=args.seed)
    check_patient_disjoint(df, split)
    out = save_split(df, split, args.out, seed=args.seed, fractions=fractions)
    print(split_summary(df, split).to_string())
    print(f"wrote {out} ({len(df)} images, {df['patient_id'].nunique()} patients, {time.perf_counter() - t0:.2f} s)")
    return 0


def _data_phantoms(args: argparse.Namespace) -> int:
    from cxrbench.data.synthetic import write_phantom_set

    t0 = time.perf_counter()
    root = write_phantom_set(args.out, args.n, size=args.size, seed=args.seed)
    print(f"wrote {args.n} phantoms to {root} in {time.perf_counter() - t0:.1f} s")
    return 0


def _data_cache(args: argparse.Namespace) -> int:
    from cxrbench.data import CXRDataset, load_manifest
    from cxrbench.preprocess import Preprocess

    df = load_manifest(args.root, on_missing="drop")
    ds = CXRDataset(df, Preprocess(size=args.size), cache_dir=args.cache_dir or "auto")
    report = ds.build_cache(workers=args.workers, progress=not args.quiet)
    print(report.summary())
    print(f"cache: {ds.cache.dir}")
    return 1 if report.n_failed else 0


def add_data_commands(sub: Subcommands) -> None:
    """Register ``data list``, ``data check``, ``data split``, ``data phantoms`` and ``data cache``."""
    p = sub.add_parser("data", help="catalogue, check, split and cache datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    q = dsub.add_parser("list", help="the catalogued datasets (data_manifests/*.yaml)")
    q.add_argument("-v", "--verbose", action="store_true")
    q.set_defaults(func=_data_list)

    q = dsub.add_parser("check", help="validate a local copy of a dataset and list what is missing")
    q.add_argument("name", help="dataset name (see 'cxrbench data list'), a unique prefix, or a YAML file")
    q.add_argument("root", help="folder of the local copy")
    q.add_argument("--decode", action="store_true", help="also decode every image (slower; finds corrupt files)")
    q.add_argument("--show", type=int, default=10, help="how many missing files to list")
    q.set_defaults(func=_data_check)

    q = dsub.add_parser("split", help="patient-level seeded split of a dataset, written to CSV")
    q.add_argument("root")
    q.add_argument("--out", required=True, help="CSV to write (image_id, patient_id, split)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--fractions", default="0.7/0.1/0.2", help="train/val/test fractions (default 0.7/0.1/0.2)")
    q.add_argument("--on-missing", choices=("raise", "drop"), default="raise")
    q.set_defaults(func=_data_split)

    q = dsub.add_parser("phantoms", help="write a synthetic phantom dataset (the offline default)")
    q.add_argument("out")
    q.add_argument("-n", type=int, default=64)
    q.add_argument("--size", type=int, default=256)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_data_phantoms)

    q = dsub.add_parser("cache", help="decode every image of a dataset once into the uint8 cache")
    q.add_argument("root")
    q.add_argument("--size", type=int, default=224)
    q.add_argument("--cache-dir", default=None, help="default $CXRBENCH_CACHE or ~/.cache/cxrbench")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_data_cache)
