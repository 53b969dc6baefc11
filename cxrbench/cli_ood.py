"""``cxrbench train ood`` and ``cxrbench ood-score``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_classifier import expand_files, train_subparsers

__all__ = ["add_ood_commands"]


def _train_ood(args: argparse.Namespace) -> int:
    from .data import load_manifest, load_split
    from .train import OODConfig, train_ood

    manifest = load_manifest(args.data, on_missing="drop")
    cfg = OODConfig(model=args.model, latent_dim=args.latent, width=args.width, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, recon_weight=args.recon_weight,
                    percentile=args.percentile, scorer=args.scorer, seed=args.seed, device=args.device,
                    num_workers=args.workers, max_steps_per_epoch=args.max_steps)
    split = load_split(args.split, manifest) if args.split else None
    result = train_ood(manifest, args.out, cfg, split=split, resume=args.resume, progress=not args.quiet,
                       data_description=str(args.data))
    cutoff = result.cutoff
    assert cutoff is not None
    print(f"best epoch {result.best_epoch} of {result.epochs_run} (val median SSIM {result.best_value:.3f}); "
          f"{result.train_seconds:.0f} s of training")
    print(f"cutoff: {cutoff.scorer} > {cutoff.threshold:.4f} is OOD ({cutoff.method})")
    print(f"bundle: {result.bundle}")
    return 0


def _ood_score(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .ood_eval import score_files

    bundle = load_bundle(args.bundle, kind="ood")
    files = expand_files(args.files)
    if not files:
        raise ValueError("no input files")
    table = score_files(bundle, files, batch_size=args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    failed = table["error"].astype(bool)
    for f, reason in zip(table.loc[failed, "file"], table.loc[failed, "error"]):
        print(f"warning: {f}: {reason}", file=sys.stderr)
    n_ood = int((table["is_ood"] == True).sum())  # noqa: E712 (None for failed rows)
    cutoff = bundle.card.ood.get("cutoff", {})
    print(f"wrote {out}: {len(files) - int(failed.sum())} scored ({n_ood} out-of-distribution at "
          f"{cutoff.get('scorer')} > {cutoff.get('threshold', float('nan')):.4f}), {int(failed.sum())} unreadable")
    return 0 if failed.sum() < len(files) else 1


def add_ood_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train ood`` (in the shared ``train`` group) and ``ood-score``."""
    tsub = train_subparsers(sub)
    q = tsub.add_parser("ood", help="train the OOD gate (autoencoder or ALI, 64 px) and fit its cutoff",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--data", required=True, help="in-distribution dataset folder (any layout cxrbench reads)")
    q.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, scores, bundle/")
    q.add_argument("--model", default="autoencoder", choices=("autoencoder", "ali"))
    q.add_argument("--latent", type=int, default=128, help="latent size Z")
    q.add_argument("--width", type=int, default=16, help="channels of the first conv block (16 on CPU, 32 on GPU)")
    q.add_argument("--epochs", type=int, default=30)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--lr", type=float, default=None, help="default 1e-3 (autoencoder), 5e-4 (ALI)")
    q.add_argument("--recon-weight", type=float, default=5.0, help="ALI: weight of the L1 reconstruction term")
    q.add_argument("--percentile", type=float, default=95.0,
                   help="cutoff = this percentile of the validation scores "
                   "(about 100 - p %% of in-distribution images are rejected)")
    q.add_argument("--scorer", default="ssim", choices=("ssim", "l1", "l2", "latent"),
                   help="the gate's score (ssim means 1 - SSIM; higher = more OOD)")
    q.add_argument("--split", default=None, help="split CSV to use (default: patient split 70/10/20)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    q.add_argument("--device", default="auto")
    q.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
    q.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_train_ood)

    q = sub.add_parser("ood-score", help="OOD scores of image files under an OOD bundle, to CSV")
    q.add_argument("--bundle", required=True, help="an OOD bundle (cxrbench train ood)")
    q.add_argument("files", nargs="+", help="image files, folders or globs")
    q.add_argument("--out", required=True, help="CSV: file, l1, l2, ssim (1 - SSIM), latent, score, is_ood, error")
    q.add_argument("--batch-size", type=int, default=64)
    q.set_defaults(func=_ood_score)
