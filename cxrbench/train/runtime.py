"""Where and how a training process runs: the device, the one AMP policy, torchrun's process group.

:class:`RunContext` gathers them for the families' methods (:mod:`cxrbench.train.family`); the epoch
loop (:mod:`cxrbench.train.loop`) makes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["LOADER_WORKERS_CAP", "PRECISION_MODES", "DistInfo", "Precision", "RunContext", "autocast", "cpu_flags",
           "cpu_has_fast_bf16", "dist_info", "init_distributed", "loader_workers", "pick_device", "precision_policy",
           "process_group_backend"]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# device, precision, distributed


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else CPU. Under torchrun, the rank's local GPU.

    A device this machine does not have (``cuda`` without a GPU, ``cuda:3`` on a one-GPU machine, ``mps`` off a
    Mac) is a :class:`ValueError` naming it, before any data are read: never a torch traceback mid-run.
    """
    if device == "auto":
        if torch.cuda.is_available():  # more processes than GPUs (torchrun on one GPU): they share them
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"--device {device}: this machine has {have}; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine; use --device cpu or auto")
    return dev


#: ``--precision`` choices: ``auto`` (bf16 + channels_last where the hardware pays for it), ``fp32``, ``bf16``
PRECISION_MODES = ("auto", "fp32", "bf16")
#: /proc/cpuinfo flags of CPUs with native bf16 matrix arithmetic (AVX512-BF16; AMX on Intel Sapphire Rapids+)
FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(path: str | os.PathLike = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (the first ``flags`` line); empty where there is none
    (not Linux, or an unreadable file)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16(flags: frozenset[str] | set[str] | None = None) -> bool:
    """Whether a CPU with these flags (default: this one's, :func:`cpu_flags`) computes bf16 natively."""
    return bool(FAST_BF16_FLAGS & set(cpu_flags() if flags is None else flags))


@dataclass(frozen=True)
class Precision:
    """How the training steps compute: the autocast dtype (None: fp32), the memory format, and why."""

    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    #: how it was chosen, e.g. ``"auto: the CPU has avx512_bf16"`` (recorded next to :meth:`describe`)
    reason: str = ""

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The autocast context for forward passes and losses on ``device`` (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """E.g. ``"bf16 autocast, channels_last"`` or ``"fp32"`` (recorded in results and cards)."""
        names = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
        name = names.get(self.autocast_dtype, f"{self.autocast_dtype} autocast")
        return name + (", channels_last" if self.channels_last else "")


def precision_policy(device: torch.device, amp: bool = True, channels_last: bool = True, mode: str = "auto",
                     flags: frozenset[str] | set[str] | None = None) -> Precision:
    """The one AMP policy: what a family that asks for ``amp`` / ``channels_last`` gets on ``device``.

    ``mode="auto"``: bf16 autocast (no loss scaling needed) and channels_last where they pay: on CUDA, and on
    CPUs reporting ``avx512_bf16`` or ``amx_bf16`` (``flags``: the CPU's, default :func:`cpu_flags`), where a
    DenseNet-121 step is about twice as fast; fp32 elsewhere. ``"fp32"``: never (``--precision fp32``);
    ``"bf16"``: whatever the hardware (slow where it is emulated). A family that does not ask gets fp32.
    """
    if mode not in PRECISION_MODES:
        raise ValueError(f"unknown precision {mode!r}; choose one of {list(PRECISION_MODES)}")
    if mode == "fp32":
        return Precision(None, False, "fp32 asked for")
    if mode == "bf16":
        fast, reason = True, "bf16 asked for"
    elif device.type == "cuda":
        fast, reason = True, "auto: CUDA"
    elif device.type == "cpu":
        have = sorted(FAST_BF16_FLAGS & set(cpu_flags() if flags is None else flags))
        fast = bool(have)
        reason = f"auto: the CPU has {' and '.join(have)}" if fast else "auto: the CPU has no avx512_bf16 or AMX"
    else:
        fast, reason = False, f"auto: fp32 on {device.type}"
    return Precision(torch.bfloat16 if amp and fast else None, channels_last and fast, reason)


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context :func:`precision_policy` chooses for ``device`` (for benchmarks and tools)."""
    return precision_policy(device, amp=enabled, channels_last=False).autocast(device)


@dataclass(frozen=True)
class DistInfo:
    """Where the current process stands in a torchrun job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part (DDP)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that logs and writes."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment (1 process when not under torchrun)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def process_group_backend(device: torch.device, local_processes: int, gpus: int) -> str:
    """``nccl`` when each of this node's ``local_processes`` has a GPU of its own, else ``gloo`` (the CPU, and
    processes sharing a GPU, which NCCL refuses: "Duplicate GPU detected"; gloo reduces CUDA tensors too)."""
    return "nccl" if device.type == "cuda" and local_processes <= gpus else "gloo"


#: the most DataLoader workers ``auto`` gives a process (:func:`loader_workers`)
LOADER_WORKERS_CAP = 8


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def loader_workers(requested: int | None, device: torch.device, local_processes: int | None = None,
                   cpus: int | None = None) -> tuple[int, str]:
    """The training DataLoader's worker processes and why: ``requested`` when given (``--workers N``); ``None``
    is ``auto``.

    ``auto``: none on the CPU, where the training threads use the cores and the augmentation is a few % of a step.
    On a GPU (CUDA, MPS), this process's share of the ``cpus`` (default: those it may run on) among the
    ``local_processes`` of this node (default: torchrun's ``LOCAL_WORLD_SIZE``, else 1), less one for the
    process itself, between 1 and :data:`LOADER_WORKERS_CAP`. In the main process, the decoding and augmentation
    (~0.6 ms an image on one core) serialise with the kernel launches: an H200 trains DenseNet-121 at 2,461 img/s
    with 12 workers (README), which one process could not feed.
    """
    if requested is not None:
        if requested < 0:
            raise ValueError(f"the number of DataLoader workers must be >= 0 (or auto), got {requested}")
        return int(requested), f"{requested} asked for"
    if device.type == "cpu":
        return 0, "auto: none on the CPU"
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", dist_info().world_size))
    cpus = _usable_cpus() if cpus is None else cpus
    share = max(1, cpus // max(1, local_processes))
    n = max(1, min(LOADER_WORKERS_CAP, share - 1))
    per = f" for each of {local_processes} processes" if local_processes > 1 else ""
    return n, f"auto: {device.type}, {cpus} CPUs{per}"


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (:func:`process_group_backend`); no-op for one process."""
    info = dist_info()
    if info.enabled and not torch.distributed.is_initialized():
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.set_device(device)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
        torch.distributed.init_process_group(backend=process_group_backend(device, local, gpus))
    return info


# --------------------------------------------------------------------------------------------------
# the context a family's methods get


@dataclass
class RunContext:
    """Where and how this process trains; handed to every method of a family.

    ``resuming`` says whether the loop resumes a checkpoint (decided before ``prepare``, so a family
    can tell a resumed run from a fresh one in a used folder).
    """

    out: Path
    device: torch.device
    dist: DistInfo
    precision: Precision
    progress: bool
    resuming: bool = False
    #: the training DataLoader's worker processes (:func:`loader_workers`; the cache decodes in max(2, this)
    #: threads) and why
    workers: int = 0
    workers_reason: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder."""
        return self.dist.is_main

    def barrier(self) -> None:
        """Wait for every rank (a no-op for one process)."""
        if self.dist.enabled:
            torch.distributed.barrier()

    def main_first(self, fn: Callable[[bool], T]) -> T:
        """``fn(True)`` on rank 0 (it may write), then, after a barrier, ``fn(False)`` on the others."""
        value = fn(True) if self.is_main else None
        self.barrier()
        return value if self.is_main else fn(False)  # type: ignore[return-value]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Wrap forward passes and losses (not backward) in this."""
        return self.precision.autocast(self.device)

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the run's device, channels_last when the precision policy says so."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.precision.channels_last else model

    def to_device(self, batch: Sequence[Any]) -> list[Any]:
        """Tensors of a batch onto the device; the first (the images) channels_last when chosen."""
        moved = [b.to(self.device, non_blocking=True) if isinstance(b, torch.Tensor) else b for b in batch]
        if self.precision.channels_last and moved and getattr(moved[0], "ndim", 0) == 4:
            moved[0] = moved[0].contiguous(memory_format=torch.channels_last)
        return moved
