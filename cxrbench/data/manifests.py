"""Readers that turn a dataset on disk into one table: a :class:`pandas.DataFrame` manifest.

Every reader returns the same shape of table, so splits, datasets and checks work on any source:

``path``        absolute path of the image file (str)
``image_id``    the file's name, or the dataset's image key
``patient_id``  patient key used for patient-level splits (str)
one column per label (0/1 int8), named as in :mod:`cxrbench.labels`
plus reader-specific columns (``view_position``, ``mask_path``, ``bbox_256_json`` ...)

``df.attrs`` carries ``kind`` (the reader), ``root`` and ``label_columns``.

Missing files are never reported one at a time: a reader collects them and either raises one
:class:`ManifestError` that gives the count and the first names (``on_missing="raise"``, the default),
or drops them with one warning that says how many (``on_missing="drop"``), or keeps them
(``on_missing="keep"``, for checks).
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd

from cxrbench.labels import NIH_FINDINGS, PEDIATRIC_FINDINGS, parse_finding_labels

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_LAYOUTS",
    "ManifestError",
    "binary_labels",
    "MissingFiles",
    "find_missing",
    "load_manifest",
    "read_image_folder",
    "read_kermany",
    "read_manifest_csv",
    "read_mask_pairs",
    "read_nih",
    "read_nih_table",
    "read_phantom_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp")
OnMissing = Literal["raise", "drop", "keep"]


class ManifestError(ValueError):
    """A dataset could not be read as described: missing files, missing columns, unknown layout."""


class MissingFiles(ManifestError):
    """Files named by a manifest are missing. ``missing`` lists them all, ``total`` is the manifest size."""

    def __init__(self, where: str, missing: Sequence[str], total: int, show: int = 5):
        self.where, self.missing, self.total = where, list(missing), total
        head = ", ".join(os.path.basename(m) for m in self.missing[:show])
        more = f" and {len(self.missing) - show} more" if len(self.missing) > show else ""
        super().__init__(f"{where}: {len(self.missing)} of {total} files are missing ({head}{more})")


# --------------------------------------------------------------------------------------------------
# shared helpers


def find_missing(paths: Iterable[str]) -> list[str]:
    """The paths that are not existing files."""
    return [p for p in paths if not os.path.isfile(p)]


def _finish(df: pd.DataFrame, *, kind: str, root: Path, label_columns: Sequence[str], on_missing: OnMissing,
            extra_paths: Sequence[str] = (), where: str | None = None) -> pd.DataFrame:
    if on_missing not in ("raise", "drop", "keep"):
        raise ValueError(f"on_missing must be 'raise', 'drop' or 'keep', got {on_missing!r}")
    df = df.reset_index(drop=True)
    df["patient_id"] = df["patient_id"].astype(str)
    for col in label_columns:
        df[col] = binary_labels(df[col], col, where or str(root))
    missing_mask = ~df["path"].map(os.path.isfile)
    for col in extra_paths:
        missing_mask |= ~df[col].map(os.path.isfile)
    if missing_mask.any() and on_missing != "keep":
        rows = df.loc[missing_mask]
        missing = [p for col in ("path", *extra_paths) for p in rows[col] if not os.path.isfile(p)]
        if on_missing == "raise":
            raise MissingFiles(str(root), missing, len(df) * (1 + len(extra_paths)))
        warnings.warn(f"{root}: dropped {int(missing_mask.sum())} of {len(df)} rows whose files are missing",
                      stacklevel=3)
        df = df.loc[~missing_mask].reset_index(drop=True)
    df.attrs.update(kind=kind, root=str(root), label_columns=list(label_columns))
    return df


def binary_labels(values: pd.Series, column: str, where: str) -> pd.Series:
    """``values`` as int8 0/1; anything else (0.7, -1, 2, "yes", empty) is refused naming the file and column.

    A label of 0.7 must never become 0 by truncation, and -1 ("uncertain", as CheXpert writes it) must
    not fail only after an epoch of training.
    """
    numeric = pd.to_numeric(values, errors="coerce")
    bad = ~numeric.isin([0, 1])
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())
        examples = ", ".join(f"row {r + 2}: {values.iloc[r]!r}" for r in rows[:3])
        raise ManifestError(f"{where}: column {column!r} must hold 0 or 1 labels; {len(rows)} value(s) are not "
                            f"({examples}{', ...' if len(rows) > 3 else ''})")
    return numeric.astype(np.int8)


#: the manifest.csv layouts, by the columns that mark them (for messages about a column typo)
MANIFEST_LAYOUTS: dict[str, tuple[str, ...]] = {
    "NIH-style labels": ("file", "finding_labels", "patient_id", *NIH_FINDINGS),
    "paediatric pneumonia": ("file", "pneumonia", "patient_key", "label", "source_split"),
    "image + mask pairs": ("image_file", "mask_file", "patient_id"),
    "plain list of images": ("file", "patient_id"),
}


def _layouts_text() -> str:
    return "; ".join(f"{name}: {', '.join(cols[:4])}{' + the 14 finding columns' if len(cols) > 8 else ''}"
                     for name, cols in MANIFEST_LAYOUTS.items())


def _check_column_names(raw: pd.DataFrame, where: str) -> None:
    """Refuse a column that is a near miss of a known one (``pnuemonia``, ``Efusion``): it would be ignored."""
    known = {c for cols in MANIFEST_LAYOUTS.values() for c in cols}
    for col in map(str, raw.columns):
        if col in known:
            continue
        close = difflib.get_close_matches(col, sorted(known), n=1, cutoff=0.8)
        if close and close[0] not in raw.columns:
            raise ManifestError(f"{where}: column {col!r} is not one cxrbench reads; did you mean {close[0]!r}? "
                                f"(manifest.csv layouts: {_layouts_text()})")


def _require_columns(table: pd.DataFrame, columns: Iterable[str], where: str) -> None:
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise ManifestError(f"{where}: missing columns {absent}; found {list(table.columns)[:12]} "
                            f"(manifest.csv layouts: {_layouts_text()})")


def _index_images(root: Path, recursive: bool = True) -> dict[str, str]:
    """File name -> absolute path for every image under ``root``."""
    index: dict[str, str] = {}
    walker = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for folder, _dirs, files in walker:
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                index.setdefault(name, os.path.join(folder, name))
    return index


# --------------------------------------------------------------------------------------------------
# NIH ChestX-ray14


def read_nih_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``Data_Entry_2017*.csv[.gz]`` into a table with ``image_id``, ``patient_id``, labels, metadata.

    The 14 findings become 0/1 columns in :data:`cxrbench.labels.NIH_FINDINGS` order; ``No Finding``
    rows are all zeros. 112,120 rows read in about a second.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: NIH label table not found")
    raw = pd.read_csv(path, usecols=lambda c: not str(c).startswith("Unnamed"))
    _require_columns(raw, ["Image Index", "Finding Labels", "Patient ID"], str(path))
    labels = _finding_matrix(raw["Finding Labels"])
    out = pd.DataFrame({
        "image_id": raw["Image Index"].astype(str),
        "patient_id": raw["Patient ID"].astype(str),
        "finding_labels": raw["Finding Labels"].astype(str),
    })
    for col, src in (("follow_up", "Follow-up #"), ("age", "Patient Age"), ("sex", "Patient Gender"),
                     ("view_position", "View Position")):
        if src in raw.columns:
            out[col] = raw[src].to_numpy()
    out[list(NIH_FINDINGS)] = labels
    return out


def _finding_matrix(finding_labels: pd.Series) -> np.ndarray:
    """``"A|B"`` strings -> (N, 14) int8, vectorised through the unique strings (there are ~800)."""
    codes, uniques = pd.factorize(finding_labels.astype(str))
    table = np.array([parse_finding_labels(u) for u in uniques], dtype=np.int8).reshape(len(uniques), len(NIH_FINDINGS))
    return table[codes]


def read_nih(
    root: str | os.PathLike,
    *,
    table: str | os.PathLike | None = None,
    split_lists: bool = True,
    on_missing: OnMissing = "raise",
    images_only: bool = True,
) -> pd.DataFrame:
    """The official NIH layout: image folder(s) under ``root`` + ``Data_Entry_2017*.csv[.gz]``.

    Images are found anywhere below ``root`` (``images/``, ``images_001/images/`` ...). The label table
    is ``table`` or the first ``Data_Entry_2017*.csv*`` in ``root``. With ``images_only`` (default) only
    rows whose image exists are kept, which is how a partial download is used; the count of absent
    images is in ``df.attrs["n_absent"]``. ``train_val_list.txt`` / ``test_list.txt`` in ``root`` become
    an ``official_split`` column (``trainval`` / ``test``).
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: no such directory")
    if table is None:
        found = sorted(glob.glob(str(root / "Data_Entry_2017*.csv*")))
        if not found:
            raise ManifestError(f"{root}: no Data_Entry_2017*.csv[.gz] label table (pass table=...)")
        table = found[0]
    df = read_nih_table(table)
    index = _index_images(root)
    df["path"] = df["image_id"].map(index)
    n_absent = int(df["path"].isna().sum())
    if images_only:
        df = df[df["path"].notna()].copy()
        if df.empty:
            raise ManifestError(f"{root}: none of the {n_absent} images of {table} is present")
    else:
        df["path"] = df["path"].fillna(df["image_id"].map(lambda n: str(root / "images" / n)))
    if split_lists:
        lists = {name: root / f for name, f in (("trainval", "train_val_list.txt"), ("test", "test_list.txt"))}
        if all(p.is_file() for p in lists.values()):
            membership = {}
            for name, p in lists.items():
                membership.update(dict.fromkeys(p.read_text().split(), name))
            df["official_split"] = df["image_id"].map(membership).fillna("")
    out = _finish(df, kind="nih", root=root, label_columns=NIH_FINDINGS, on_missing=on_missing)
    out.attrs["n_absent"] = n_absent
    return out


