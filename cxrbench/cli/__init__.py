"""The ``cxrbench`` command: :func:`main` and one module per command group."""

from cxrbench.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
