"""What every training loop shares: seeding, devices, AMP, checkpoints, metric logs, DDP.

Checkpoints hold tensors and plain Python values only and are read with ``torch.load(weights_only=True)``;
they are written to a temporary file and renamed, so a run killed while saving keeps the previous
checkpoint intact. ``--resume`` continues from the last finished epoch with the same optimizer,
scheduler and random-number states.
"""

from __future__ import annotations

import contextlib
import csv
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "DistInfo",
    "MetricLog",
    "autocast",
    "dist_info",
    "init_distributed",
    "load_checkpoint",
    "pick_device",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]


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