# --------------------------------------------------------------------------------------------------
# Kermany paediatric pneumonia

_KERMANY_SPLITS = ("train", "test", "val")
_KERMANY_CLASSES = ("NORMAL", "PNEUMONIA")


def _kermany_patient(split: str, stem: str) -> str:
    m = re.match(r"(person\d+)_", stem)
    if m:
        return f"{split}/{m.group(1)}"
    m = re.match(r"((?:NORMAL2-)?IM-\d+)", stem)
    return f"{split}/{m.group(1) if m else stem}"


def _kermany_label(cls: str, stem: str) -> str:
    if cls == "NORMAL":
        return "normal"
    low = stem.lower()
    if "virus" in low:
        return "viral"
    if "bacteria" in low:
        return "bacterial"
    return "pneumonia"


def read_kermany(root: str | os.PathLike, *, on_missing: OnMissing = "raise") -> pd.DataFrame:
    """The Kermany et al. layout ``{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg``.

    ``label`` is normal / bacterial / viral (from the file name), ``Pneumonia`` is 0/1, ``patient_id`` is
    ``split/personN`` (or ``split/IM-XXXX`` for normal images), ``source_split`` the folder.
    """
    root = Path(root)
    rows = []
    for split in _KERMANY_SPLITS:
        for cls in _KERMANY_CLASSES:
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for name in sorted(os.listdir(folder)):
                if not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                stem = Path(name).stem
                label = _kermany_label(cls, stem)
                rows.append({"path": str(folder / name), "image_id": name, "patient_id": _kermany_patient(split, stem),
                             "source_split": split, "label": label, "Pneumonia": int(cls == "PNEUMONIA")})
    if not rows:
        raise ManifestError(f"{root}: no images in {{train,test,val}}/{{NORMAL,PNEUMONIA}}/ (Kermany layout expected)")
    return _finish(pd.DataFrame(rows), kind="kermany", root=root, label_columns=PEDIATRIC_FINDINGS,
                   on_missing=on_missing)


