"""Tables a reader can read: a wide table (e.g. per-finding AUC beside Chester Table 1) transposed or wrapped
into blocks that fit a notebook page, headers allowed to break, numbers rounded (HTML, no dependency)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

__all__ = ["ReadableTable", "readable_table"]

#: headers may break anywhere (long names like ``auc_std_half_splits``), cells stay on one line
_CSS = ("<style>.cxr-table{border-collapse:collapse;margin:0 0 0.8em 0;font-size:0.85em}"
        ".cxr-table thead th{white-space:normal;overflow-wrap:anywhere;max-width:7.5em;text-align:right;"
        "vertical-align:bottom;padding:2px 6px}.cxr-table tbody th{white-space:nowrap;text-align:left;padding:2px 6px}"
        ".cxr-table td{white-space:nowrap;text-align:right;padding:2px 6px}"
        ".cxr-table tbody tr:nth-child(odd){background:#f5f5f5}</style>")


def _breakable_headers(table: pd.DataFrame) -> pd.DataFrame:
    """Column names with a zero-width space after each underscore, so ``auc_std_half_splits`` wraps at its
    underscores instead of mid-word."""
    return table.rename(columns=lambda c: str(c).replace("_", "_\u200b"))


@dataclass
class ReadableTable:
    """A table cut into ``parts`` (each at most ``max_columns`` columns) that renders as HTML in a notebook."""

    parts: list[pd.DataFrame]
    transposed: bool
    precision: int = 3
    caption: str = ""
    notes: list[str] = field(default_factory=list)

    def _repr_html_(self) -> str:
        fmt = f"{{:.{self.precision}f}}".format
        blocks = [_breakable_headers(p).to_html(classes="cxr-table", float_format=fmt, na_rep="n/a", border=0)
                  for p in self.parts]
        head = f"<p><b>{html.escape(self.caption)}</b></p>" if self.caption else ""
        notes = "".join(f"<p><i>{html.escape(n)}</i></p>" for n in self.notes)
        return _CSS + head + "".join(blocks) + notes

    def __repr__(self) -> str:  # plain-text outputs (papermill logs, a console)
        return "\n\n".join(p.round(self.precision).to_string() for p in self.parts)


def readable_table(table: pd.DataFrame, *, max_columns: int = 10, precision: int = 3,
                   caption: str = "") -> ReadableTable:
    """``table`` shaped to fit a page: as it is when it has at most ``max_columns`` columns; transposed when
    that makes it narrow enough (fewer rows than columns); otherwise its columns are split into the fewest
    balanced blocks of at most ``max_columns``, each repeating the index."""
    if max_columns < 1:
        raise ValueError(f"max_columns must be at least 1, got {max_columns}")
    n_rows, n_cols = table.shape
    if n_cols <= max_columns:
        return ReadableTable([table], transposed=False, precision=precision, caption=caption)
    if n_rows <= max_columns and n_rows < n_cols:
        return ReadableTable([table.T], transposed=True, precision=precision, caption=caption,
                             notes=["transposed to fit the page: one column per row of the table"])
    blocks = int(np.ceil(n_cols / max_columns))
    parts = [table.iloc[:, idx] for idx in np.array_split(np.arange(n_cols), blocks)]
    return ReadableTable(parts, transposed=False, precision=precision, caption=caption,
                         notes=[f"{n_cols} columns shown in {blocks} blocks to fit the page"])
