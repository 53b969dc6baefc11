"""The run folder every training family shares: config key, checkpoint files, best weights, split, metric log.

Checkpoints hold tensors and plain Python values only and are read with ``torch.load(weights_only=True)``;
they are written to a temporary file and renamed, so a run killed while saving keeps the previous
checkpoint intact. What a checkpoint holds and when it is written is decided in one place, the epoch
loop (:mod:`cxrbench.train.loop`); this module has the pieces it is made of.
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrbench.data import CXRDataset, SplitError, check_split_provenance, load_split, patient_split, save_split

__all__ = [
    "BEST_WEIGHTS",
    "CHECKPOINT",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "MetricLog",
    "RunConfig",
    "best_weights_epoch",
    "decode_all",
    "load_best",
    "load_checkpoint",
    "open_run",
    "restore_training_state",
    "rng_state",
    "run_split",
    "save_best",
    "save_checkpoint",
    "save_training_state",
    "seed_everything",
    "set_rng_state",
    "training_record",
]

CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "best.safetensors"
#: version of the checkpoint layout written by :func:`save_training_state`; others are refused on resume
CHECKPOINT_FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume (missing, corrupted, or from another configuration)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The random states needed to resume exactly (tensors and plain values only)."""
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": list(py_state[1]), "python_version": py_state[0],
             "python_gauss": py_state[2], "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write a checkpoint (tensors, numbers, strings, lists and dicts of them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle ...
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None


def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, dict):
        return {k: _state_of(v) for k, v in obj.items()}
    return obj.state_dict()


def _restore(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _restore(v, state[k])
    else:
        obj.load_state_dict(state)


def save_training_state(out: Path, epoch: int, model: nn.Module, stateful: dict[str, Any], cfg: RunConfig,
                        *, rng: list[dict[str, Any]] | None = None, **extra: Any) -> Path:
    """Atomically checkpoint a finished epoch to ``out/checkpoint.pt``.

    Holds the format version, the epoch, the model, every optimizer / scheduler / generator named in
    ``stateful`` (nested dicts allowed), the random states (``rng``: one per rank, default this
    process's), the config key and the ``extra`` values.
    """
    state = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "model": model.state_dict(),
             **{k: _state_of(v) for k, v in stateful.items()}, "rng": rng if rng is not None else [rng_state()],
             "config_key": cfg.resume_key(), **extra}
    return save_checkpoint(out / CHECKPOINT, state)


def restore_training_state(ckpt: dict[str, Any], model: nn.Module, stateful: dict[str, Any], rank: int = 0) -> int:
    """Load what :func:`save_training_state` wrote back into ``model`` and ``stateful``; the next epoch.

    Rank ``rank`` takes its own random states; a checkpoint of fewer ranks gives rank 0's (with a
    warning: the run goes on, but not bit-identically to an uninterrupted one).
    """
    model.load_state_dict(ckpt["model"])
    for k, v in stateful.items():
        _restore(v, ckpt[k])
    states = ckpt["rng"]
    if rank >= len(states):
        warnings.warn(f"the checkpoint has random states of {len(states)} ranks; rank {rank} takes rank 0's",
                      RuntimeWarning, stacklevel=2)
    set_rng_state(states[rank] if rank < len(states) else states[0])
    return int(ckpt["epoch"]) + 1


# --------------------------------------------------------------------------------------------------
# run folders: config, split, resume, best weights


class RunConfig:
    """Mixin for the dataclass configs of a training run (all fields JSON-serialisable).

    ``RESUME_MAY_CHANGE`` names the fields a resumed run may change; every other field must match the
    checkpoint's (:meth:`resume_key`).
    """

    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("epochs", "device")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a dict."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The config of a dict such as ``config.json``'s (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in known})

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the original, as plain JSON values."""
        d = {k: v for k, v in self.to_dict().items() if k not in self.RESUME_MAY_CHANGE}
        return json.loads(json.dumps(d))


def open_run(out: Path, cfg: RunConfig, resume: bool, *, write: bool = True) -> dict[str, Any] | None:
    """The checkpoint to resume from, or ``None`` for a fresh run (then ``config.json`` is written).

    A checkpoint written with other settings, or in another checkpoint format, raises
    :class:`CheckpointError` naming what differs (and the settings that may change).
    """
    path = out / CHECKPOINT
    if resume and path.is_file():
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {ckpt.get('format', 1)} was written by another "
                                  f"cxrbench version (this one reads format {CHECKPOINT_FORMAT}); start a new run "
                                  "folder")
        saved, now = ckpt.get("config_key") or {}, cfg.resume_key()
        if saved != now:
            differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise CheckpointError(
                f"{path}: was written with other settings ({', '.join(differ)} differ); start a new run folder "
                f"or use the same settings (only {', '.join(cfg.RESUME_MAY_CHANGE)} may change)")
        return ckpt
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return None


def save_best(model: nn.Module, out: Path, epoch: int | None = None, *, name: str = BEST_WEIGHTS) -> Path:
    """Atomically write the model's weights to ``out/name`` (the epoch goes into the file's metadata)."""
    from safetensors.torch import save_file

    path = out / name
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"epoch": str(epoch)} if epoch is not None else None
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def best_weights_epoch(path: Path) -> int | None:
    """The epoch recorded in a weights file by :func:`save_best`; None when absent or not recorded."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        epoch = (f.metadata() or {}).get("epoch")
    return int(epoch) if epoch is not None else None


