"""Label statistics of a manifest: prevalence, co-occurrence, labels per image."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["cooccurrence", "label_table", "labels_per_image"]


def _columns(df: pd.DataFrame, label_columns: Sequence[str] | None) -> list[str]:
    cols = list(label_columns if label_columns is not None else df.attrs.get("label_columns", []))
    if not cols:
        raise ValueError("no label columns (pass label_columns=...)")
    return cols


def label_table(df: pd.DataFrame, label_columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Positives, prevalence and ``pos_weight`` (negatives / positives) per label, most frequent first."""
    cols = _columns(df, label_columns)
    pos = df[cols].sum().astype(int)
    out = pd.DataFrame({"positives": pos, "prevalence": pos / max(len(df), 1)})
    out["pos_weight"] = np.where(pos > 0, (len(df) - pos) / pos.clip(lower=1), np.nan)
    out.index.name = "label"
    return out.sort_values("positives", ascending=False)


def cooccurrence(df: pd.DataFrame, label_columns: Sequence[str] | None = None, *,
                 normalize: bool = False) -> pd.DataFrame:
    """``C[i, j]`` = images with both labels i and j (diagonal: images with i).

    With ``normalize``, row i is divided by the count of i: ``P(j | i)``.
    """
    cols = _columns(df, label_columns)
    y = df[cols].to_numpy(dtype=np.int64)
    c = y.T @ y
    if normalize:
        c = c / np.maximum(np.diag(c)[:, None], 1)
    return pd.DataFrame(c, index=cols, columns=cols)


def labels_per_image(df: pd.DataFrame, label_columns: Sequence[str] | None = None) -> pd.Series:
    """How many images carry 0, 1, 2 ... labels."""
    cols = _columns(df, label_columns)
    return df[cols].sum(axis=1).value_counts().sort_index().rename("images")
