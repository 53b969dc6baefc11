"""``cxrbench import xrv NAME`` / ``cxrbench import chexnet FILE`` and ``cxrbench calibrate BUNDLE --data VAL``."""

from __future__ import annotations

import argparse

from cxrbench.cli.options import Subcommands, positive_int

__all__ = ["XRV_NAMES", "add_published_commands"]

#: the torchxrayvision weight sets (:data:`cxrbench.models.published.XRV_WEIGHTS`; listed here so that the
#: parser imports no torch)
XRV_NAMES = (*(f"densenet121-res224-{k}" for k in ("all", "nih", "pc", "chex", "rsna", "mimic_nb", "mimic_ch")),
             "resnet50-res512-all")


def _print_card(path: str) -> None:
    from cxrbench.models.bundle import describe_card, read_card

    print(f"bundle: {path}")
    print("\n".join(f"  {line}" for line in describe_card(read_card(path))))


def _import_xrv(args: argparse.Namespace) -> int:
    from cxrbench.models.published import import_xrv

    import_xrv(args.name, args.out, weights=args.weights, allow_download=args.allow_download)
    _print_card(args.out)
    return 0


def _import_chexnet(args: argparse.Namespace) -> int:
    from cxrbench.models.published import import_chexnet

    import_chexnet(args.checkpoint, args.out)
    _print_card(args.out)
    print("  no operating points yet: run `cxrbench calibrate BUNDLE --data VAL` on a labelled validation set")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from cxrbench.inference.recalibrate import refit_operating_points

    card = refit_operating_points(args.bundle, args.data, split=args.split, subset=args.subset,
                                  batch_size=args.batch_size, progress=not args.quiet)
    ops = card.operating_points
    published = (ops.get("published") or {}).get("thresholds") or {}
    print(f"{'finding':<20} {'published':>10} {'refitted':>10}  positives")
    for f, v in ops["thresholds"].items():
        if f in card.untrained:
            print(f"{f:<20} {'':>10} {'':>10}  not trained by this model")
            continue
        old = published.get(f)
        mark = " (kept: no positives/negatives here)" if f in ops.get("kept_previous", []) else ""
        print(f"{f:<20} {'-' if old is None else f'{old:.4f}':>10} {'-' if v is None else f'{v:.4f}':>10}  "
              f"{ops.get('n_pos', {}).get(f, 0)}{mark}")
    print(f"wrote the refitted operating points (Youden J on {ops['n_images']} images of {args.data}) into "
          f"{args.bundle}/card.json; the previous ones are kept under operating_points.published")
    return 0


def add_published_commands(sub: Subcommands) -> None:
    """Register ``import xrv``, ``import chexnet`` and ``calibrate``."""
    p = sub.add_parser("import", help="published pretrained weights as a cxrbench bundle (torchxrayvision, CheXNet)")
    isub = p.add_subparsers(dest="import_command", required=True, metavar="SOURCE")
    q = isub.add_parser("xrv", help="a torchxrayvision DenseNet-121 / ResNet-50 weight set")
    q.add_argument("name", choices=XRV_NAMES, metavar="NAME", help="one of: " + ", ".join(XRV_NAMES))
    q.add_argument("--out", required=True, help="bundle folder to write")
    q.add_argument("--weights", default=None, help="a state-dict file of these weights (read with "
                                                    "weights_only=True; pickled whole models are refused)")
    q.add_argument("--allow-download", action="store_true",
                   help="let torchxrayvision download (and load) its release file when --weights is not given")
    q.set_defaults(func=_import_xrv)
    q = isub.add_parser("chexnet", help="a CheXNet checkpoint (arnoweng/CheXNet-style state dict)")
    q.add_argument("checkpoint", help="the .pth / .pth.tar file (a state dict or {'state_dict': ...})")
    q.add_argument("--out", required=True, help="bundle folder to write")
    q.set_defaults(func=_import_chexnet)

    q = sub.add_parser("calibrate", help="re-fit a classifier bundle's operating points on your validation data")
    q.add_argument("bundle", help="classifier bundle folder (its card is rewritten)")
    q.add_argument("--data", required=True, help="labelled validation images (any layout cxrbench reads)")
    q.add_argument("--split", default=None, help="split CSV; use only its --subset rows")
    q.add_argument("--subset", default="val")
    q.add_argument("--batch-size", type=positive_int, default=32)
    q.add_argument("-q", "--quiet", action="store_true")
    q.set_defaults(func=_calibrate)
