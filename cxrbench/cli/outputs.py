"""Where the per-input commands write: one output name per input, and no output that overwrites an input.

The rule every command that writes a file per input follows (``segment``, ``explain``, ``analyze``):

- an input's output stem is its file name without the extension (``scans/a.png`` -> ``a``) when no other
  input of the batch has that stem (compared case-insensitively, as on macOS and Windows disks);
- inputs that share a stem (``a.png`` and ``a.dcm``, or ``a.png`` in two folders) each get
  ``<stem>-<8 hex digits>``, a hash of the input's absolute path, so the name is the same on every run and
  never equals another input's stem (``a_1.png`` keeps ``a_1``);
- a stem longer than :data:`MAX_STEM_BYTES` bytes (UTF-8) is cut there and gets the hash too, so that the
  stem plus a command's suffix (``_lung.png``, ``_gradcam_Pleural_Thickening.png``) stays under the file
  system's 255-byte name limit.

The summary CSV of each command has the written file names in its row, so the row of an input always
names its own outputs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cxrbench.cli.options import UsageError

__all__ = ["MAX_STEM_BYTES", "OUTPUT_NAMING", "csv_output_path", "output_stems", "refuse_overwriting_inputs",
           "report_problems"]

#: longest output stem in bytes; the longest suffix a command adds is well under 255 - 120 bytes
MAX_STEM_BYTES = 120
_HASH_HEX = 8

#: the naming rule in one sentence, for the commands' ``--out`` help
OUTPUT_NAMING = ("outputs are named after the input's file name without extension; inputs sharing a name "
                 "(a.png, a.dcm) or with names over 120 bytes get -<8-hex hash of the full path> added")


def _path_hash(path: str, salt: int = 0) -> str:
    key = os.path.abspath(path) + (f"#{salt}" if salt else "")
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:_HASH_HEX]


def _cut(stem: str, max_bytes: int) -> str:
    """``stem`` cut to at most ``max_bytes`` UTF-8 bytes, never inside a character."""
    return stem.encode("utf-8", "surrogateescape")[:max_bytes].decode("utf-8", "ignore")


def output_stems(files: Sequence[str | os.PathLike], *, max_bytes: int = MAX_STEM_BYTES) -> list[str]:
    """One output stem per input, unique within the batch (case-insensitively) and at most ``max_bytes`` +
    9 bytes long: the rule in this module's docstring. The same input list always gives the same stems."""
    plain = [Path(f).stem or Path(f).name or "image" for f in files]
    counts: dict[str, int] = {}
    for stem in plain:
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    keep = [counts[s.casefold()] == 1 and len(s.encode("utf-8", "surrogateescape")) <= max_bytes for s in plain]
    taken = {s.casefold() for s, k in zip(plain, keep) if k}
    room = max_bytes - _HASH_HEX - 1
    out = []
    for f, stem, as_is in zip(files, plain, keep):
        if as_is:
            out.append(stem)
            continue
        base, salt = _cut(stem, room), 0
        name = f"{base}-{_path_hash(str(f))}"
        while name.casefold() in taken:  # the same file given twice, or a name that already looks hashed
            salt += 1
            name = f"{base}-{_path_hash(str(f), salt)}"
        taken.add(name.casefold())
        out.append(name)
    return out


def _real(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.realpath(path))


def refuse_overwriting_inputs(files: Iterable[str | os.PathLike], outputs: Iterable[str | os.PathLike] = (),
                              prefixes: Iterable[tuple[str | os.PathLike, tuple[str, ...]]] = ()) -> None:
    """Raise :class:`~cxrbench.cli.options.UsageError` before anything is read when writing would overwrite an
    input: one of ``outputs`` is an input (also through a symlink), or an input's name starts with one of
    ``prefixes`` (``(out_dir / stem_prefix, suffixes)``, for outputs named per finding) and ends in a suffix."""
    inputs = {_real(f): str(f) for f in files if os.path.lexists(f)}
    for target in outputs:
        if _real(target) in inputs:
            raise UsageError(f"{target} would overwrite the input {inputs[_real(target)]}; choose another --out")
    for prefix, suffixes in prefixes:
        start = _real(prefix)
        for real, given in inputs.items():
            if real.startswith(start) and real.lower().endswith(suffixes) and os.sep not in real[len(start):]:
                raise UsageError(f"{given} is in --out and would be overwritten by an output of this run; "
                                 "choose another --out")


def csv_output_path(out: str, default_name: str, files: Sequence[str | os.PathLike]) -> Path:
    """Where a one-CSV command (``predict``, ``ood-score``) writes for ``--out out``: ``out`` itself, or
    ``out/default_name`` when ``out`` is an existing folder or ends with a path separator. Refused when that is
    one of the inputs."""
    path = Path(out) / default_name if os.path.isdir(out) or out.endswith(("/", os.sep)) else Path(out)
    refuse_overwriting_inputs(files, [path])
    return path


def report_problems(table: Any, columns: Sequence[str] = ("error", "warning")) -> dict[str, int]:
    """Print ``warning: <file>: <text>`` on stderr for each non-empty cell of ``columns`` (a per-file command's
    table: ``error`` for unreadable files, ``warning`` for ones read with a caveat); returns the count per column."""
    counts = {}
    for column in columns:
        rows = table[table[column].astype(str) != ""] if column in table else table.iloc[:0]
        for f, text in zip(rows["file"], rows[column]):
            print(f"warning: {f}: {text}", file=sys.stderr)
        counts[column] = len(rows)
    return counts
