"""The OOD gate's evaluation sets, each a ``(N, 1, 64, 64)`` float32 tensor in [0, 1] (the OOD models' input).

- ``non-chest``: the 70 non-chest radiographs of the dev data (shoulders, wrists, limbs);
- ``digits``: scikit-learn's 8x8 handwritten digits, upsampled (bilinear), white ink on black as given;
- ``photographs``: random square crops of scikit-image's sample photographs, in grey;
- ``paediatric``: the 450 paediatric CXRs (near-distribution: chests, but children's, other devices);
- ``rot90``, ``rot180``, ``invert``, ``noise``: held-out in-distribution CXRs, corrupted (:func:`corrupt`).

Also the labelled images the trade-off reads: a split's rows (:func:`split_rows`), the rows a model
never saw (:func:`unseen_rows`), their pixels (:func:`images_of`) and rotated copies (:func:`rotate_images`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cxrbench._types import PathLike
from cxrbench.data import CXRDataset, load_manifest, load_split
from cxrbench.io import read_image
from cxrbench.models.bundle import Bundle, ModelCard
from cxrbench.ood.scoring import OOD_PREPROCESS
from cxrbench.preprocess import Preprocess

__all__ = ["CORRUPTIONS", "PHOTOGRAPHS", "corrupt", "corrupted_sets", "dev_data_folders", "digits_set",
           "evaluation_sets", "images_of", "load_images", "photo_set", "rotate_images", "split_rows", "unseen_rows"]

CORRUPTIONS: tuple[str, ...] = ("rot90", "rot180", "invert", "noise")
#: scikit-image sample photographs shipped with the package (no download).
PHOTOGRAPHS: tuple[str, ...] = ("astronaut", "camera", "cat", "coffee", "coins", "moon", "rocket", "grass", "gravel",
                                "brick", "page", "text", "immunohistochemistry", "cell", "clock", "hubble_deep_field")


def dev_data_folders(root: PathLike) -> dict[str, Path | None]:
    """Folders of a data root: ``nih`` (in-distribution), ``nonchest``, ``pediatric`` (None where absent).

    For the shared dev data (a folder holding ``cxr/``) these are ``cxr/nih`` etc.; any other root is
    taken as the in-distribution set itself, without the OOD folders.
    """
    root = Path(root)
    if (root / "cxr" / "nih").is_dir():
        cxr = root / "cxr"
        return {name: (cxr / name if (cxr / name).is_dir() else None) for name in ("nih", "nonchest", "pediatric")}
    return {"nih": root, "nonchest": None, "pediatric": None}


def split_rows(manifest: pd.DataFrame, split_file: PathLike, name: str = "test") -> pd.DataFrame:
    """The rows of ``manifest`` in split ``name`` of a saved split CSV (e.g. an OOD run's held-out ``test``)."""
    s = load_split(split_file, manifest)
    rows = manifest[(s == name).to_numpy()].reset_index(drop=True)
    rows.attrs = dict(manifest.attrs)
    return rows


def load_images(source: PathLike | pd.DataFrame, *, preprocess: Preprocess = OOD_PREPROCESS,
                cache_dir: PathLike | None = "auto") -> tuple[torch.Tensor, pd.DataFrame]:
    """Images of a data folder or manifest as ``(N, C, S, S)`` float32 (``(N, 1, 64, 64)`` in [0, 1] by default).

    Files are read with :func:`cxrbench.io.read_image` through the uint8 cache; unreadable ones are
    dropped with a warning. Returns the tensor and the manifest rows it holds, in order.
    """
    manifest = source if isinstance(source, pd.DataFrame) else load_manifest(source, on_missing="drop")
    ds = CXRDataset(manifest, preprocess, label_columns=[], cache_dir=cache_dir)
    report = ds.build_cache()
    if report.n_failed:
        warnings.warn(report.summary(), stacklevel=2)
    ds = ds.readable()
    if len(ds) == 0:
        return torch.zeros(0, preprocess.channels, preprocess.size, preprocess.size), ds.manifest
    return torch.stack([ds[i][0] for i in range(len(ds))]), ds.manifest


def digits_set(n: int | None = None, *, size: int = 64, seed: int = 0) -> torch.Tensor:
    """scikit-learn's handwritten digits (8x8, 0-16) as ``(n, 1, size, size)`` in [0, 1]; all 1,797 if n is None."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None]
    if n is not None:
        images = images[torch.as_tensor(np.random.default_rng(seed).permutation(len(images))[:n])]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def photo_set(crops_per_image: int = 8, *, size: int = 64, seed: int = 0,
              names: Sequence[str] = PHOTOGRAPHS) -> torch.Tensor:
    """Random square crops (side 40-100 % of the short side) of scikit-image photographs, grey, resized.

    Returns ``(len(names) * crops_per_image, 1, size, size)`` float32 in [0, 1].
    """
    import skimage.data
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.transform import resize
    from skimage.util import img_as_float

    rng = np.random.default_rng(seed)
    crops = []
    for name in names:
        img = img_as_float(getattr(skimage.data, name)())
        if img.ndim == 3:
            img = rgb2gray(rgba2rgb(img) if img.shape[-1] == 4 else img)
        h, w = img.shape
        for _ in range(crops_per_image):
            side = int(rng.uniform(0.4, 1.0) * min(h, w))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = resize(img[top:top + side, left:left + side], (size, size), anti_aliasing=True)
            crops.append(np.clip(crop, 0.0, 1.0))
    return torch.as_tensor(np.stack(crops)[:, None], dtype=torch.float32)


def corrupted_sets(x: torch.Tensor, kinds: Sequence[str] = CORRUPTIONS, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Corrupted copies of in-distribution images ``(N, 1, S, S)`` in [0, 1]: kind -> tensor of the same shape."""
    g = torch.Generator().manual_seed(seed)
    return {kind: corrupt(x, kind, generator=g) for kind in kinds}  # type: ignore[arg-type]


def evaluation_sets(data_root: PathLike | None, held_out: torch.Tensor, *, n_digits: int | None = 500,
                    crops_per_photo: int = 8, seed: int = 0,
                    cache_dir: PathLike | None = "auto") -> dict[str, torch.Tensor]:
    """All OOD evaluation sets (see module doc), ``name -> (N, 1, 64, 64)`` in [0, 1].

    ``held_out`` are in-distribution images not used in training (they are corrupted). Sets whose
    folders are absent from ``data_root`` are left out with a warning.
    """
    folders = dev_data_folders(data_root) if data_root else {"nonchest": None, "pediatric": None}

    def folder_set(key: str, name: str) -> dict[str, torch.Tensor]:
        folder = folders.get(key)
        if folder is None:
            warnings.warn(f"no {key} folder under {data_root}; the '{name}' set is left out", stacklevel=3)
            return {}
        return {name: load_images(folder, cache_dir=cache_dir)[0]}

    return {**folder_set("nonchest", "non-chest"), "digits": digits_set(n_digits, seed=seed),
            "photographs": photo_set(crops_per_photo, seed=seed), **folder_set("pediatric", "paediatric"),
            **corrupted_sets(held_out, seed=seed)}


def corrupt(
    x: torch.Tensor,
    kind: Literal["rot90", "rot180", "invert", "noise"],
    *,
    noise_sigma: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Corrupted copy of a (B, C, H, W) batch in [0, 1] for OOD evaluation.

    ``"rot90"`` / ``"rot180"``: rotation in the image plane (rot90 needs H == W to keep the
    shape); ``"invert"``: 1 - x; ``"noise"``: x + N(0, noise_sigma^2), clipped to [0, 1].
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if kind == "rot90":
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"rot90 needs square images, got {tuple(x.shape[-2:])}")
        return torch.rot90(x, 1, dims=(-2, -1))
    if kind == "rot180":
        return torch.rot90(x, 2, dims=(-2, -1))
    if kind == "invert":
        return 1.0 - x
    if kind == "noise":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + noise_sigma * noise).clamp(0.0, 1.0)
    raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")


