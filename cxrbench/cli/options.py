"""What the command groups of ``cxrbench`` share: the type of the sub-command registry, the one-line
error a command raises, and the ``--backend`` option of the commands that run on PyTorch or ONNX Runtime.

This module imports no command group, so every group can use it.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

__all__ = ["BACKENDS", "CommandError", "Subcommands", "add_backend_argument"]

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
