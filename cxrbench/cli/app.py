"""``cxrbench demo prepare|serve`` and ``cxrbench analyze`` (the batch form of the dashboard)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cxrbench.cli.options import add_backend_argument

__all__ = ["add_app_commands"]


def _demo_prepare(args: argparse.Namespace) -> int:
    from cxrbench.app.demo import prepare_demo

    info = prepare_demo(args.out, data=args.data, force=args.force, progress=not args.quiet)
    print(f"classifier: {info['classifier']}\nood gate:   {info.get('ood')}\nexamples:   {len(info.get('examples', {}))}")
    return 0


def _demo_serve(args: argparse.Namespace) -> int:
    from cxrbench.app.demo import prepare_demo, run_until_stopped, serve

    t0 = time.perf_counter()
    info = prepare_demo(args.out, data=args.data, progress=not args.quiet)
    proc = serve(info, port=args.port)
    print(f"\ncxrbench dashboard ready in {time.perf_counter() - t0:.1f} s: http://127.0.0.1:{args.port}/\n"
          "(local only; images never leave this machine. Ctrl-C stops it.)", flush=True)
    code = run_until_stopped(proc)  # Ctrl-C / SIGTERM: the server and its kernels stop before we exit
    print("cxrbench dashboard stopped", flush=True)
    return code


def _analyze(args: argparse.Namespace) -> int:
    import pandas as pd

    from cxrbench.app.dashboard import png_bytes
    from cxrbench.cli.classifier import backend_note, expand_files
    from cxrbench.explain.overlay import overlay
    from cxrbench.export.runtime import load_pipeline

    pipe = load_pipeline(args.classifier, ood=args.ood, backend=args.backend, progress=not args.quiet)
    explain = None if args.explain == "none" else args.explain
    methods = pipe.classifier_backend.explain_methods
    if explain is not None and explain not in methods:
        fallback = methods[0] if methods else None
        print(f"note: the {pipe.classifier_backend.name} backend cannot explain with {explain}; "
              f"{f'using {fallback}' if fallback else 'no overlays'}", file=sys.stderr)
        explain = fallback
    files = expand_files(args.files)
    if not files:
        raise ValueError("no input files")
    out = Path(args.out)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    reports, errors = pipe.analyze_batch(files, explain=explain, allow_ood=args.allow_ood, progress=not args.quiet)
    rows = []
    for i, (f, r) in enumerate(zip(files, reports)):
        if r is None:
            rows.append({"file": f, "error": errors[i]})
            print(f"warning: {f}: {errors[i]}", file=sys.stderr)
            continue
        rows.append({**r.to_row(), "file": f})
        if r.maps is not None:
            png = png_bytes(overlay(r.image, r.maps[0], alpha=0.5))
            (out / "overlays" / f"{i:04d}_{Path(f).stem}.png").write_bytes(png)
    cols = ["file", *[c for f in pipe.findings for c in (f, f"{f}_raw")], "ood_score", "in_distribution", "error"]
    pd.DataFrame(rows).reindex(columns=cols).to_csv(out / "analysis.csv", index=False)
    n_rej = sum(1 for r in reports if r is not None and r.rejected)
    print(f"wrote {out / 'analysis.csv'}: {len(files)} files, {len(errors)} unreadable, {n_rej} rejected by the "
          f"OOD gate{backend_note(args.backend)}")
    return 0 if len(errors) < len(files) else 1


def add_app_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the demo bundles and serve the dashboard locally")
    dsub = p.add_subparsers(dest="demo_command", required=True, metavar="COMMAND")
    for name, func, helptext in (("prepare", _demo_prepare, "train (or reuse) the demo bundles"),
                                 ("serve", _demo_serve, "prepare, then serve the dashboard on 127.0.0.1")):
        q = dsub.add_parser(name, help=helptext)
        q.add_argument("--data", default=None, help="data folder (default $CXRBENCH_DATA, ../shared/data/cxr, else phantoms)")
        q.add_argument("--out", default="build/demo", help="where the demo bundles are cached")
        q.add_argument("-q", "--quiet", action="store_true")
        if name == "prepare":
            q.add_argument("--force", action="store_true", help="retrain even if cached")
        else:
            q.add_argument("--port", type=int, default=8866)
        q.set_defaults(func=func)

    q = sub.add_parser("analyze", help="OOD gate + calibrated probabilities + overlays for many files")
    q.add_argument("--classifier", required=True, help="classifier bundle")
    q.add_argument("--ood", default=None, help="OOD bundle (without it every image is analysed)")
    q.add_argument("files", nargs="+")
    q.add_argument("--out", required=True, help="folder for analysis.csv and overlays/")
    q.add_argument("--explain", default="saliency", help="explanation method for the overlays, or 'none' "
                                                         "(the onnx backend explains with cam)")
    q.add_argument("--allow-ood", action="store_true", help="give probabilities for rejected images too")
    add_backend_argument(q)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_analyze)
