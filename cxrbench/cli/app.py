"""``cxrbench demo prepare|serve`` and ``cxrbench analyze`` (the batch form of the dashboard)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from cxrbench.cli.options import Subcommands, add_backend_argument, positive_int
from cxrbench.cli.outputs import OUTPUT_NAMING, output_stems, refuse_overwriting_inputs

__all__ = ["add_app_commands"]


def _demo_prepare(args: argparse.Namespace) -> int:
    from cxrbench.app.demo import prepare_demo

    info = prepare_demo(args.out, data=args.data, force=args.force, progress=not args.quiet,
                        counterfactual=args.counterfactual)
    print(f"classifier: {info['classifier']}\nood gate:   {info.get('ood')}\n"
          f"autoencoder (counterfactuals): {info.get('autoencoder') or 'none (--counterfactual trains one)'}\n"
          f"examples:   {len(info.get('examples', {}))}")
    return 0


def _demo_serve(args: argparse.Namespace) -> int:
    from cxrbench.app.demo import prepare_demo, run_until_stopped, serve

    t0 = time.perf_counter()
    info = prepare_demo(args.out, data=args.data, progress=not args.quiet, counterfactual=args.counterfactual)
    proc = serve(info, port=args.port)
    print(f"\ncxrbench dashboard ready in {time.perf_counter() - t0:.1f} s: http://127.0.0.1:{args.port}/\n"
          "(local only; images never leave this machine. Ctrl-C stops it.)", flush=True)
    code = run_until_stopped(proc)  # Ctrl-C / SIGTERM: the server and its kernels stop before we exit
    print("cxrbench dashboard stopped", flush=True)
    return code


def _analyze(args: argparse.Namespace) -> int:
    import pandas as pd

    from cxrbench.app.dashboard import png_bytes
    from cxrbench.cli.classifier import expand_files, print_to_stderr
    from cxrbench.explain.overlay import overlay
    from cxrbench.export.runtime import backend_note, load_pipeline

    files = expand_files(args.files)
    if not files:
        raise ValueError("no input files")
    out = Path(args.out)
    stems = output_stems(files)
    refuse_overwriting_inputs(files, [out / "analysis.csv", *(out / "overlays" / f"{s}.png" for s in stems)])
    explain = None if args.explain == "none" else args.explain
    pipe = load_pipeline(args.classifier, ood=args.ood, backend=args.backend, progress=not args.quiet,
                         explain=explain, warn=print_to_stderr)
    if args.min_side is not None:
        pipe.guard = replace(pipe.guard, min_side=args.min_side)
    methods = pipe.classifier_backend.explain_methods
    if explain is not None and explain not in methods:
        fallback = methods[0] if methods else None
        print(f"note: the {pipe.classifier_backend.name} backend cannot explain with {explain}; "
              f"{f'using {fallback}' if fallback else 'no overlays'}", file=sys.stderr)
        explain = fallback
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    reports, errors = pipe.analyze_batch(files, explain=explain, allow_ood=args.allow_ood, progress=not args.quiet)
    rows = []
    for i, (f, r) in enumerate(zip(files, reports)):
        if r is None:
            rows.append({"file": f, "error": f"{Path(f).name}: cannot read it: {errors[i]}"})
            print(f"warning: {f}: {errors[i]}", file=sys.stderr)
            continue
        rows.append({**r.to_row(), "file": f})
        if r.maps is not None:
            png = png_bytes(overlay(r.image, r.maps[0], alpha=0.5))
            (out / "overlays" / f"{stems[i]}.png").write_bytes(png)
            rows[-1]["overlay"] = f"overlays/{stems[i]}.png"
    cols = ["file", *[c for f in pipe.findings for c in (f, f"{f}_raw")], "ood_score", "in_distribution", "check",
            "reason", "overlay", "error", "backend", "gate_backend"]  # overlay: the row's own file, relative to --out
    table = pd.DataFrame(rows).reindex(columns=cols)
    table["backend"], table["gate_backend"] = pipe.backends()["classifier"], pipe.backends()["gate"] or ""
    table.to_csv(out / "analysis.csv", index=False)
    checks = [r.ood.check for r in reports if r is not None and r.rejected and r.ood is not None]
    why = ", ".join(f"{checks.count(c)} {text}" for c, text in (("size", "too small"), ("information", "almost no "
                    "image content"), ("reconstruction", "unlike the chest X-rays it was trained on")) if c in checks)
    print(f"wrote {out / 'analysis.csv'}: {len(files)} files, {len(errors)} unreadable, {len(checks)} rejected by the "
          f"OOD gate{f' ({why})' if why else ''}{backend_note(pipe)}")
    return 0 if len(errors) < len(files) else 1


def add_app_commands(sub: Subcommands) -> None:
    """Register ``demo prepare``, ``demo serve`` and ``analyze``."""
    from cxrbench.explain import EXPLAINERS

    p = sub.add_parser("demo", help="train the demo bundles and serve the dashboard locally")
    dsub = p.add_subparsers(dest="demo_command", required=True, metavar="COMMAND")
    for name, func, helptext in (("prepare", _demo_prepare, "train (or reuse) the demo bundles"),
                                 ("serve", _demo_serve, "prepare, then serve the dashboard on 127.0.0.1")):
        q = dsub.add_parser(name, help=helptext)
        q.add_argument("--data", default=None,
                       help="data folder (default $CXRBENCH_DATA, ../shared/data/cxr, else phantoms)")
        q.add_argument("--out", default="build/demo", help="where the demo bundles are cached")
        q.add_argument("--counterfactual", action="store_true",
                       help="also train an autoencoder like the classifier (once, cached) for the dashboard's "
                            "'Counterfactual (slow)' panel; adds minutes to the first prepare")
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
    q.add_argument("--out", required=True, help=f"folder for analysis.csv and overlays/<stem>.png ({OUTPUT_NAMING})")
    q.add_argument("--explain", default="saliency", choices=("none", *EXPLAINERS),
                   help="explanation method for the overlays, or 'none' (ONNX Runtime explains with cam and "
                        "saliency: with --backend auto another gradient method keeps the classifier in PyTorch)")
    q.add_argument("--allow-ood", action="store_true",
                   help="give probabilities for rejected images too (not for images too small to see anything)")
    q.add_argument("--min-side", type=positive_int, default=None,
                   help="the blank-image guard's minimum short side in px (default: the OOD card's, else 64)")
    add_backend_argument(q)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_analyze)
