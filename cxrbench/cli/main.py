"""The ``cxrbench`` command: the parser built from one module per command group, and one-line errors.

Each group (:mod:`.data`, :mod:`.classifier`, :mod:`.app`, :mod:`.explain`, :mod:`.ood`, :mod:`.export`)
registers its commands with an ``add_<group>_commands(sub)`` function; :data:`COMMAND_GROUPS` lists them
in the order ``cxrbench --help`` shows them. A command's handler is its ``func`` default (``--backend`` is
an ordinary option of the commands that run a Pipeline). Every command prints what it
did and where it wrote; errors are one line on stderr and a non-zero exit code, never a traceback
(``--debug`` shows it).

Exit codes: 0 success, 1 the data or input is not as expected (e.g. ``data check`` found missing
files), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from cxrbench import __version__
from cxrbench.cli.app import add_app_commands
from cxrbench.cli.classifier import add_classifier_commands
from cxrbench.cli.data import add_data_commands
from cxrbench.cli.explain import add_explain_commands
from cxrbench.cli.export import add_export_commands
from cxrbench.cli.ood import add_ood_commands
from cxrbench.cli.options import CommandError, Subcommands, UsageError
from cxrbench.cli.published import add_published_commands

__all__ = ["COMMAND_GROUPS", "build_parser", "main"]

#: the command groups, in the order of ``cxrbench --help``
COMMAND_GROUPS: list[Callable[[Subcommands], None]] = [add_data_commands, add_classifier_commands, add_app_commands,
                                                       add_explain_commands, add_ood_commands, add_export_commands,
                                                       add_published_commands]


def build_parser() -> argparse.ArgumentParser:
    """The ``cxrbench`` parser: ``--version``, ``--debug`` and every group's sub-commands."""
    parser = argparse.ArgumentParser(
        prog="cxrbench",
        description="Chest X-ray workbench: datasets, training, calibrated prediction, OOD gate, explanations.",
    )
    parser.add_argument("--version", action="version", version=f"cxrbench {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in COMMAND_GROUPS:
        add_commands(sub)
    return parser


def _handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The function that runs the parsed command."""
    return args.func


def _command_prog(args: argparse.Namespace) -> str:
    """``cxrbench <command> [<sub-command>]``, as argparse names the command in its usage errors."""
    words = [getattr(args, "command", None)] + [getattr(args, f"{args.command}_command", None)]
    return " ".join(["cxrbench", *[w for w in words if w]])


def _known_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is not as expected": printed as one line, exit code 1."""
    from cxrbench.app.demo import ServeError
    from cxrbench.data.manifests import ManifestError
    from cxrbench.io import ImageReadError
    from cxrbench.train.common import CheckpointError

    return (CommandError, ManifestError, ImageReadError, CheckpointError, ServeError, FileNotFoundError, KeyError,
            ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cxrbench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_handler(args)(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cxrbench ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as exc:  # as argparse reports a bad option: the command named, exit code 2
        if args.debug:
            raise
        print(f"{_command_prog(args)}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one line for the user; --debug for the traceback
        if args.debug or not isinstance(exc, _known_errors()):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"cxrbench: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