def load_best(model: nn.Module, out: Path) -> nn.Module:
    """Load ``out/best.safetensors`` (the best epoch's weights) when there is one; eval mode."""
    from safetensors.torch import load_file

    if (out / BEST_WEIGHTS).is_file():
        model.load_state_dict(load_file(str(out / BEST_WEIGHTS)))
    return model.eval()


def run_split(manifest: pd.DataFrame, out: Path, fractions: tuple[float, float, float], seed: int,
              split: pd.Series | None = None, *, write: bool = True) -> pd.Series:
    """The run's split: ``split`` if given, else ``out/split.csv`` (a resumed run), else a seeded patient split.

    A saved split is reused only when it was made with this seed, these fractions and for this manifest
    (:func:`~cxrbench.data.check_split_provenance`; a given ``split`` must equal it), else a
    :class:`~cxrbench.data.SplitError` says what differs. A new split is checked first (images in train and
    val) and only then written, atomically, so a failed run leaves no split behind to poison the folder.
    """
    path = out / "split.csv"
    saved = None
    if path.is_file():
        check_split_provenance(path, manifest, seed=None if split is not None else seed,
                               fractions=None if split is not None else fractions)
        saved = load_split(path, manifest)
    if split is not None:
        s = pd.Series(np.asarray(split), index=manifest.index, name="split")
        if saved is not None and (n := int((saved.to_numpy() != s.to_numpy()).sum())):
            raise SplitError(f"{path}: the split given differs from this run's in {n} of {len(s)} images; give the "
                             "same split, or start the run again (--overwrite)")
    else:
        s = saved if saved is not None else patient_split(manifest, fractions, seed=seed)
    for name in ("train", "val"):
        if not (s == name).any():
            raise ValueError(f"the split has no '{name}' images ({len(manifest)} images in all); use more data")
    if write and saved is None:
        given = split is not None  # a given split was not made from the seed and fractions
        save_split(manifest, s, path, seed=None if given else seed, fractions=None if given else fractions)
    return s


def decode_all(dataset: CXRDataset, progress: bool, workers: int = 0) -> None:
    """Decode every file of ``dataset`` once into its uint8 cache, in ``max(2, workers)`` threads (a run's
    DataLoader workers: a machine given 12 for training has the cores to decode with); one warning lists the
    unreadable ones."""
    report = dataset.build_cache(workers=max(2, workers), progress=progress)
    if report.n_failed:
        print(f"warning: {report.summary()}")


def training_record(out: Path, manifest: pd.DataFrame, s: pd.Series, cfg: RunConfig, epochs_run: int,
                    data_description: str = "", **extra: Any) -> dict[str, Any]:
    """The ``training`` block of a bundle's card: data, split, seed, epochs and the full config."""
    return {"data": data_description or str(manifest.attrs.get("root", "")), "n_images": int(len(manifest)),
            "split_file": str(out / "split.csv"), "split_counts": s.value_counts().to_dict(),
            "seed": getattr(cfg, "seed"), "epochs_run": epochs_run, "config": cfg.to_dict(), **extra}


# --------------------------------------------------------------------------------------------------
# per-epoch metrics CSV


class MetricLog:
    """Per-epoch metrics CSV, rewritten atomically on every append; a resumed run truncates it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def rows(self) -> list[dict[str, str]]:
        """The logged rows (values as strings)."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def last_epoch(self) -> int:
        """The epoch of the last row; 0 for an empty log."""
        rows = self.rows()
        return int(rows[-1]["epoch"]) if rows else 0

    def truncate_after(self, epoch: int) -> None:
        """Keep rows with ``epoch <= epoch`` (those of the checkpoint being resumed)."""
        kept = [r for r in self.rows() if int(r["epoch"]) <= epoch]
        if kept:
            self._write(kept, list(kept[0]))
        else:
            self.path.unlink(missing_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        """Add one row; new keys become new columns (blank in earlier rows)."""
        rows = self.rows()
        names = list(rows[0]) if rows else list(row)
        names += [k for k in row if k not in names]
        self._write([*rows, {k: _fmt(v) for k, v in row.items()}], names)

    def _write(self, rows: list[dict[str, Any]], names: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
