"""``cxrbench train ood``, ``cxrbench train autoencoder``, ``cxrbench ood-score`` and ``cxrbench ood-tradeoff``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrbench.cli.classifier import expand_files, print_to_stderr, train_subparsers
from cxrbench.cli.options import (
    Subcommands,
    add_backend_argument,
    add_run_folder_arguments,
    add_training_arguments,
    positive_int,
)

__all__ = ["add_ood_commands"]


def _train_ood(args: argparse.Namespace) -> int:
    from cxrbench.data import load_manifest, load_split
    from cxrbench.train import OODConfig, train_ood

    manifest = load_manifest(args.data, on_missing="drop")
    cfg = OODConfig(model=args.model, latent_dim=args.latent, width=args.width, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, recon_weight=args.recon_weight, ae_loss=args.loss,
                    percentile=args.percentile, scorer=args.scorer, seed=args.seed, device=args.device,
                    num_workers=args.workers, max_steps_per_epoch=args.max_steps)
    split = load_split(args.split, manifest) if args.split else None
    result = train_ood(manifest, args.out, cfg, split=split, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.quiet, data_description=str(args.data))
    cutoff = result.cutoff
    assert cutoff is not None
    print(f"best epoch {result.best_epoch} of {result.epochs_run} (val median SSIM {result.best_value:.3f}); "
          f"{result.train_seconds:.0f} s of training")
    print(f"cutoff: {cutoff.scorer} > {cutoff.threshold:.4f} is OOD ({cutoff.method})")
    print(f"bundle: {result.bundle}")
    return 0


def _train_autoencoder(args: argparse.Namespace) -> int:
    from cxrbench.data import load_manifest, load_split
    from cxrbench.train.autoencoder import AutoencoderConfig, classifier_preprocess, train_autoencoder

    manifest = load_manifest(args.data, on_missing="drop")
    like = classifier_preprocess(args.like) if args.like else None
    cfg = AutoencoderConfig(image_size=args.size, preprocess_like=like, like=str(args.like or ""),
                            latent_dim=args.latent, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, ae_loss=args.loss, seed=args.seed, device=args.device,
                            num_workers=args.workers, max_steps_per_epoch=args.max_steps)
    split = load_split(args.split, manifest) if args.split else None
    result = train_autoencoder(manifest, args.out, cfg, split=split, resume=args.resume, overwrite=args.overwrite,
                               progress=not args.quiet, data_description=str(args.data))
    print(f"best epoch {result.best_epoch} of {result.epochs_run} (val median SSIM {result.best_value:.3f}); "
          f"{result.train_seconds:.0f} s of training; {cfg.image_size} px")
    print(f"bundle: {result.bundle}")
    return 0


def _ood_score(args: argparse.Namespace) -> int:
    from cxrbench.cli.outputs import csv_output_path
    from cxrbench.export.runtime import BACKEND_NAMES, load_gate, model_backend
    from cxrbench.ood.scoring import score_files

    files = expand_files(args.files)
    if not files:
        raise ValueError("no input files")
    out = csv_output_path(args.out, "ood_scores.csv", files)  # refused here when it is one of the inputs
    bundle = load_gate(args.bundle, backend=args.backend, progress=not args.quiet, warn=print_to_stderr)
    table = score_files(bundle, files, batch_size=args.batch_size, min_side=args.min_side)
    table["backend"] = model_backend(bundle.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    failed = table["error"].astype(bool)
    for f, reason in zip(table.loc[failed, "file"], table.loc[failed, "error"]):
        print(f"warning: {f}: {reason}", file=sys.stderr)
    n_ood = int((table["check"] == "reconstruction").sum())
    n_guard = int(table["check"].isin(["size", "information"]).sum())
    cutoff = bundle.card.ood.get("cutoff", {})
    print(f"wrote {out}: {len(files) - int(failed.sum()) - n_guard} scored ({n_ood} out-of-distribution at "
          f"{cutoff.get('scorer')} > {cutoff.get('threshold', float('nan')):.4f}), {n_guard} rejected by the "
          f"blank-image guard (too small or almost no image content; see the reason column), "
          f"{int(failed.sum())} unreadable ({BACKEND_NAMES[model_backend(bundle.model)]})")
    return 0 if failed.sum() < len(files) else 1


def _ood_tradeoff(args: argparse.Namespace) -> int:
    """Chester Fig. 6 on the user's data: the classifier's AUC on what the gate keeps, as the cutoff tightens."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    from cxrbench.data import load_manifest
    from cxrbench.models.bundle import load_bundle
    from cxrbench.ood.sets import unseen_rows
    from cxrbench.ood.tradeoff import rotation_tradeoff, shifted_set_tradeoff, skill_warning
    from cxrbench.plots.ood import rotation_figure, tradeoff_figure

    clf, gate = load_bundle(args.classifier, kind="classifier"), load_bundle(args.ood, kind="ood")
    manifest = load_manifest(args.data, on_missing="drop")
    rows = unseen_rows(gate, unseen_rows(clf, manifest))  # neither model trained or calibrated on them
    if args.max_images and len(rows) > args.max_images:
        rows = rows.sample(args.max_images, random_state=0).reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"{args.data}: no image left that neither bundle trained or calibrated on")
    print(f"{len(rows)} of {len(manifest)} images are unseen by both bundles")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rotate:
        per_angle, sweep = rotation_tradeoff(clf, gate, rows, args.rotate, n_points=args.points,
                                             n_bootstrap=args.bootstrap)
        per_angle.to_csv(out / "per_angle.csv", index=False)
        rotation_figure(per_angle).savefig(out / "rotation.png", dpi=120)
        print(per_angle.round(3).to_string(index=False))
        title = f"{len(rows)} images x {len(args.rotate)} rotations"
    else:
        sweep = shifted_set_tradeoff(clf, gate, rows, n_points=args.points, n_bootstrap=args.bootstrap)
        title = f"{len(rows)} images of {Path(args.data).name}"
    sweep.to_csv(out / "tradeoff.csv", index=False)
    tradeoff_figure(sweep, title=title).savefig(out / "tradeoff.png", dpi=120)
    summary = [("all images", sweep.iloc[int(np.argmax(sweep["retained_fraction"].to_numpy()))])]
    if sweep["bundle_cutoff"].any():
        summary.append(("bundle cutoff", sweep[sweep["bundle_cutoff"]].iloc[0]))
    for label, row in summary:
        ci = f" [{row['auc_macro_ci_low']:.3f}, {row['auc_macro_ci_high']:.3f}]" if "auc_macro_ci_low" in row else ""
        print(f"{label}: {row['retained_fraction']:.1%} retained, macro AUC {row['auc_macro']:.3f}{ci}")
    warning = skill_warning(sweep)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    extra = ", per_angle.csv and rotation.png" if args.rotate else ""
    print(f"wrote {out / 'tradeoff.csv'} and tradeoff.png{extra}")
    return 0


