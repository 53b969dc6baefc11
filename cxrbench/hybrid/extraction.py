"""The features of a whole manifest, computed chunk by chunk into a resumable on-disk cache.

:func:`extract_features` writes a feature matrix in chunks into an on-disk ``.npy`` memory map with a
per-chunk "done" flag file, so an interrupted run resumes where it stopped and memory holds one chunk
of images, whatever the number of images. Unreadable images get a NaN row; they are reported together
(one :class:`UnreadableImagesWarning`, and :func:`extraction_errors`). The per-image features are those
of :mod:`cxrbench.hybrid.features`.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrbench._types import PathLike
from cxrbench.data.dataset import ImageCache
from cxrbench.hybrid.features import (
    FEATURE_KINDS,
    FeatureSpec,
    cnn_embeddings,
    hog_features,
    lbp_features,
    model_fingerprint,
)
from cxrbench.io import ImageReadError
from cxrbench.preprocess import Preprocess

__all__ = ["DEFAULT_PREPROCESS", "UnreadableImagesWarning", "extract_features", "extraction_errors"]

#: the report's preprocessing: 224 px, histogram equalisation, [-1, 1], one channel
DEFAULT_PREPROCESS = Preprocess(size=224, equalize="hist", normalize="minus1_1", channels=1)


class UnreadableImagesWarning(UserWarning):
    """Some images could not be read; their feature rows are NaN."""


def _unwrap_bundle(model: Any) -> tuple[nn.Module, Preprocess | None]:
    """(module, its preprocessing or None) of a Bundle or a plain module."""
    if isinstance(model, nn.Module):
        return model, None
    if hasattr(model, "model") and hasattr(model, "card"):  # a cxrbench Bundle
        return model.model, model.preprocess
    raise TypeError(f"model must be a torch nn.Module or a cxrbench Bundle, got {type(model).__name__}")


def _feature_dim(kind: str, spec: FeatureSpec, preprocess: Preprocess, model: nn.Module | None) -> int:
    if kind in ("lbp", "hog"):
        return spec.dim(kind, preprocess.size)
    assert model is not None
    dim = getattr(model, "feature_dim", None)
    if dim is None:
        x = torch.zeros(1, preprocess.channels, preprocess.size, preprocess.size)
        dim = int(cnn_embeddings(model, x).shape[1])
    return int(dim)


def _sidecars(cache_path: Path) -> tuple[Path, Path, Path]:
    stem = cache_path.with_suffix("")
    return Path(f"{stem}.done.npy"), Path(f"{stem}.meta.json"), Path(f"{stem}.errors.json")


def extraction_errors(cache_path: PathLike) -> dict[str, str]:
    """``{path: reason}`` of the unreadable images of a feature cache (their rows are NaN)."""
    errors_path = _sidecars(Path(cache_path))[2]
    return json.loads(errors_path.read_text()) if errors_path.is_file() else {}


def extract_features(
    manifest: pd.DataFrame,
    kind: str,
    preprocess: Preprocess | None = None,
    cache_path: PathLike | None = None,
    chunk_size: int = 64,
    model: Any = None,
    progress: bool = True,
    *,
    spec: FeatureSpec = FeatureSpec(),
    image_cache_dir: PathLike | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Features of every image of ``manifest``, computed chunk by chunk into an on-disk cache.

    Parameters
    ----------
    manifest : table with a ``path`` column (:func:`cxrbench.data.load_manifest`); rows in order.
    kind : ``"lbp"``, ``"hog"`` or ``"cnn"``.
    preprocess : geometry and equalisation for all kinds, normalisation for ``"cnn"``. Default: the
        bundle's own for a bundle, else 224 px, histogram equalisation, [-1, 1], one channel.
    cache_path : ``.npy`` file for the ``(N, D)`` matrix; beside it ``*.done.npy`` (one flag per
        chunk), ``*.meta.json`` (what was computed) and ``*.errors.json``. A cache made with other
        settings, images or weights is recomputed. ``None``: a temporary file, nothing resumes.
    chunk_size : images per chunk (the CNN's batch); memory holds one chunk of images.
    model : for ``"cnn"``: a cxrbench :class:`~cxrbench.models.bundle.Bundle`, a cxrbench classifier or a
        torchvision-style classifier (the input of its last linear layer is taken).
    spec : LBP/HOG settings.
    image_cache_dir : optional folder for the uint8 crop cache of :class:`~cxrbench.data.ImageCache`
        (decode each file once across feature kinds); ``None`` decodes per call.
    on_chunk : called as ``on_chunk(chunk_index, n_chunks)`` after each chunk is computed and flagged
        done (chunks found done are skipped and not reported).

    Returns
    -------
    ``(N, D)`` float32 read-only memory map of ``cache_path``; rows of unreadable images are NaN,
    and one :class:`UnreadableImagesWarning` names them all (also :func:`extraction_errors`).
    """
    module, preprocess = _module_and_preprocess(kind, manifest, preprocess, model, chunk_size)
    cache_path = _cache_file(cache_path, kind)
    paths = manifest["path"].astype(str).tolist()
    n = len(paths)
    dim = _feature_dim(kind, spec, preprocess, module)
    n_chunks = (n + chunk_size - 1) // chunk_size
    images = ImageCache(paths, preprocess, image_cache_dir)
    meta = {"kind": kind, "n": n, "dim": dim, "chunk_size": chunk_size, "images": images.key(),
            "preprocess": preprocess.to_dict(), "spec": spec.to_dict() if kind != "cnn" else None,
            "model": model_fingerprint(module) if module is not None and kind == "cnn" else None}
    out, done = _open_cache(cache_path, meta, (n, dim), n_chunks)
    errors_path = _sidecars(cache_path)[2]
    errors: dict[str, str] = extraction_errors(cache_path)
    todo = [c for c in range(n_chunks) if not done[c]]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{kind} features", unit="chunk", leave=False)
    for c in todo:
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        rows, chunk_errors = _compute_chunk(kind, images, range(lo, hi), preprocess, spec, module, dim)
        out[lo:hi] = rows
        out.flush()
        if chunk_errors:
            errors.update(chunk_errors)
            errors_path.write_text(json.dumps(errors, indent=1))
        done[c] = 1
        done.flush()
        if bar is not None:
            bar.update()
        if on_chunk is not None:
            on_chunk(c, n_chunks)
    if bar is not None:
        bar.close()
    del out, done
    if errors:
        head = ", ".join(Path(p).name for p in list(errors)[:5])
        warnings.warn(f"{len(errors)} of {n} images could not be read; their {kind} rows are NaN "
                      f"({head}{' ...' if len(errors) > 5 else ''}); see extraction_errors()",
                      UnreadableImagesWarning, stacklevel=2)
    return np.load(cache_path, mmap_mode="r")


