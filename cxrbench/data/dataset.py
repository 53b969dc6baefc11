"""A multi-label torch ``Dataset`` that decodes each file once into an on-disk uint8 cache.

Decoding a 1024 px PNG and resizing it costs ~20-40 ms; doing it every epoch makes a CPU or a GPU wait
on the disk. :class:`ImageCache` keeps the *geometry* step of :class:`~cxrbench.preprocess.Preprocess`
(crop + resize) as uint8 in one memory-mapped file per (file list, size, crop, resampling), so each
image is decoded once, ever; equalisation and normalisation (cheap, and switchable) run per item.
Several DataLoader worker processes can fill the cache at once (each writes its own rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from cxrbench.io import ImageReadError, read_image
from cxrbench.preprocess import Preprocess

__all__ = ["CXRDataset", "CacheReport", "ImageCache", "default_cache_dir"]

_PENDING, _OK, _FAILED = 0, 1, 2


def default_cache_dir() -> Path:
    """``$CXRBENCH_CACHE`` or ``~/.cache/cxrbench``."""
    return Path(os.environ.get("CXRBENCH_CACHE") or Path.home() / ".cache" / "cxrbench")


@dataclass
class CacheReport:
    """What :meth:`ImageCache.build` did: counts, failures (path -> reason) and seconds."""

    n_total: int
    n_decoded: int
    n_cached_before: int
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        """How many files could not be decoded."""
        return len(self.failures)

    def summary(self) -> str:
        """One line: how many images were cached, decoded and unreadable, and how long it took."""
        s = (f"{self.n_total} images: {self.n_cached_before} already cached, {self.n_decoded} decoded, "
             f"{self.n_failed} unreadable, in {self.seconds:.1f} s")
        if self.failures:
            head = "; ".join(f"{Path(p).name}: {r}" for p, r in list(self.failures.items())[:5])
            s += f" ({head}{' ...' if self.n_failed > 5 else ''})"
        return s


class ImageCache:
    """Crop-and-resized images as ``(N, size, size)`` uint8 in a memory-mapped file.

    Parameters
    ----------
    paths : image files, in dataset order.
    preprocess : only its geometry (``size``, ``crop``, ``resample``) matters here.
    cache_dir : folder for the cache; ``None`` disables caching (every access decodes the file).
    """

    def __init__(self, paths: Sequence[str], preprocess: Preprocess, cache_dir: str | os.PathLike | None):
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess
        self.size = preprocess.size
        self.dir: Path | None = None
        self._pixels: np.memmap | None = None
        self._status: np.memmap | None = None
        if cache_dir is not None:
            self.dir = Path(cache_dir) / self.key()
            self._open()

    def key(self) -> str:
        """Hash of the file list (paths, sizes, mtimes) and the geometry settings."""
        h = hashlib.sha1()
        g = {k: self.preprocess.to_dict()[k] for k in ("size", "crop", "resample")}
        h.update(json.dumps(g, sort_keys=True).encode())
        for p in self.paths:
            try:
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
        return h.hexdigest()[:20]

    def _open(self) -> None:
        assert self.dir is not None
        self.dir.mkdir(parents=True, exist_ok=True)
        n, s = len(self.paths), self.size
        pix, stat = self.dir / "pixels.u8", self.dir / "status.u8"
        if (not stat.exists() or stat.stat().st_size != max(n, 1)
                or not pix.exists() or pix.stat().st_size != max(n * s * s, 1)):
            # create both files at full size (sparse on most file systems), status last
            with open(pix, "wb") as f:
                f.truncate(max(n * s * s, 1))
            with open(stat, "wb") as f:
                f.truncate(max(n, 1))
            (self.dir / "meta.json").write_text(json.dumps(
                {"n": n, "size": s, "preprocess": self.preprocess.to_dict(), "first": self.paths[:3]}, indent=1))
        self._pixels = np.memmap(pix, dtype=np.uint8, mode="r+", shape=(max(n, 1), s, s))
        self._status = np.memmap(stat, dtype=np.uint8, mode="r+", shape=(max(n, 1),))

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self):  # memmaps are reopened in each DataLoader worker
        state = self.__dict__.copy()
        state["_pixels"] = state["_status"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.dir is not None:
            self._open()

    def status(self) -> np.ndarray:
        """Per image: 0 not yet decoded, 1 cached, 2 unreadable."""
        if self._status is None:
            return np.zeros(len(self), dtype=np.uint8)
        return np.asarray(self._status[: len(self)]).copy()

    def decode(self, i: int) -> np.ndarray:
        """Read and crop-resize image ``i`` -> ``(size, size)`` uint8 (no cache involved)."""
        img = read_image(self.paths[i])
        square = self.preprocess.geometry(img.pixels)
        return np.round(square * 255.0).astype(np.uint8)

    def get(self, i: int) -> np.ndarray:
        """Image ``i`` as ``(size, size)`` uint8; decoded and stored on first use. Raises ImageReadError."""
        if self._pixels is None or self._status is None:
            return self.decode(i)
        if self._status[i] == _OK:
            return np.asarray(self._pixels[i])
        try:
            arr = self.decode(i)
        except ImageReadError:
            self._status[i] = _FAILED
            raise
        self._pixels[i] = arr
        self._status[i] = _OK
        return arr

    def build(self, indices: Sequence[int] | np.ndarray | None = None, *, workers: int = 2,
              progress: bool = False) -> CacheReport:
        """Decode every image (or those at ``indices``) not yet cached, in threads.

        Pillow releases the GIL while decoding, so two threads use two cores. Unreadable files do
        not stop the build: they are all collected in the report.
        """
        t0 = time.perf_counter()
        indices = range(len(self)) if indices is None else [int(i) for i in indices]
        before = self.status()
        todo = [i for i in indices if before[i] != _OK]
        failures: dict[str, str] = {}

        def work(i: int) -> None:
            try:
                self.get(i)
            except ImageReadError as exc:
                failures[self.paths[i]] = exc.reason

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="decoding", unit="img")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for _ in pool.map(work, todo):
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        if self._pixels is not None:
            self._pixels.flush()
            self._status.flush()  # type: ignore[union-attr]
        n = len(indices)
        return CacheReport(n, len(todo) - len(failures), n - len(todo), failures, time.perf_counter() - t0)


class CXRDataset(Dataset):
    """Images and multi-label targets of a manifest, preprocessed for a model.

    Items are ``(image, labels, index)``: ``(C, size, size)`` float32 normalised as ``preprocess`` says,
    ``(F,)`` float32 0/1, and the row number in the manifest (so predictions can be joined back).

    Parameters
    ----------
    manifest : a table from :mod:`cxrbench.data.manifests` (needs ``path``).
    preprocess : the model's :class:`~cxrbench.preprocess.Preprocess`.
    label_columns : target columns; default ``manifest.attrs["label_columns"]``.
    cache_dir : ``"auto"`` (:func:`default_cache_dir`), a folder, or ``None`` (decode every time).
    transform : optional callable on the ``(1, size, size)`` float tensor in [0, 1] before
        equalisation/normalisation (augmentation); must keep values in [0, 1].
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        preprocess: Preprocess,
        *,
        label_columns: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = "auto",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if "path" not in manifest.columns:
            raise ValueError("manifest needs a 'path' column (use cxrbench.data.load_manifest)")
        self.manifest = manifest.reset_index(drop=True)
        self.preprocess = preprocess
        cols = list(label_columns if label_columns is not None else manifest.attrs.get("label_columns", []))
        absent = [c for c in cols if c not in manifest.columns]
        if absent:
            raise ValueError(f"label columns {absent} are not in the manifest")
        self.label_columns = cols
        self.labels = (np.array(self.manifest[cols].to_numpy(dtype=np.float32)) if cols
                       else np.zeros((len(manifest), 0), np.float32))
        if cache_dir == "auto":
            cache_dir = default_cache_dir()
        self.cache = ImageCache(self.manifest["path"].tolist(), preprocess, cache_dir)
        self.rows = np.arange(len(self.manifest))  # positions of this dataset's items in the cache
        self.transform = transform

    def __len__(self) -> int:
        return len(self.manifest)

    def display_image(self, i: int) -> np.ndarray:
        """The cropped, resized image ``i`` as ``(size, size)`` float32 in [0, 1] (what overlays go on)."""
        return self.cache.get(int(self.rows[i])).astype(np.float32) / 255.0

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.display_image(i))[None]
        if self.transform is not None:
            img = self.transform(img).clamp_(0.0, 1.0)
        x = self.preprocess.intensity(img[0].numpy())
        return torch.from_numpy(x), torch.from_numpy(self.labels[i]), i

    def build_cache(self, *, workers: int = 2, progress: bool = False) -> CacheReport:
        """Decode all images once (see :meth:`ImageCache.build`)."""
        return self.cache.build(self.rows, workers=workers, progress=progress)

    def readable(self) -> "CXRDataset":
        """A copy without the rows the cache found unreadable (build the cache first)."""
        return self.subset(self.cache.status()[self.rows] != _FAILED)

    def subset(self, rows: Sequence[int] | np.ndarray | pd.Series) -> "CXRDataset":
        """The dataset restricted to some rows (a boolean mask or positions); shares this one's cache."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if len(rows) != len(self):
                raise ValueError(f"boolean mask of length {len(rows)} for a dataset of {len(self)}")
            rows = np.flatnonzero(rows)
        sub = object.__new__(CXRDataset)
        sub.manifest = self.manifest.iloc[rows].reset_index(drop=True)
        sub.manifest.attrs = dict(self.manifest.attrs)
        sub.preprocess, sub.label_columns, sub.transform = self.preprocess, self.label_columns, self.transform
        sub.labels = self.labels[rows]
        sub.cache, sub.rows = self.cache, self.rows[rows]
        return sub

    # ------------------------------------------------------------------ label statistics
    def prevalence(self) -> pd.Series:
        """Fraction of positive images per label."""
        return pd.Series(self.labels.mean(axis=0, dtype=np.float64) if len(self) else np.nan, index=self.label_columns,
                         name="prevalence")

    def pos_weight(self, max_weight: float = 100.0) -> torch.Tensor:
        """``n_negative / n_positive`` per label for ``BCEWithLogitsLoss(pos_weight=...)``.

        Labels without positives get weight 1 (they cannot be learned from this data); weights are
        capped at ``max_weight``.
        """
        pos = self.labels.sum(axis=0)
        neg = len(self) - pos
        w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
        return torch.as_tensor(np.clip(w, 0.0, max_weight), dtype=torch.float32)