def images_of(manifest: pd.DataFrame) -> list[np.ndarray]:
    """The ``(H, W)`` float32 [0, 1] pixels of every manifest row (read with :func:`cxrbench.io.read_image`)."""
    return [read_image(p).pixels for p in manifest["path"]]


def rotate_images(images: Sequence[np.ndarray], angle: float) -> list[np.ndarray]:
    """Images rotated anticlockwise by ``angle`` degrees about their centre, same size, black corners."""
    from skimage.transform import rotate

    if angle % 360 == 0:
        return [np.asarray(img, dtype=np.float32) for img in images]
    return [np.clip(rotate(img, angle, resize=False, mode="constant", cval=0.0, order=1), 0, 1)
            .astype(np.float32) for img in images]


def unseen_rows(classifier: Bundle | ModelCard, manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows the model (a bundle, or only its card) neither trained nor calibrated on: where its split file
    lists an image, only images of its ``test`` split are kept; images it never listed (another data set) all stay."""
    card = classifier.card if isinstance(classifier, Bundle) else classifier
    split_file = Path(str(card.training.get("split_file", "")))
    if not split_file.is_file():
        return manifest
    split = pd.read_csv(split_file, dtype=str)
    seen = set(split.loc[split["split"] != "test", "image_id"])
    rows = manifest[~manifest["image_id"].astype(str).isin(seen)].reset_index(drop=True)
    rows.attrs = dict(manifest.attrs)
    return rows
