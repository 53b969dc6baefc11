"""What the command groups of ``cxrbench`` share: the type of the sub-command registry, the one-line
errors a command raises, the ``--backend`` option of the commands that run on PyTorch or ONNX Runtime, and the
``type=`` functions that refuse a bad value while parsing (``cxrbench predict: error: argument --batch-size: ...``,
exit code 2) instead of letting it fail, or silently do something else, later;
and the options every ``train`` command shares: ``--resume`` / ``--overwrite``, and ``--split``, ``--seed``,
``--workers``, ``--device``, ``--max-steps`` of those that train on a dataset folder.

This module imports no command group, so every group can use it.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, Protocol

__all__ = ["BACKENDS", "DEVICE_PATTERN", "CommandError", "Subcommands", "UsageError", "add_backend_argument",
           "add_run_folder_arguments", "add_training_arguments", "device_name", "positive_int", "probability"]

#: where ``--backend`` runs a command: ONNX Runtime where no gradients are needed, else PyTorch (``auto``, the
#: default); PyTorch eager; or ONNX Runtime on the exported graphs
BACKENDS = ("auto", "torch", "onnx")


class Subcommands(Protocol):
    """The registry ``ArgumentParser.add_subparsers()`` returns: what a command group adds its commands to."""

    choices: dict[str, argparse.ArgumentParser]

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A new sub-command parser called ``name``."""


class CommandError(Exception):
    """A command failed for a reason the user can act on; printed as one line."""


def add_backend_argument(parser: argparse.ArgumentParser, *, gate_only: bool = False, what: str = "") -> None:
    """Give a command ``--backend {auto,torch,onnx}`` (default auto): its handler builds the same
    :class:`~cxrbench.inference.pipeline.Pipeline` (or gate, or U-Net: ``what`` runs there) on PyTorch, on ONNX
    Runtime, or on each where it wins."""
    what = what or ("the gate" if gate_only else ("the classifier (also for --explain cam and saliency, which have "
                                                  "graphs; not for gradcam, integrated_gradients, ...), and the gate"))
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help=f"auto (default): ONNX Runtime for {what}, PyTorch otherwise or where the export fails "
                             "(with a warning); torch: PyTorch only; onnx: ONNX Runtime only. A bundle folder is "
                             "exported once into $CXRBENCH_CACHE/onnx (parity-checked); an export folder is used as is")


class UsageError(CommandError):
    """The command line asks for something that cannot be done (an output that is an input): printed as
    ``cxrbench <command>: error: ...``, exit code 2, like argparse's own usage errors."""


def _whole_number(text: str, minimum: int, alternative: str = "") -> int:
    what = f"{alternative} or a whole number >= {minimum}" if alternative else f"a whole number >= {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """``type=`` of counts that must be at least 1 (``--batch-size``, ``--top``)."""
    return _whole_number(text, 1)


def probability(text: str) -> float:
    """``type=`` of thresholds on a probability: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1 (a probability), got {text}")
    return value


#: what ``--device`` accepts (torch's device names this package runs on)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def worker_count(text: str) -> int | None:
    """``type=`` of ``--workers``: ``auto`` (None: :func:`cxrbench.train.runtime.loader_workers` decides) or a
    whole number >= 0."""
    return None if text.strip().lower() == "auto" else _whole_number(text, 0, "auto")


def device_name(text: str) -> str:
    """``type=`` of ``--device``: auto, cpu, cuda, cuda:N or mps (checked without importing torch)."""
    if not DEVICE_PATTERN.fullmatch(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected auto, cpu, cuda, cuda:N or mps")
    return text.strip().lower()


def add_run_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """Give a ``train`` command ``--resume`` and ``--overwrite`` (one or neither): without them a run folder that
    holds an earlier run is refused (:func:`cxrbench.train.folder.prepare_run_folder`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in OUT (from OUT/checkpoint.pt)")
    group.add_argument("--overwrite", action="store_true",
                       help="start again in OUT: delete the earlier run's files there first (checkpoint, split, "
                            "logs, bundle); without it or --resume, a used run folder is refused")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Give a ``train`` command ``--split``, ``--seed``, ``--workers``, ``--device`` and ``--max-steps`` (in that
    order, as its ``--help`` lists them): what ``train classifier``, ``train ood`` and ``train autoencoder`` share."""
    parser.add_argument("--split", default=None, help="split CSV to use (default: patient split 70/10/20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=worker_count, default="auto", metavar="N|auto",
                        help="DataLoader worker processes (auto: none on the CPU; on a GPU this process's share of "
                             "the cores less one, at most 8)")
    parser.add_argument("--device", type=device_name, default="auto")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
