"""Patient-level, seeded train/validation/test splits, saved to CSV next to the results.

A patient's images all go to one split, so no patient's anatomy leaks from training into evaluation
(images of one NIH patient are strongly correlated: follow-ups of the same chest). Chester used
70/10/20. The split is made on patients, in a random order fixed by the seed, and each split takes
patients until it holds its fraction of the *images*, so split sizes match the fractions in images
even when patients have very different numbers of images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

__all__ = ["SPLIT_NAMES", "SplitError", "check_patient_disjoint", "check_split_provenance", "load_split",
           "manifest_fingerprint", "patient_split", "save_split", "split_provenance", "split_summary"]

SPLIT_NAMES = ("train", "val", "test")


class SplitError(ValueError):
    """A split is malformed, leaks patients, or does not match its manifest."""


def patient_split(
    df: pd.DataFrame,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    *,
    seed: int = 0,
    patient_col: str = "patient_id",
    names: Sequence[str] = SPLIT_NAMES,
) -> pd.Series:
    """Assign every row of ``df`` to a split by patient.

    Parameters
    ----------
    df : manifest with a ``patient_col`` column.
    fractions : fractions of images per split, summing to 1 (default Chester's 70/10/20).
    seed : the same seed on the same table gives the same split.
    names : split names, one per fraction.

    Returns
    -------
    pandas.Series of split names, indexed like ``df``. 112,120 NIH rows take about 0.1 s.
    """
    shares = np.asarray(fractions, dtype=float)
    if len(shares) != len(names):
        raise SplitError(f"{len(shares)} fractions for {len(names)} split names")
    if np.any(shares < 0) or not np.isclose(shares.sum(), 1.0):
        raise SplitError(f"fractions must be >= 0 and sum to 1, got {shares.tolist()}")
    if patient_col not in df.columns:
        raise SplitError(f"no '{patient_col}' column; patient-level splits need patient ids")
    patients = df[patient_col].astype(str).to_numpy()
    if pd.isna(df[patient_col]).any():
        raise SplitError(f"{int(pd.isna(df[patient_col]).sum())} rows have no patient id")
    # sort unique ids so the result does not depend on row order, then shuffle with the seed
    uniques, inverse, counts = np.unique(patients, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniques))
    cum_images = np.cumsum(counts[order])
    bounds = np.cumsum(shares)[:-1] * len(patients)
    # a patient goes to the split in which its cumulative image count starts
    start = cum_images - counts[order]
    split_of_ordered = np.searchsorted(bounds, start, side="right")
    split_of_patient = np.empty(len(uniques), dtype=np.int64)
    split_of_patient[order] = split_of_ordered
    labels = np.asarray(names, dtype=object)[split_of_patient[inverse]]
    return pd.Series(labels, index=df.index, name="split")


def check_patient_disjoint(df: pd.DataFrame, split: pd.Series | str = "split", patient_col: str = "patient_id") -> None:
    """Raise :class:`SplitError` naming the patients that appear in more than one split."""
    s = df[split] if isinstance(split, str) else split
    per_patient = (pd.DataFrame({"p": df[patient_col].astype(str).to_numpy(), "s": np.asarray(s)})
                   .groupby("p")["s"].nunique())
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        raise SplitError(f"{len(leaking)} patients are in more than one split (e.g. {list(leaking.index[:5])})")


def split_summary(df: pd.DataFrame, split: pd.Series | str = "split",
                  label_columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Images, patients and positives per label in each split."""
    s = df[split] if isinstance(split, str) else split
    label_columns = list(label_columns if label_columns is not None else df.attrs.get("label_columns", []))
    g = df.assign(_split=np.asarray(s)).groupby("_split", sort=False)
    out = pd.DataFrame({"images": g.size(), "patients": g["patient_id"].nunique()})
    for col in label_columns:
        out[col] = g[col].sum()
    out.index.name = "split"
    return out


def manifest_fingerprint(df: pd.DataFrame) -> str:
    """SHA-256 (hex) of a manifest's sorted rows: ``image_id``, ``patient_id`` and its label columns.

    Row order and file locations (``path``) do not count, so moving the data folder keeps the fingerprint;
    adding, dropping or relabelling an image, or moving it to another patient, changes it.
    """
    columns = ["image_id", "patient_id", *[c for c in df.attrs.get("label_columns", []) if c in df.columns]]
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise SplitError(f"the manifest has no {', '.join(absent)} column; cannot fingerprint it")
    rows = sorted("\x1f".join(map(str, r)) for r in df[columns].itertuples(index=False, name=None))
    return hashlib.sha256("\n".join(["\x1f".join(columns), *rows]).encode()).hexdigest()


def save_split(df: pd.DataFrame, split: pd.Series, path: str | os.PathLike, *, seed: int | None = None,
               fractions: Sequence[float] | None = None) -> Path:
    """Write ``image_id, patient_id, split`` and its provenance (``seed``, ``fractions`` when given, and
    ``manifest_sha256``, :func:`manifest_fingerprint` of ``df``) to CSV, atomically (temporary file, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = pd.DataFrame({"image_id": df["image_id"].astype(str).to_numpy(),
                        "patient_id": df["patient_id"].astype(str).to_numpy(),
                        "split": np.asarray(split)})
    if seed is not None:
        out["seed"] = seed
    if fractions is not None:
        out["fractions"] = _fractions_text(fractions)
    out["manifest_sha256"] = manifest_fingerprint(df)
    tmp = path.with_suffix(path.suffix + ".tmp")
    out.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def _fractions_text(fractions: Sequence[float]) -> str:
    return "/".join(f"{f:g}" for f in fractions)


def split_provenance(path: str | os.PathLike) -> dict[str, object]:
    """What a split file says made it: ``seed``, ``fractions`` (text such as ``"0.7/0.1/0.2"``),
    ``manifest_sha256`` and ``n_images``; a value the file does not record is ``None``."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    info: dict[str, object] = {"n_images": len(table)}
    for col in ("seed", "fractions", "manifest_sha256"):
        values = set(table[col]) if col in table.columns else set()
        info[col] = values.pop() if len(values) == 1 and "" not in values else None
    if info["seed"] is not None:
        info["seed"] = int(str(info["seed"]))
    return info


def check_split_provenance(path: str | os.PathLike, df: pd.DataFrame, *, seed: int | None = None,
                           fractions: Sequence[float] | None = None) -> None:
    """Raise :class:`SplitError` naming what differs when the split file at ``path`` was made with another
    seed, other fractions or for another manifest than ``df`` (values the file does not record are not checked)."""
    saved = split_provenance(path)
    differ = []
    if seed is not None and saved["seed"] is not None and saved["seed"] != seed:
        differ.append(f"seed {saved['seed']} there, {seed} now")
    if fractions is not None and saved["fractions"] is not None and saved["fractions"] != _fractions_text(fractions):
        differ.append(f"fractions {saved['fractions']} there, {_fractions_text(fractions)} now")
    now = manifest_fingerprint(df)
    if saved["manifest_sha256"] is not None and saved["manifest_sha256"] != now:
        differ.append(f"the manifest differs ({saved['n_images']} images, sha256 {str(saved['manifest_sha256'])[:12]} "
                      f"there; {len(df)} images, sha256 {now[:12]} now)")
    if differ:
        raise SplitError(f"{path}: was made with other settings ({'; '.join(differ)}); use the same data and "
                         "settings, or start the run again (--overwrite)")


def load_split(path: str | os.PathLike, df: pd.DataFrame | None = None) -> pd.Series:
    """Read a split CSV; with ``df``, align it to ``df`` rows by ``image_id`` (rows absent from the CSV raise)."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: split file not found")
    table = pd.read_csv(path, dtype={"image_id": str, "patient_id": str, "split": str})
    for col in ("image_id", "split"):
        if col not in table.columns:
            raise SplitError(f"{path}: missing column '{col}'")
    if df is None:
        return pd.Series(table["split"].to_numpy(), index=table["image_id"], name="split")
    mapping = dict(zip(table["image_id"], table["split"]))
    aligned = df["image_id"].astype(str).map(mapping)
    if aligned.isna().any():
        absent = df.loc[aligned.isna(), "image_id"].tolist()
        raise SplitError(f"{path}: {len(absent)} images of the manifest are not in the split (e.g. {absent[:5]})")
    return pd.Series(aligned.to_numpy(), index=df.index, name="split")