def _add_train_autoencoder(tsub: Subcommands) -> None:
    """``cxrbench train autoencoder``: the OOD family's autoencoder at a classifier's resolution."""
    q = tsub.add_parser("autoencoder", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        help="train an autoencoder at a classifier's resolution (for Latent Shift counterfactuals)")
    q.add_argument("--data", required=True, help="dataset folder (the classifier's training data)")
    q.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, bundle/ (kind autoencoder)")
    q.add_argument("--like", default=None, help="classifier bundle whose input size, crop and equalisation to match")
    q.add_argument("--size", type=positive_int, default=96, help="input side without --like (a multiple of 16)")
    q.add_argument("--latent", type=int, default=128, help="latent size Z")
    q.add_argument("--width", type=int, default=16, help="channels of the first conv block")
    q.add_argument("--epochs", type=int, default=30)
    q.add_argument("--batch-size", type=positive_int, default=32)
    q.add_argument("--lr", type=float, default=None, help="default 1e-3")
    q.add_argument("--loss", default="l1", help="reconstruction loss, l1, mse or mse+ssim")
    add_training_arguments(q)
    add_run_folder_arguments(q)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_train_autoencoder)


def add_ood_commands(sub: Subcommands) -> None:
    """Register ``train ood`` (in the shared ``train`` group), ``ood-score`` and ``ood-tradeoff``."""
    tsub = train_subparsers(sub)
    q = tsub.add_parser("ood", help="train the OOD gate (autoencoder or ALI, 64 px) and fit its cutoff",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--data", required=True, help="in-distribution dataset folder (any layout cxrbench reads)")
    q.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, scores, bundle/")
    q.add_argument("--model", default="autoencoder", choices=("autoencoder", "ali"))
    q.add_argument("--latent", type=int, default=128, help="latent size Z")
    q.add_argument("--width", type=int, default=16, help="channels of the first conv block (16 on CPU, 32 on GPU)")
    q.add_argument("--epochs", type=int, default=30)
    q.add_argument("--batch-size", type=positive_int, default=32)
    q.add_argument("--lr", type=float, default=None, help="default 1e-3 (autoencoder), 5e-4 (ALI)")
    q.add_argument("--recon-weight", type=float, default=5.0, help="ALI: weight of the L1 reconstruction term")
    q.add_argument("--loss", default="l1", help="autoencoder: reconstruction loss, l1, mse or mse+ssim")
    q.add_argument("--percentile", type=float, default=95.0,
                   help="cutoff = this percentile of the validation scores "
                   "(about 100 - p %% of in-distribution images are rejected)")
    q.add_argument("--scorer", default="ssim", choices=("ssim", "l1", "l2", "latent"),
                   help="the gate's score (ssim means 1 - SSIM; higher = more OOD)")
    add_training_arguments(q)
    add_run_folder_arguments(q)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_train_ood)

    _add_train_autoencoder(tsub)

    q = sub.add_parser("ood-score", help="OOD scores of image files under an OOD bundle, to CSV")
    q.add_argument("--bundle", required=True, help="an OOD bundle (cxrbench train ood)")
    q.add_argument("files", nargs="+", help="image files, folders or globs")
    q.add_argument("--out", required=True, help="CSV: file, l1, l2, ssim (1 - SSIM), latent, score, is_ood, check, "
                                                "reason, error, backend; an existing folder (or a path ending in /) "
                                                "gets ood_scores.csv")
    q.add_argument("--batch-size", type=positive_int, default=64)
    q.add_argument("--min-side", type=positive_int, default=None,
                   help="the blank-image guard's minimum short side in px (default: the card's, else 64)")
    add_backend_argument(q, gate_only=True)
    q.add_argument("-q", "--quiet", action="store_true", help="do not announce a first-use ONNX export")
    q.set_defaults(func=_ood_score)

    q = sub.add_parser("ood-tradeoff", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="the classifier's AUC on the images the OOD gate keeps, as its cutoff tightens "
                            "(Chester Fig. 6)")
    q.add_argument("--classifier", required=True, help="a classifier bundle")
    q.add_argument("--ood", required=True, help="an OOD bundle")
    q.add_argument("--data", required=True,
                   help="a labelled dataset folder sharing label names with the classifier; images either bundle "
                        "trained or calibrated on (its split file) are left out")
    q.add_argument("--rotate", type=float, nargs="+", default=None, metavar="DEGREES",
                   help="also rotate every image by each angle (a growing shift); default: the images as they are")
    q.add_argument("--points", type=int, default=19, help="cutoffs in the sweep")
    q.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the AUC's 95%% CI")
    q.add_argument("--max-images", type=int, default=0, help="random subset of this size (0: all)")
    q.add_argument("--out", required=True, help="folder: tradeoff.csv, tradeoff.png (+ per_angle.csv, rotation.png)")
    q.set_defaults(func=_ood_tradeoff)