# --------------------------------------------------------------------------------------------------
# image + mask pairs, plain folders


def read_mask_pairs(root: str | os.PathLike, *, images: str = "images", masks: str = "masks",
                    on_missing: OnMissing = "raise") -> pd.DataFrame:
    """``root/images/<name>`` with ``root/masks/<name>`` (same stem, any image suffix).

    Images without a mask are reported as missing masks (with ``on_missing``).
    """
    root = Path(root)
    img_dir, mask_dir = root / images, root / masks
    if not img_dir.is_dir():
        raise ManifestError(f"{root}: no '{images}/' folder of images")
    mask_files = _index_images(mask_dir, recursive=False).values() if mask_dir.is_dir() else []
    mask_index = {Path(m).stem: m for m in mask_files}
    rows = []
    for name, path in sorted(_index_images(img_dir, recursive=False).items()):
        stem = Path(name).stem
        rows.append({"path": path, "image_id": name, "patient_id": stem,
                     "mask_path": mask_index.get(stem, str(mask_dir / name))})
    if not rows:
        raise ManifestError(f"{img_dir}: no images")
    return _finish(pd.DataFrame(rows), kind="mask_pairs", root=root, label_columns=(), on_missing=on_missing,
                   extra_paths=("mask_path",))


def read_image_folder(root: str | os.PathLike, *, recursive: bool = True, patient_from: str = "file") -> pd.DataFrame:
    """Every image file under ``root`` (e.g. an OOD set); ``patient_id`` is the file stem or its folder."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: no such directory")
    rows = []
    for name, path in sorted(_index_images(root, recursive=recursive).items()):
        pid = Path(path).parent.name if patient_from == "folder" else Path(name).stem
        rows.append({"path": path, "image_id": name, "patient_id": pid})
    if not rows:
        raise ManifestError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return _finish(pd.DataFrame(rows), kind="folder", root=root, label_columns=(), on_missing="keep")


# --------------------------------------------------------------------------------------------------
# manifest.csv folders (the shared dev sets, the synthetic phantom set)


def read_manifest_csv(folder: str | os.PathLike, *, on_missing: OnMissing = "raise") -> pd.DataFrame:
    """A folder with a ``manifest.csv`` (the ``cxr/*`` dev sets, a written phantom set).

    The kind is recognised from the columns: NIH (``finding_labels`` + ``patient_id``, one column per
    finding), paediatric (``pneumonia`` + ``patient_key``), masks (``image_file`` + ``mask_file``) or a
    plain list (``file``).
    """
    folder = Path(folder)
    csv = folder / "manifest.csv"
    if not csv.is_file():
        raise ManifestError(f"{folder}: no manifest.csv")
    raw = pd.read_csv(csv, dtype={"patient_id": str, "patient_key": str})
    _check_column_names(raw, str(csv))
    cols = set(raw.columns)
    if {"image_file", "mask_file"} <= cols:
        df = pd.DataFrame({
            "path": [str(folder / f) for f in raw["image_file"]],
            "image_id": raw["image_file"].map(lambda f: Path(f).name),
            "patient_id": raw["patient_id"].astype(str) if "patient_id" in cols else raw["image_file"],
            "mask_path": [str(folder / f) for f in raw["mask_file"]],
        })
        for c in ("view", "finding", "source_type"):
            if c in cols:
                df[c] = raw[c].to_numpy()
        return _finish(df, kind="mask_pairs", root=folder, label_columns=(), on_missing=on_missing,
                       extra_paths=("mask_path",), where=str(csv))
    _require_columns(raw, ["file"], str(csv))
    df = pd.DataFrame({"path": [str(folder / f) for f in raw["file"]], "image_id": raw["file"].astype(str)})
    if {"pneumonia", "patient_key"} <= cols:
        pneumonia = binary_labels(raw["pneumonia"], "pneumonia", str(csv)).to_numpy()
        df["patient_id"] = raw["patient_key"].astype(str)
        df["label"] = raw["label"].to_numpy() if "label" in cols else np.where(pneumonia > 0, "pneumonia", "normal")
        df["source_split"] = raw["source_split"].to_numpy() if "source_split" in cols else ""
        df["Pneumonia"] = pneumonia
        return _finish(df, kind="kermany", root=folder, label_columns=PEDIATRIC_FINDINGS, on_missing=on_missing,
                       where=str(csv))
    if "finding_labels" in cols:
        df["patient_id"] = raw["patient_id"].astype(str) if "patient_id" in cols else raw["file"].astype(str)
        df["finding_labels"] = raw["finding_labels"].astype(str).to_numpy()
        present = [f for f in NIH_FINDINGS if f in cols]
        if len(present) == len(NIH_FINDINGS):
            for f in NIH_FINDINGS:
                df[f] = binary_labels(raw[f], f, str(csv)).to_numpy()
        elif present:  # some finding columns but not all: the rest would be read from the text, silently
            absent = [f for f in NIH_FINDINGS if f not in cols]
            raise ManifestError(f"{csv}: has {len(present)} of the 14 finding columns; missing {absent} "
                                "(give all 14 as 0/1 columns, or none and only finding_labels)")
        else:
            df[list(NIH_FINDINGS)] = _finding_matrix(raw["finding_labels"])
        for c in ("view_position", "age", "sex", "follow_up", "bbox_256_json", "lesion_bbox_json"):
            if c in cols:
                df[c] = raw[c].to_numpy()
        if "mask_file" in cols:
            df["mask_path"] = [str(folder / f) for f in raw["mask_file"]]
        kind = "phantoms" if "lesion_bbox_json" in cols else "nih"
        return _finish(df, kind=kind, root=folder, label_columns=NIH_FINDINGS, on_missing=on_missing, where=str(csv))
    stems = raw["file"].map(lambda f: Path(str(f)).stem)
    df["patient_id"] = raw["patient_id"].fillna(stems).astype(str) if "patient_id" in cols else stems
    for c in ("dataset", "body_part", "label"):
        if c in cols:
            df[c] = raw[c].to_numpy()
    return _finish(df, kind="folder", root=folder, label_columns=(), on_missing=on_missing, where=str(csv))


def read_phantom_folder(folder: str | os.PathLike, *, on_missing: OnMissing = "raise") -> pd.DataFrame:
    """A phantom set written by :func:`cxrbench.data.synthetic.write_phantom_set` (a manifest.csv folder)."""
    return read_manifest_csv(folder, on_missing=on_missing)


def bounding_boxes(row: pd.Series) -> list[tuple[str, float, float, float, float]]:
    """The ``[label, x, y, w, h]`` boxes of a manifest row (``bbox_256_json`` or ``lesion_bbox_json``)."""
    for col in ("bbox_256_json", "lesion_bbox_json"):
        text = row.get(col)
        if isinstance(text, str) and text.strip():
            return [tuple(b) for b in json.loads(text)]
    return []


# --------------------------------------------------------------------------------------------------
# auto-detection


def load_manifest(root: str | os.PathLike, *, on_missing: OnMissing = "raise") -> pd.DataFrame:
    """Read any supported layout, recognised from what is in ``root``.

    ``manifest.csv`` -> :func:`read_manifest_csv`; a ``Data_Entry_2017*`` table -> :func:`read_nih`;
    ``{train,test,val}/{NORMAL,PNEUMONIA}`` -> :func:`read_kermany`; ``images/`` + ``masks/`` ->
    :func:`read_mask_pairs`; otherwise a plain folder of images.
    """
    root = Path(root)
    if not root.exists():
        raise ManifestError(f"{root}: no such file or directory")
    if root.is_file() and root.name == "manifest.csv":
        root = root.parent
    if (root / "manifest.csv").is_file():
        return read_manifest_csv(root, on_missing=on_missing)
    if glob.glob(str(root / "Data_Entry_2017*.csv*")):
        return read_nih(root, on_missing=on_missing)
    if any((root / s / c).is_dir() for s in _KERMANY_SPLITS for c in _KERMANY_CLASSES):
        return read_kermany(root, on_missing=on_missing)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return read_mask_pairs(root, on_missing=on_missing)
    return read_image_folder(root)
