"""``cxrbench train classifier``, ``cxrbench evaluate`` and ``cxrbench predict``."""

from __future__ import annotations

import argparse
import glob
import sys
import weakref
from pathlib import Path

from cxrbench.cli.options import (
    Subcommands,
    add_backend_argument,
    add_run_folder_arguments,
    add_training_arguments,
    positive_int,
)

__all__ = ["add_classifier_commands", "expand_files", "print_to_stderr", "train_subparsers"]

#: each top-level registry -> the registry of its ``train`` group (one group however many families add to it)
_TRAIN_GROUPS: weakref.WeakKeyDictionary[Subcommands, Subcommands] = weakref.WeakKeyDictionary()


def expand_files(items: list[str]) -> list[str]:
    """Files from arguments: files as given, folders expanded to their images, globs expanded.

    A folder whose name ends in an image suffix (``x.png/``) is kept as an item, so that its row says it is a
    directory instead of the batch silently skipping it; entries of a folder are kept whatever their file type
    (a FIFO named ``*.png`` gets a "not a regular file" row from :func:`~cxrbench.io.read_image`, never a read).
    """
    from cxrbench.data.manifests import IMAGE_SUFFIXES

    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and p.suffix.lower() not in IMAGE_SUFFIXES:
            out += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif any(ch in item for ch in "*?[") and not p.exists():
            out += sorted(glob.glob(item, recursive=True))
        else:
            out.append(item)  # a missing file is reported per row, not fatal
    return out


