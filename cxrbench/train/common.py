"""What every training loop shares: seeding, devices, AMP, checkpoints, metric logs, DDP.

Checkpoints hold tensors and plain Python values only and are read with ``torch.load(weights_only=True)``;
they are written to a temporary file and renamed, so a run killed while saving keeps the previous
checkpoint intact. ``--resume`` continues from the last finished epoch with the same optimizer,
scheduler and random-number states.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrbench.data import load_split, patient_split, save_split

__all__ = [
    "CHECKPOINT",
    "CheckpointError",
    "DistInfo",
    "MetricLog",
    "RunConfig",
    "autocast",
    "dist_info",
    "init_distributed",
    "load_best",
    "load_checkpoint",
    "open_run",
    "pick_device",
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


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume (missing, corrupted, or from another configuration)."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The random states needed to resume exactly (tensors and plain values only)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU. Under torchrun, the rank's local GPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA (no loss scaling needed); a no-op on the CPU."""
    if enabled and device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


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


# --------------------------------------------------------------------------------------------------
# run folders: config, split, resume, best weights


class RunConfig:
    """Mixin for the dataclass configs of a training run (all fields JSON-serialisable).

    ``RESUME_MAY_CHANGE`` names the fields a resumed run may change; every other field must match the
    checkpoint's (:meth:`resume_key`).
    """

    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ("epochs", "device")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in known})

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the original, as plain JSON values."""
        d = {k: v for k, v in self.to_dict().items() if k not in self.RESUME_MAY_CHANGE}
        return json.loads(json.dumps(d))


def open_run(out: Path, cfg: RunConfig, resume: bool, *, write: bool = True) -> dict[str, Any] | None:
    """The checkpoint to resume from, or ``None`` for a fresh run (then ``config.json`` is written).

    A checkpoint written with other settings raises :class:`CheckpointError` naming the settings that
    differ and those that may change.
    """
    path = out / CHECKPOINT
    if resume and path.is_file():
        ckpt = load_checkpoint(path)
        saved, now = ckpt.get("config_key") or {}, cfg.resume_key()
        if saved != now:
            differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise CheckpointError(
                f"{path}: was written with other settings ({', '.join(differ)} differ); start a new run folder "
                f"or use the same settings (only {', '.join(cfg.RESUME_MAY_CHANGE)} may change)")
        return ckpt
    if write:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return None


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


def save_training_state(out: Path, epoch: int, model: nn.Module, stateful: dict[str, Any],
                        cfg: RunConfig, **extra: Any) -> Path:
    """Atomically checkpoint a finished epoch: model, every optimizer / scheduler / generator named in
    ``stateful`` (nested dicts allowed), the global random states, the config key and ``extra`` values."""
    state = {"epoch": epoch, "model": model.state_dict(), **{k: _state_of(v) for k, v in stateful.items()},
             "rng": rng_state(), "config_key": cfg.resume_key(), **extra}
    return save_checkpoint(out / CHECKPOINT, state)


def restore_training_state(ckpt: dict[str, Any], model: nn.Module, stateful: dict[str, Any]) -> int:
    """Load what :func:`save_training_state` wrote back into ``model`` and ``stateful``; the next epoch."""
    model.load_state_dict(ckpt["model"])
    for k, v in stateful.items():
        _restore(v, ckpt[k])
    set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]) + 1


def save_best(model: nn.Module, out: Path) -> None:
    """Atomically write the model's weights to ``out/best.safetensors`` (read back by :func:`load_best`)."""
    from safetensors.torch import save_file

    path = out / BEST_WEIGHTS
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def load_best(model: nn.Module, out: Path) -> nn.Module:
    """Load ``out/best.safetensors`` (the best epoch's weights) when there is one; eval mode."""
    from safetensors.torch import load_file

    if (out / BEST_WEIGHTS).is_file():
        model.load_state_dict(load_file(str(out / BEST_WEIGHTS)))
    return model.eval()


def run_split(manifest: pd.DataFrame, out: Path, fractions: tuple[float, float, float], seed: int,
              split: pd.Series | None = None, *, write: bool = True) -> pd.Series:
    """The run's split: ``split`` if given, else ``out/split.csv`` (a resumed run), else a seeded patient
    split; written to ``out/split.csv``. Raises when no image lands in train or val."""
    path = out / "split.csv"
    if split is not None:
        s = pd.Series(np.asarray(split), index=manifest.index, name="split")
    elif path.is_file():
        s = load_split(path, manifest)
    else:
        s = patient_split(manifest, fractions, seed=seed)
    if write:
        save_split(manifest, s, path, seed=seed, fractions=fractions)
    for name in ("train", "val"):
        if not (s == name).any():
            raise ValueError(f"the split has no '{name}' images ({len(manifest)} images in all); use more data")
    return s


def training_record(out: Path, manifest: pd.DataFrame, s: pd.Series, cfg: RunConfig, epochs_run: int,
                    data_description: str = "", **extra: Any) -> dict[str, Any]:
    """The ``training`` block of a bundle's card: data, split, seed, epochs and the full config."""
    return {"data": data_description or str(manifest.attrs.get("root", "")), "n_images": int(len(manifest)),
            "split_file": str(out / "split.csv"), "split_counts": s.value_counts().to_dict(),
            "seed": getattr(cfg, "seed"), "epochs_run": epochs_run, "config": cfg.to_dict(), **extra}


# --------------------------------------------------------------------------------------------------
# per-epoch metrics CSV


class MetricLog:
    """Append-only CSV of per-epoch metrics; on resume, rows after the resumed epoch are dropped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def truncate_after(self, epoch: int) -> None:
        """Keep rows with ``epoch <= epoch`` (those of the checkpoint being resumed)."""
        kept = [r for r in self.rows() if int(r["epoch"]) <= epoch]
        if kept:
            self._write(kept, list(kept[0]))
        else:
            self.path.unlink(missing_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        rows = self.rows()
        fields = list(rows[0]) if rows else list(row)
        for k in row:
            if k not in fields:
                fields.append(k)
        self._write([*rows, {k: _fmt(v) for k, v in row.items()}], fields)

    def _write(self, rows: list[dict[str, Any]], fields: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# --------------------------------------------------------------------------------------------------
# distributed (torchrun)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment (1 process when not under torchrun)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); no-op for one process."""
    info = dist_info()
    if info.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return info


def wrap_ddp(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class Stopwatch:
    """Seconds since creation (wall clock)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