def _module_and_preprocess(kind: str, manifest: pd.DataFrame, preprocess: Preprocess | None, model: Any,
                           chunk_size: int) -> tuple[nn.Module | None, Preprocess]:
    """Check the arguments of :func:`extract_features`; the network (for ``"cnn"``) and the preprocessing to use."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {FEATURE_KINDS}, got {kind!r}")
    if "path" not in manifest.columns:
        raise ValueError("manifest needs a 'path' column (use cxrbench.data.load_manifest)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    module, bundle_pp = (None, None) if model is None else _unwrap_bundle(model)
    if kind == "cnn" and module is None:
        raise ValueError("kind='cnn' needs model= (a Bundle, a cxrbench classifier or a torchvision classifier)")
    preprocess = preprocess or bundle_pp or DEFAULT_PREPROCESS
    if kind == "cnn":
        in_ch = getattr(module, "in_channels", preprocess.channels)
        if in_ch != preprocess.channels:
            raise ValueError(f"the model takes {in_ch} channels but preprocess gives {preprocess.channels}")
    return module, preprocess


def _cache_file(cache_path: PathLike | None, kind: str) -> Path:
    """The ``.npy`` file of the cache (a fresh temporary one for None), its folder created."""
    if cache_path is None:
        cache_path = Path(tempfile.mkdtemp(prefix="cxrbench-features-")) / f"{kind}.npy"
    cache_path = Path(cache_path)
    if cache_path.suffix != ".npy":
        raise ValueError(f"cache_path must end in .npy, got {cache_path}")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    return cache_path


def _open_cache(cache_path: Path, meta: dict[str, Any], shape: tuple[int, int],
                n_chunks: int) -> tuple[np.memmap, np.memmap]:
    """The ``(N, D)`` feature memory map and the per-chunk done flags; both fresh unless ``meta`` matches."""
    done_path, meta_path, errors_path = _sidecars(cache_path)
    fresh = not (cache_path.is_file() and done_path.is_file() and meta_path.is_file()
                 and json.loads(meta_path.read_text()) == meta)
    if not fresh:
        return np.lib.format.open_memmap(cache_path, mode="r+"), np.lib.format.open_memmap(done_path, mode="r+")
    for p in (done_path, meta_path, errors_path):
        p.unlink(missing_ok=True)
    out = np.lib.format.open_memmap(cache_path, mode="w+", dtype=np.float32, shape=shape)
    done = np.lib.format.open_memmap(done_path, mode="w+", dtype=np.uint8, shape=(max(n_chunks, 1),))
    out.flush()
    done.flush()
    meta_path.write_text(json.dumps(meta, indent=1))  # written last: a cache is valid only with its meta
    return out, done


def _compute_chunk(kind: str, images: ImageCache, indices: range, preprocess: Preprocess, spec: FeatureSpec,
                   module: nn.Module | None, dim: int) -> tuple[np.ndarray, dict[str, str]]:
    """Features ``(len(indices), dim)`` float32 of one chunk (NaN rows for unreadable images)."""
    rows = np.full((len(indices), dim), np.nan, dtype=np.float32)
    errors: dict[str, str] = {}
    inputs, where = [], []
    for k, i in enumerate(indices):
        try:
            square = images.get(i).astype(np.float32) / 255.0
        except ImageReadError as exc:
            errors[images.paths[i]] = exc.reason
            continue
        if kind == "cnn":
            inputs.append(preprocess.intensity(square))
            where.append(k)
        else:
            eq = preprocess.equalized(square)
            rows[k] = lbp_features(eq, spec) if kind == "lbp" else hog_features(eq, spec)
    if inputs:
        assert module is not None
        device = next(module.parameters()).device
        emb = cnn_embeddings(module, torch.from_numpy(np.stack(inputs)).to(device))
        rows[where] = emb.cpu().numpy()
    return rows, errors
