"""What the command groups of ``cxrbench`` share: the type of the sub-command registry, the one-line
error a command raises, the ``--backend`` option of the commands that run on PyTorch or ONNX Runtime, and
the ``--resume`` / ``--overwrite`` options of every ``train`` command.

This module imports no command group, so every group can use it.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

__all__ = ["BACKENDS", "CommandError", "Subcommands", "add_backend_argument", "add_run_folder_arguments"]

#: where ``--backend`` runs a command: PyTorch eager (default) or ONNX Runtime on the exported graphs
BACKENDS = ("torch", "onnx")


class Subcommands(Protocol):
    """The registry ``ArgumentParser.add_subparsers()`` returns: what a command group adds its commands to."""

    choices: dict[str, argparse.ArgumentParser]

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A new sub-command parser called ``name``."""


class CommandError(Exception):
    """A command failed for a reason the user can act on; printed as one line."""


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """Give a command ``--backend {torch,onnx}``: its handler builds the same
    :class:`~cxrbench.inference.pipeline.Pipeline` on PyTorch or on ONNX Runtime's backends."""
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="torch (default) or onnx: ONNX Runtime on the exported graphs (a bundle folder is "
                             "exported once and cached, parity-checked; an export folder is used as is)")


def add_run_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """Give a ``train`` command ``--resume`` and ``--overwrite`` (one or neither): without them a run folder that
    holds an earlier run is refused (:func:`cxrbench.train.folder.prepare_run_folder`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in OUT (from OUT/checkpoint.pt)")
    group.add_argument("--overwrite", action="store_true",
                       help="start again in OUT: delete the earlier run's files there first (checkpoint, split, "
                            "logs, bundle); without it or --resume, a used run folder is refused")