def print_to_stderr(line: str) -> None:
    """How a command prints a warning: ``warning: ...`` on stderr (the ``warn`` of the backend chooser)."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _train_classifier(args: argparse.Namespace) -> int:
    from cxrbench.data import load_manifest, load_split
    from cxrbench.train import ClassifierConfig, train_classifier

    manifest = load_manifest(args.data, on_missing="drop")
    cfg = ClassifierConfig(
        arch=args.arch, image_size=args.size, in_channels=args.channels, normalize=args.normalize,
        equalize=args.equalize, pretrained=args.pretrained, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, early_stopping_patience=args.patience, use_pos_weight=not args.no_pos_weight,
        augment=not args.no_augment, seed=args.seed, num_workers=args.workers, device=args.device,
        max_steps_per_epoch=args.max_steps, labels=args.labels, monitor=args.monitor,
        eval_bootstrap=args.bootstrap, precision=args.precision)
    split = load_split(args.split, manifest) if args.split else None
    result = train_classifier(manifest, args.out, cfg, split=split, resume=args.resume, overwrite=args.overwrite,
                              progress=not args.quiet, data_description=str(args.data))
    if result.bundle is not None:
        s = result.summary
        macro = s.get("macro_auc", float("nan"))
        print(f"best epoch {result.best_epoch} of {result.epochs_run}; test macro AUC {macro:.3f} "
              f"({s.get('n_auc_defined', 0)} findings defined)")
        print(f"bundle: {result.bundle}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from cxrbench.evaluation.metrics import evaluate_predictions
    from cxrbench.inference.predict import operating_points_of, predictions_table
    from cxrbench.inference.recalibrate import labelled_outputs
    from cxrbench.models.bundle import load_bundle

    bundle = load_bundle(args.bundle, kind="classifier")
    res = labelled_outputs(bundle, args.data, split=args.split, subset=args.subset, batch_size=args.batch_size,
                           progress=not args.quiet)
    ops = operating_points_of(bundle)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = predictions_table(res.image_ids, res.logits, bundle.labels, ops, untrained=res.skipped)
    table.to_csv(out / "predictions.csv", index=False)
    evaluation, summary = evaluate_predictions(res.labels, res.probabilities, res.findings, ops,
                                               n_boot=args.bootstrap, seed=args.seed)
    evaluation.to_csv(out / "evaluation.csv", index=False)
    cols = ["finding", "n_pos", "auc", "auc_std_half_splits", "auc_ci_low", "auc_ci_high", "f1", "note"]
    print(evaluation[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if res.skipped:
        print(f"not evaluated, not trained by this model: {', '.join(res.skipped)}")
    print(f"macro AUC {summary['macro_auc']:.3f} over {summary['n_auc_defined']} findings with positives; "
          f"micro-F1 {summary['micro_f1']:.3f}, macro-F1 {summary['macro_f1']:.3f}, "
          f"Hamming loss {summary['hamming_loss']:.3f} (at the bundle's operating points)")
    print(f"wrote {out / 'predictions.csv'} and {out / 'evaluation.csv'} ({len(res.image_ids)} images)")
    return 0 if np.isfinite(summary["macro_auc"]) else 1


def _predict(args: argparse.Namespace) -> int:
    """The CSV of calibrated and raw probabilities, batched, on either backend; a warning per unreadable file;
    exit 1 when none was readable."""
    from cxrbench.cli.outputs import csv_output_path, report_problems
    from cxrbench.export.runtime import backend_note, load_pipeline

    files = expand_files(args.files)
    if not files:
        raise ValueError("no input files")
    out = csv_output_path(args.out, "predictions.csv", files)  # refused here when it is one of the inputs
    pipe = load_pipeline(args.bundle, backend=args.backend, progress=not args.quiet, explain=None,
                         warn=print_to_stderr)
    table = pipe.predict(files, batch_size=args.batch_size, progress=not args.quiet)
    table["backend"] = pipe.classifier_backend.name  # which runtime computed each row's probabilities
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    report_problems(table)
    failed, warned = table[table["error"] != ""], table[table["warning"] != ""]
    print(f"wrote {out}: {len(files) - len(failed)} predicted ({len(warned)} with a warning: see the warning "
          f"column), {len(failed)} unreadable{backend_note(pipe)}")
    return 0 if len(failed) < len(files) else 1


def train_subparsers(sub: Subcommands) -> Subcommands:
    """The ``train`` group of ``sub`` (created on first call; each model family adds its sub-command to it)."""
    if sub not in _TRAIN_GROUPS:
        p = sub.add_parser("train", help="train a model (classifier, ...)")
        _TRAIN_GROUPS[sub] = p.add_subparsers(dest="train_command", required=True, metavar="MODEL")
    return _TRAIN_GROUPS[sub]


def _info(args: argparse.Namespace) -> int:
    import json

    from cxrbench.models.bundle import describe_card, load_bundle

    for i, path in enumerate(args.bundles):
        bundle = load_bundle(path)  # checks the card, the architecture and the weights' checksum
        if args.json:
            print(json.dumps(bundle.card.to_dict(), indent=2))
            continue
        print(("\n" if i else "") + f"{path}")
        print("\n".join(f"  {line}" for line in describe_card(bundle.card)))
        print(f"  weights: {bundle.card.weights_sha256[:16]}… checksum verified, "
              f"{sum(p.numel() for p in bundle.model.parameters()):,} parameters")
    return 0


def add_classifier_commands(sub: Subcommands) -> None:
    """Register ``info``, ``train classifier``, ``evaluate`` and ``predict``."""
    q = sub.add_parser("info", help="what a bundle is: model, input, labels, training, calibration, test metrics")
    q.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folder(s) of any kind")
    q.add_argument("--json", action="store_true", help="print the whole card as JSON")
    q.set_defaults(func=_info)

    tsub = train_subparsers(sub)
    q = tsub.add_parser("classifier", help="train a multi-label classifier (Chester/CheXNet recipe defaults)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--data", required=True, help="dataset folder (any layout cxrbench reads)")
    q.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, bundle/")
    q.add_argument("--arch", default="densenet121", choices=("densenet121", "resnet18"))
    q.add_argument("--size", type=int, default=224, help="input side in pixels")
    q.add_argument("--channels", type=int, default=1, choices=(1, 3))
    q.add_argument("--normalize", default="minus1_1", choices=("zero_one", "minus1_1", "xrv", "imagenet"))
    q.add_argument("--equalize", default="none", choices=("none", "hist", "clahe"))
    q.add_argument("--pretrained", action="store_true", help="ImageNet weights (must be in the torch hub cache)")
    q.add_argument("--epochs", type=int, default=10)
    q.add_argument("--batch-size", type=positive_int, default=16)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--patience", type=int, default=3,
                   help="early stopping after this many epochs without improvement (0: off)")
    q.add_argument("--monitor", default="val_loss", choices=("val_loss", "val_auc"))
    q.add_argument("--no-pos-weight", action="store_true", help="plain BCE instead of per-finding pos_weight")
    q.add_argument("--no-augment", action="store_true")
    q.add_argument("--labels", nargs="+", default=None, help="label columns (default: the dataset's)")
    add_training_arguments(q)
    q.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the test AUC CIs")
    q.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 autocast + channels_last on CUDA and on CPUs with avx512_bf16 or AMX, else fp32 "
                        "(recorded in the bundle's card)")
    add_run_folder_arguments(q)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_train_classifier)

    q = sub.add_parser("evaluate", help="per-finding AUC with spread and CI, F1 at the operating points")
    q.add_argument("--bundle", required=True)
    q.add_argument("--data", required=True, help="labelled dataset folder")
    q.add_argument("--split", default=None, help="split CSV; evaluate only --subset of it")
    q.add_argument("--subset", default="test")
    q.add_argument("--out", required=True, help="folder for predictions.csv and evaluation.csv")
    q.add_argument("--batch-size", type=positive_int, default=32)
    q.add_argument("--bootstrap", type=int, default=1000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_evaluate)

    q = sub.add_parser("predict", help="calibrated and raw probabilities for image files, to CSV")
    q.add_argument("--bundle", required=True)
    q.add_argument("files", nargs="+", help="image files, folders or globs")
    q.add_argument("--out", required=True, help="CSV to write; an existing folder (or a path ending in /) gets "
                                                "predictions.csv inside it; never one of the inputs")
    q.add_argument("--batch-size", type=positive_int, default=16)
    add_backend_argument(q)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_predict)
