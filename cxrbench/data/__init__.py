"""Datasets: manifests of the public layouts, patient-level splits, a cached torch Dataset, phantoms.

>>> from cxrbench.data import load_manifest, patient_split
>>> df = load_manifest("../shared/data/cxr/nih")          # doctest: +SKIP
>>> df["split"] = patient_split(df, seed=0)               # doctest: +SKIP
"""

from cxrbench.data.dataset import CacheReport, CXRDataset, ImageCache, default_cache_dir
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
