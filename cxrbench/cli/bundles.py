"""``cxrbench bundles prepare|list``: the shared cache of small bundles the notebooks reuse.

``prepare`` trains each named entry once into the cache (``$CXRBENCH_CACHE/bundles``, default
``~/.cache/cxrbench/bundles``) and reuses it thereafter; ``make notebooks-html`` runs it first, so the
notebooks at their defaults find every bundle ready. The parser imports no torch.
"""

from __future__ import annotations

import argparse
import json
import time

from cxrbench.cli.options import CommandError, Subcommands

__all__ = ["add_bundles_commands"]


def _prepare(args: argparse.Namespace) -> int:
    from cxrbench.train.shared import SharedBundleError, prepare_shared_bundles

    t0 = time.perf_counter()
    try:
        rows = prepare_shared_bundles(args.names or None, args.data, progress=not args.quiet)
    except SharedBundleError as exc:
        raise CommandError(str(exc)) from None
    for row in rows:
        print(f"{row['name']:<20} {row['seconds']:>7.1f} s  {row['bundle']}")
    total = round(time.perf_counter() - t0, 1)
    print(f"{len(rows)} shared bundles ready in {total:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"seconds": total, "bundles": rows}, fh, indent=1)
    return 0


def _list(args: argparse.Namespace) -> int:
    from cxrbench.train.shared import SHARED_BUNDLES, shared_bundle_key, shared_bundles_dir

    root = shared_bundles_dir()
    for name, spec in SHARED_BUNDLES.items():
        key = shared_bundle_key(name, args.data)
        state = "ready" if (root / f"{name}-{key}" / "entry.json").is_file() else "not trained yet"
        print(f"{name:<20} {state:<16} {spec.description}")
    print(f"cache: {root}")
    return 0


def add_bundles_commands(sub: Subcommands) -> None:
    """Register ``bundles prepare`` and ``bundles list``."""
    p = sub.add_parser("bundles", help="the shared cache of small trained bundles the notebooks reuse")
    bsub = p.add_subparsers(dest="bundles_command", required=True, metavar="COMMAND")
    q = bsub.add_parser("prepare", help="train (once) or find each shared bundle")
    q.add_argument("names", nargs="*", help="entries to prepare (default all: see `cxrbench bundles list`)")
    q.add_argument("--json", default=None, help="also write the names, folders and seconds to this JSON file")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_prepare)
    q2 = bsub.add_parser("list", help="the shared bundles and whether each is in the cache")
    q2.set_defaults(func=_list)
    for parser in (q, q2):
        parser.add_argument("--data", default=None,
                            help="data root to train on (default ../shared/data if present, else phantoms)")
