"""Datasets: manifests of the public layouts, patient-level splits, a cached torch Dataset, phantoms.

>>> from cxrbench.data import load_manifest, patient_split
>>> df = load_manifest("../shared/data/cxr/nih")          # doctest: +SKIP
>>> df["split"] = patient_split(df, seed=0)               # doctest: +SKIP

The torch ``Dataset`` (:mod:`cxrbench.data.dataset`) is imported on first use, so the catalogue and the
manifests (``cxrbench data list``) load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cxrbench.data.locations import (
    DataRoot,
    DataRootError,
    find_shared_data,
    locate_data_root,
    resolve_data_root,
    shared_data_root,
    shipped_folder,
)
from cxrbench.data.manifests import (
    IMAGE_SUFFIXES,
    ManifestError,
    MissingFiles,
    bounding_boxes,
    load_manifest,
    read_image_folder,
    read_kermany,
    read_manifest_csv,
    read_mask_pairs,
    read_nih,
    read_nih_table,
)
from cxrbench.data.splits import (
    SPLIT_NAMES,
    SplitError,
    check_patient_disjoint,
    check_split_provenance,
    load_split,
    manifest_fingerprint,
    patient_split,
    save_split,
    split_provenance,
    split_summary,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from cxrbench.data.dataset import CacheReport, CXRDataset, ImageCache, default_cache_dir

#: the names of :mod:`cxrbench.data.dataset`, imported (with torch) when first asked for
_LAZY = ("CacheReport", "CXRDataset", "ImageCache", "default_cache_dir")

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLIT_NAMES",
    "CXRDataset",
    "CacheReport",
    "DataRoot",
    "DataRootError",
    "ImageCache",
    "ManifestError",
    "MissingFiles",
    "SplitError",
    "bounding_boxes",
    "check_patient_disjoint",
    "check_split_provenance",
    "default_cache_dir",
    "find_shared_data",
    "load_manifest",
    "load_split",
    "locate_data_root",
    "manifest_fingerprint",
    "patient_split",
    "read_image_folder",
    "read_kermany",
    "read_manifest_csv",
    "read_mask_pairs",
    "read_nih",
    "read_nih_table",
    "resolve_data_root",
    "save_split",
    "shared_data_root",
    "shipped_folder",
    "split_provenance",
    "split_summary",
]


def __getattr__(name: str) -> Any:
    """A name of :mod:`cxrbench.data.dataset`, imported (with torch) when first asked for."""
    if name in _LAZY:
        value = getattr(importlib.import_module("cxrbench.data.dataset"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cxrbench.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
