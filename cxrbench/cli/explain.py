"""``cxrbench train unet``, ``cxrbench segment`` and ``cxrbench explain``.

Both per-file commands read every file they are given; an unreadable file gets a row with its
reason in the summary CSV and a warning on stderr, and the run goes on (exit code 1 only when no
file could be processed).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrbench.cli.options import Subcommands, add_backend_argument, device_name, positive_int, probability
from cxrbench.cli.outputs import OUTPUT_NAMING, output_stems, refuse_overwriting_inputs, report_problems

if TYPE_CHECKING:
    import pandas as pd

    from cxrbench.inference.pipeline import Pipeline

__all__ = ["add_explain_commands", "explain_files", "segment_files"]


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


# --------------------------------------------------------------------------------------------------
# segment


def segment_files(bundle_path: str, files: Sequence[str], out_dir: str, *, threshold: float = 0.5,
                  progress: bool = False, backend: str = "torch") -> pd.DataFrame:
    """Lung masks for image files with a segmentation bundle, its U-Net on ``backend``
    (:func:`cxrbench.export.runtime.load_segmenter`: ``auto``, the CLI's default, runs ``unet.onnx`` on ONNX
    Runtime, exported once into the cache and parity-checked; PyTorch where that fails, after one warning).

    Each mask is written as ``OUT/<stem>_lung.png`` (uint8 0/255) at the size of the displayed crop
    (the image's central square, source pixels); ``stem`` is unique per input
    (:func:`cxrbench.cli.outputs.output_stems`). Returns the summary table written to
    ``OUT/segment_summary.csv``: ``file, mask, side, lung_fraction, seconds, error``. An output that would
    overwrite an input is refused before anything is read.
    """
    import pandas as pd

    from cxrbench.cli.classifier import print_to_stderr
    from cxrbench.export.runtime import load_segmenter, model_backend
    from cxrbench.io import ImageReadError, read_image
    from cxrbench.models.unet import predict_lung_mask

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be strictly between 0 and 1 (a probability), got {threshold}")
    out = Path(out_dir)
    stems = output_stems(files)
    refuse_overwriting_inputs(files, [out / "segment_summary.csv", *(out / f"{s}_lung.png" for s in stems)])
    bundle = load_segmenter(bundle_path, backend=backend, progress=progress, warn=print_to_stderr)
    out.mkdir(parents=True, exist_ok=True)
    pp = bundle.preprocess
    rows: list[dict[str, Any]] = []
    items = list(zip(files, stems))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="segmenting", unit="img")
    for f, stem in items:
        row: dict[str, Any] = {"file": f, "mask": "", "side": np.nan, "lung_fraction": np.nan, "seconds": np.nan,
                               "error": ""}
        t0 = time.perf_counter()
        try:
            pixels = read_image(f).pixels
            display = pp.replace(size=max(8, min(pixels.shape))).geometry(pixels)  # the square crop, no resize
            mask, _ = predict_lung_mask(bundle.model, pp, display, threshold=threshold)
        except (ImageReadError, ValueError) as exc:
            row["error"] = exc.reason if isinstance(exc, ImageReadError) else f"{Path(f).name}: {exc}"
        else:
            target = out / f"{stem}_lung.png"
            _save_png(target, mask.astype(np.uint8) * 255)
            row.update(mask=str(target), side=int(mask.shape[0]), lung_fraction=float(mask.mean()),
                       seconds=time.perf_counter() - t0)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["file", "mask", "side", "lung_fraction", "seconds", "error"])
    table["side"] = table["side"].astype("Int64")
    table.attrs["backend"] = model_backend(bundle.model)
    table.to_csv(out / "segment_summary.csv", index=False)
    return table


def _segment(args: argparse.Namespace) -> int:
    from cxrbench.cli.classifier import expand_files
    from cxrbench.export.runtime import BACKEND_NAMES

    files = expand_files(args.files)
    if not files:
        raise ValueError("no input files")
    table = segment_files(args.bundle, files, args.out, threshold=args.threshold, progress=not args.quiet,
                          backend=args.backend)
    report_problems(table, ("error",))
    failed = table[table["error"] != ""]
    print(f"wrote {len(table) - len(failed)} masks and {Path(args.out) / 'segment_summary.csv'} "
          f"({len(failed)} unreadable) ({BACKEND_NAMES[table.attrs['backend']]})")
    return 0 if len(failed) < len(table) else 1


# --------------------------------------------------------------------------------------------------
# explain


def explain_files(bundle_path: str, method: str, files: Sequence[str], out_dir: str, *,
                  targets: Sequence[str] | None = None, top: int = 3, sigma: float | None = None,
                  cmap: str = "jet", alpha: float = 0.5, progress: bool = False,
                  autoencoder: str | None = None) -> pd.DataFrame:
    """Explanation maps and overlays for image files with a classifier bundle.

    Per file (``stem`` = file name without suffix, unique per input: :func:`cxrbench.cli.outputs.output_stems`;
    an output that would overwrite an input is refused before anything is read): ``OUT/<stem>_<method>.npy``
    with the raw maps, (F, S, S) float32 at the classifier's input size S, in the order of the ``targets`` column;
    ``OUT/<stem>_<method>_<finding>.png`` overlays (RGB) on the displayed crop; for several findings
    also ``OUT/<stem>_<method>_all.png`` (all findings at once, Chester Fig. 8).

    ``method="latent_shift"`` (the Latent Shift counterfactual) needs ``autoencoder``, an autoencoder bundle at the
    classifier's resolution (refused before any file is read when it is missing or made for another input). Its
    maps are the difference maps ``|reconstruction - counterfactual|`` (what the dashboard's panel shows over the
    image); per finding it also writes ``OUT/<stem>_latent_shift_<finding>_frames.npy`` (T, S, S) float32 [0, 1]
    and ``..._frames.png``, the frames from the reconstruction to the counterfactual with the finding's
    probability under each, and the table gets ``frames``, ``frame_probabilities`` and ``stop`` columns.

    ``targets``: finding names; default: the ``top`` most probable findings (calibrated when the
    bundle has operating points), or all findings summed for ``method="saliency"``
    (:func:`cxrbench.explain.targets.explanation_targets`). Each image goes through
    :meth:`cxrbench.inference.pipeline.Pipeline.analyze` (no gate: ``use_gate=False``). A file that is
    low-dynamic-range, or that the gate's blank-image guard would reject, is explained anyway, with a
    ``warning`` in its row (and on stderr from ``cxrbench explain``). Returns the table written to
    ``OUT/explain_summary.csv``.
    """
    import pandas as pd

    from cxrbench.explain import COUNTERFACTUAL_EXPLAINERS, EXPLAINERS
    from cxrbench.explain.targets import explanation_targets
    from cxrbench.inference.pipeline import Pipeline

    if method not in EXPLAINERS + COUNTERFACTUAL_EXPLAINERS:
        raise ValueError(f"unknown method {method!r}; choose one of {EXPLAINERS + COUNTERFACTUAL_EXPLAINERS}")
    _check_autoencoder_choice(bundle_path, method, autoencoder)
    out = Path(out_dir)
    stems = output_stems(files)
    refuse_overwriting_inputs(files, [out / "explain_summary.csv"],
                              prefixes=[(out / f"{s}_{method}", (".npy", ".png")) for s in stems])
    pipe = Pipeline.from_paths(bundle_path, autoencoder=autoencoder)
    # unknown findings or a bad --top fail here, before any file is read
    explanation_targets(method, pipe.findings, targets, ranking=range(len(pipe.findings)), top=top,
                        untrained=pipe.untrained)
    out.mkdir(parents=True, exist_ok=True)
    items = list(zip(files, stems))
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"explaining ({method})", unit="img")
    rows = [_explain_file(pipe, f, stem, out, method, targets, top=top, sigma=sigma, cmap=cmap, alpha=alpha)
            for f, stem in items]
    columns = ["file", "method", "targets", "raw_probabilities", "maps", "overlays", "seconds", "error", "warning"]
    if method in COUNTERFACTUAL_EXPLAINERS:
        columns += list(COUNTERFACTUAL_COLUMNS)
    table = pd.DataFrame(rows, columns=columns).fillna({c: "" for c in COUNTERFACTUAL_COLUMNS if c in columns})
    table.to_csv(out / "explain_summary.csv", index=False)
    return table


#: the columns ``explain_summary.csv`` has for Latent Shift only (one entry per finding, ``|``-separated)
COUNTERFACTUAL_COLUMNS = ("frames", "frame_probabilities", "stop")


def _check_autoencoder_choice(bundle_path: str, method: str, autoencoder: str | None) -> None:
    """Latent Shift needs an autoencoder bundle and the other methods use none: both refused in words."""
    from cxrbench.explain import COUNTERFACTUAL_EXPLAINERS
    from cxrbench.explain.latent_shift import NO_AUTOENCODER, NoAutoencoderError

    if method in COUNTERFACTUAL_EXPLAINERS and not autoencoder:
        raise NoAutoencoderError(f"{bundle_path}: {NO_AUTOENCODER.replace('CLASSIFIER_BUNDLE', str(bundle_path))} "
                                 "(give its bundle with --autoencoder)")
    if autoencoder and method not in COUNTERFACTUAL_EXPLAINERS:
        raise ValueError(f"--autoencoder {autoencoder}: only {', '.join(COUNTERFACTUAL_EXPLAINERS)} uses an "
                         f"autoencoder, not {method}; leave it out or choose --method latent_shift")


def _write_counterfactuals(report: Any, stem: str, out: Path) -> dict[str, str]:
    """Each Latent Shift counterfactual's frames (``.npy`` and a captioned strip ``.png``); the row's columns."""
    from cxrbench.app.counterfactual import frame_captions
    from cxrbench.explain.overlay import captioned_strip

    names, probabilities = [], []
    for name, cf in zip(report.map_labels, report.counterfactuals):
        base = out / f"{stem}_latent_shift_{_file_safe(name)}_frames"
        np.save(base.with_suffix(".npy"), cf.frames.astype(np.float32), allow_pickle=False)
        captions = frame_captions(cf, list(range(len(cf.frames))), name)
        _save_png(base.with_suffix(".png"), captioned_strip(cf.frames, [c.replace("λ", "lambda") for c in captions]))
        names.append(f"{base.name}.npy")
        probabilities.append(">".join(f"{p:.4f}" for p in cf.probabilities))
    return {"frames": "|".join(names), "frame_probabilities": "|".join(probabilities),
            "stop": "|".join(cf.stop for cf in report.counterfactuals)}


def _file_safe(finding: str) -> str:
    """A finding's name as it appears in output file names."""
    return finding.replace(" ", "_").replace("+", "-")


def _explain_file(pipe: Pipeline, f: str, stem: str, out: Path, method: str, targets: Sequence[str] | None, *, top: int,
                  sigma: float | None, cmap: str, alpha: float) -> dict[str, Any]:
    """One row of ``explain_summary.csv``; writes the file's ``.npy`` maps and overlays."""
    from cxrbench.explain import overlay, overlay_all_findings
    from cxrbench.inference.predict import input_warning
    from cxrbench.io import ImageReadError

    row: dict[str, Any] = {"file": f, "method": method, "targets": "", "raw_probabilities": "", "maps": "",
                           "overlays": "", "seconds": np.nan, "error": "", "warning": ""}
    t0 = time.perf_counter()
    try:
        report = pipe.analyze(f, explain=method, targets=targets, top=top, use_gate=False,
                              explain_options={"normalize": None, "sigma": sigma})  # the raw maps
    except (ImageReadError, ValueError) as exc:
        row["error"] = exc.reason if isinstance(exc, ImageReadError) else f"{Path(f).name}: {exc}"
        return row
    assert report.meta is not None and report.ood is not None
    row["warning"] = "; ".join(w for w in (input_warning(report.meta), report.ood.reason) if w)
    maps, names = report.maps, report.map_labels
    assert maps is not None and report.raw is not None  # analyze explains every image it does not reject (no gate)
    np.save(out / f"{stem}_{method}.npy", maps.astype(np.float32), allow_pickle=False)
    written = []
    for name, heat in zip(names, maps):
        target = out / f"{stem}_{method}_{_file_safe(name)}.png"
        _save_png(target, overlay(report.image, heat, cmap=cmap, alpha=alpha))
        written.append(target.name)
    if len(names) > 1:
        target = out / f"{stem}_{method}_all.png"
        _save_png(target, overlay_all_findings(report.image, maps, names))
        written.append(target.name)
    probabilities = "|".join(f"{report.raw[i]:.4f}" for i in report.explained_outputs)
    if report.counterfactuals:
        row.update(_write_counterfactuals(report, stem, out))
    row.update(targets="|".join(names), raw_probabilities=probabilities, maps=f"{stem}_{method}.npy",
               overlays="|".join(written), seconds=time.perf_counter() - t0)
    return row


def _explain(args: argparse.Namespace) -> int:
    from cxrbench.cli.classifier import expand_files

    files = expand_files(args.files)
    if not files:
        raise ValueError("no input files")
    table = explain_files(args.bundle, args.method, files, args.out, targets=args.targets, top=args.top,
                          sigma=args.sigma, cmap=args.cmap, alpha=args.alpha, progress=not args.quiet,
                          autoencoder=args.autoencoder)
    report_problems(table)
    failed, warned = table[table["error"] != ""], table[table["warning"] != ""]
    print(f"explained {len(table) - len(failed)} images with {args.method} ({len(warned)} with a warning); wrote "
          f"maps, overlays and {Path(args.out) / 'explain_summary.csv'} ({len(failed)} unreadable)")
    return 0 if len(failed) < len(table) else 1


# --------------------------------------------------------------------------------------------------
# train unet


def _train_unet(args: argparse.Namespace) -> int:
    import torch

    from cxrbench.data import load_manifest, load_split
    from cxrbench.train import UNetConfig, train_unet

    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = load_manifest(args.data, on_missing="drop")
    cfg = UNetConfig(image_size=args.size, base_channels=args.base_channels, depth=args.depth, epochs=args.epochs,
                     batch_size=args.batch_size, lr=args.lr, dice_weight=args.dice_weight, augment=not args.no_augment,
                     seed=args.seed, device=args.device, max_steps_per_epoch=args.max_steps)
    split = load_split(args.split, manifest) if args.split else None
    result = train_unet(manifest, args.out, cfg, split=split, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.quiet, data_description=str(args.data))
    s = result.summary
    if s:
        print(f"best epoch {result.best_epoch} of {result.epochs_run}; test Dice {s['dice_mean']:.4f} "
              f"(sd {s['dice_std']:.4f}), IoU {s['iou_mean']:.4f} on {s['n_images']} images of "
              f"{s['n_patients']} test patients")
    print(f"bundle: {result.bundle}")
    return 0


def add_explain_commands(sub: Subcommands) -> None:
    """Register ``train unet``, ``segment`` and ``explain``."""
    from cxrbench.cli.classifier import train_subparsers
    from cxrbench.cli.options import add_run_folder_arguments
    from cxrbench.explain import COUNTERFACTUAL_EXPLAINERS, EXPLAINERS

    tsub = train_subparsers(sub)
    q = tsub.add_parser("unet", help="train the lung U-Net on image + mask pairs (mask 127 = ignore)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--data", required=True, help="folder with images/ and masks/ (e.g. shared/data/cxr/masks)")
    q.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, bundle/")
    q.add_argument("--size", type=int, default=128, help="input side in pixels")
    q.add_argument("--base-channels", type=int, default=16)
    q.add_argument("--depth", type=int, default=4)
    q.add_argument("--epochs", type=int, default=30)
    q.add_argument("--batch-size", type=positive_int, default=8)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--dice-weight", type=float, default=1.0,
                   help="weight of the soft Dice loss added to BCE (0: BCE only)")
    q.add_argument("--no-augment", action="store_true")
    q.add_argument("--split", default=None, help="split CSV to use (default: patient split 70/10/20)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", type=device_name, default="auto")
    q.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    q.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
    add_run_folder_arguments(q)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_train_unet)

    q = sub.add_parser("segment", help="lung masks (PNG 0/255) for image files with a U-Net bundle")
    q.add_argument("--bundle", required=True, help="segmentation bundle folder")
    q.add_argument("files", nargs="+", help="image files, folders or globs")
    q.add_argument("--out", required=True, help=f"folder for <stem>_lung.png and segment_summary.csv ({OUTPUT_NAMING})")
    q.add_argument("--threshold", type=probability, default=0.5,
                   help="probability above which a pixel is lung (strictly between 0 and 1)")
    add_backend_argument(q, what="the U-Net")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_segment)

    q = sub.add_parser("explain", help="explanation maps (.npy) and overlays (PNG) for image files")
    q.add_argument("--bundle", required=True, help="classifier bundle folder")
    q.add_argument("--method", default="saliency", choices=EXPLAINERS + COUNTERFACTUAL_EXPLAINERS,
                   help="latent_shift: the Latent Shift counterfactual (slow; needs --autoencoder): difference maps "
                        "and the frames from the reconstruction to the counterfactual")
    q.add_argument("--autoencoder", default=None, metavar="BUNDLE",
                   help="autoencoder bundle at the classifier's resolution, for --method latent_shift "
                        "(cxrbench train autoencoder --like CLASSIFIER_BUNDLE)")
    q.add_argument("files", nargs="+", help="image files, folders or globs")
    q.add_argument("--out", required=True,
                   help=f"folder for <stem>_<method>.npy maps, overlays and explain_summary.csv ({OUTPUT_NAMING})")
    q.add_argument("--targets", nargs="+", default=None, metavar="FINDING",
                   help="findings to explain (default: the --top most probable; saliency: all findings summed)")
    q.add_argument("--top", type=positive_int, default=3, help="how many of the most probable findings to explain")
    q.add_argument("--sigma", type=float, default=None, help="Gaussian smoothing of the maps, in pixels")
    q.add_argument("--cmap", default="jet", help="matplotlib colour map of the overlays")
    q.add_argument("--alpha", type=float, default=0.5, help="opacity of the overlay")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_explain)
