"""``cxrbench export`` and ``cxrbench export-web``.

(``--backend onnx`` of ``predict`` and ``analyze`` is their own option: the same
:class:`~cxrbench.inference.pipeline.Pipeline` on :mod:`cxrbench.export.runtime`'s backends.)"""

from __future__ import annotations

import argparse
import time

from cxrbench.cli.options import Subcommands

__all__ = ["add_export_commands"]


def _parity_images(args: argparse.Namespace):
    from cxrbench.export.onnx import default_parity_images

    if args.images:
        from cxrbench.cli.classifier import expand_files

        files = expand_files(args.images)
        if not files:
            raise ValueError("--images matched no files")
        return files[: args.n_images], "given images"
    return default_parity_images(args.n_images)


def _print_parity(parity) -> None:
    cols = ["graph", "output", "n_images", "max_abs_diff", "mean_abs_diff", "tolerance", "outside_tolerance", "passed"]
    print(parity[cols].to_string(index=False, float_format=lambda v: f"{v:.2e}"))


def _export(args: argparse.Namespace) -> int:
    from cxrbench.export.onnx import export_models
    from cxrbench.models.bundle import load_bundle

    t0 = time.perf_counter()
    images, source = _parity_images(args)
    result = export_models(load_bundle(args.bundle, kind="classifier"), args.out,
                           load_bundle(args.ood, kind="ood") if args.ood else None, images=images,
                           tolerance=args.tolerance, opset=args.opset, threads=args.threads,
                           saliency=not args.no_saliency)
    _print_parity(result.parity)
    graphs = ", ".join(f"{g['file']} ({g['bytes'] / 1e6:.1f} MB)" for g in result.manifest["graphs"].values())
    print(f"parity on {len(images)} images ({source}): max |logit diff| {result.max_logit_diff:.2e} "
          f"<= {args.tolerance:g}")
    print(f"wrote {result.path}: {graphs} in {time.perf_counter() - t0:.1f} s")
    return 0


def _export_web(args: argparse.Namespace) -> int:
    from cxrbench.export.web import export_web, serve

    t0 = time.perf_counter()
    images = _parity_images(args)[0]
    out = export_web(args.bundle, args.out, args.ood, images=images, tolerance=args.tolerance, npm_dir=args.npm_dir,
                     saliency=not args.no_saliency)
    print(f"wrote the web app to {out} in {time.perf_counter() - t0:.1f} s; serve it over http, e.g.\n"
          f"  python -m http.server -b 127.0.0.1 -d {out} 8000")
    if args.serve is not None:
        server = serve(out, args.serve, isolate=True)
        print(f"serving on {server.url} (local only; images never leave the page). Ctrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.close()
    return 0


def _add_parity_options(q: argparse.ArgumentParser) -> None:
    q.add_argument("--images", nargs="+", default=None,
                   help="parity-check images (files, folders, globs); default: real NIH images from the shared data")
    q.add_argument("--n-images", type=int, default=8, help="how many parity images")
    q.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed |logit difference| torch vs ONNX Runtime (saliency maps: relative to "
                        "their maximum, on all but 0.5%% of the pixels)")
    q.add_argument("--no-saliency", action="store_true",
                   help="skip saliency.onnx, the forward + input-gradient graph (DenseNet-121: minutes to export)")


def add_export_commands(sub: Subcommands) -> None:
    """Register ``export`` (ONNX) and ``export-web`` (the in-browser app)."""
    q = sub.add_parser("export", help="export a classifier (+ OOD) bundle to ONNX, parity-checked against PyTorch",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--bundle", required=True, help="classifier bundle")
    q.add_argument("--ood", default=None, help="OOD bundle (ALI or autoencoder)")
    q.add_argument("--out", required=True,
                   help="folder for classifier.onnx, cam.onnx, ood.onnx, export.json, parity.csv")
    _add_parity_options(q)
    q.add_argument("--opset", type=int, default=17)
    q.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for the check")
    q.set_defaults(func=_export)

    q = sub.add_parser("export-web", help="write a static web app that runs the models inside the browser",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--bundle", required=True, help="classifier bundle, or a folder written by 'cxrbench export'")
    q.add_argument("--ood", default=None, help="OOD bundle for the gate")
    q.add_argument("--out", required=True, help="folder for index.html, app.js, config.json, models/, onnxruntime-web")
    _add_parity_options(q)
    q.add_argument("--npm-dir", default=None, help="where onnxruntime-web is installed once "
                                                   "(default $CXRBENCH_NPM_DIR or ~/.cache/cxrbench/npm)")
    q.add_argument("--serve", type=int, default=None, metavar="PORT", help="then serve the app on 127.0.0.1:PORT")
    q.set_defaults(func=_export_web)
