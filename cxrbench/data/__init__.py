"""Datasets: manifests of the public layouts, patient-level splits, a cached torch Dataset, phantoms.

>>> from cxrbench.data import load_manifest, patient_split
>>> df = load_manifest("../shared/data/cxr/nih")          # doctest: +SKIP
>>> df["split"] = patient_split(df, seed=0)               # doctest: +SKIP
"""

from cxrbench.data.dataset import CacheReport, CXRDataset, ImageCache, default_cache_dir
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
    load_split,
    patient_split,
    save_split,
    split_summary,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLIT_NAMES",
    "CXRDataset",
    "CacheReport",
    "ImageCache",
    "ManifestError",
    "MissingFiles",
    "SplitError",
    "bounding_boxes",
    "check_patient_disjoint",
    "default_cache_dir",
    "load_manifest",
    "load_split",
    "patient_split",
    "read_image_folder",
    "read_kermany",
    "read_manifest_csv",
    "read_mask_pairs",
    "read_nih",
    "read_nih_table",
    "save_split",
    "resolve_data_root",
    "shared_data_root",
    "split_summary",
]


def shared_data_root():
    """The real dev data: ``$CXRBENCH_SHARED_DATA`` or ``../shared/data`` beside the checkout, else None."""
    import os
    from pathlib import Path

    env = os.environ.get("CXRBENCH_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for c in candidates:
        if (c / "cxr").is_dir():
            return c
    return None


def resolve_data_root(data_root=None, *, n_phantoms: int = 64, seed: int = 0):
    """Where a notebook or the demo reads its data, and what kind it is.

    Returns ``(path, kind)``: ``data_root`` itself (``"custom"``) when given; else the shared dev data
    (``"shared"``, the folder holding ``cxr/`` and ``nih_metadata/``); else a synthetic phantom set written
    once under the cache folder (``"phantoms"``), the offline default.
    """
    from pathlib import Path

    if data_root:
        path = Path(data_root)
        if not path.exists():
            raise ManifestError(f"{path}: data root does not exist")
        return path, "custom"
    shared = shared_data_root()
    if shared is not None:
        return shared, "shared"
    from cxrbench.data.synthetic import write_phantom_set

    root = default_cache_dir() / f"phantoms-n{n_phantoms}-s{seed}"
    if not (root / "manifest.csv").is_file():
        write_phantom_set(root, n_phantoms, size=256, seed=seed)
    return root, "phantoms"
