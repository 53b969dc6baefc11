"""The one epoch loop every training family runs (classifier, OOD model, lung U-Net).

A family (:class:`~cxrbench.train.family.Family`) says how to prepare its data, build its model and
optimizers, take one training step on a batch, validate, and finish (calibration, evaluation, bundle),
plus the few :class:`~cxrbench.train.family.LoopSettings` that differ between families.
:func:`run_training` owns everything else, the same way for all: seeding, the device, bf16 autocast
and channels_last (:func:`~cxrbench.train.runtime.precision_policy`, the one AMP policy), DDP under
``torchrun`` (``DistributedSampler.set_epoch``, rank 0 validates and writes, barriers),
the training DataLoader, progress (``tqdm.auto`` and one line per epoch), ``max_steps_per_epoch``,
images/s, plateau schedulers, early stopping, the best weights and the run folder's checkpoint.

One checkpoint format, one resume strategy
    After every epoch the loop writes ``checkpoint.pt`` atomically (temporary file, then rename) and
    only then appends the epoch's row to ``metrics.csv``. The checkpoint holds the format version, the
    epoch, the model, every optimizer, scheduler and generator, the random states of every rank, the
    config key, the best value and epoch, the bad-epoch count, the elapsed training seconds and the
    epoch's metrics row; it is read with ``torch.load(weights_only=True)``. A resumed run truncates
    ``metrics.csv`` to the checkpoint's epoch (and re-adds that epoch's row from the checkpoint when a
    kill fell between the two writes), so every epoch is logged exactly once. Improved weights go to
    ``best.pending.safetensors`` first and are renamed to ``best.safetensors`` after the checkpoint, so
    the best weights always belong to an epoch the checkpoint knows.

With the same settings, data and thread count, a run killed and resumed ends with the same weights and
metrics as an uninterrupted one. For that, DataLoader workers are not persistent: each epoch's workers
are seeded from the checkpointed loader generator.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from cxrbench.train.common import (
    BEST_WEIGHTS,
    MetricLog,
    best_weights_epoch,
    load_best,
    open_run,
    restore_training_state,
    rng_state,
    save_best,
    save_training_state,
    seed_everything,
)
from cxrbench.train.family import Family, LoopResult, LoopSettings, TrainingParts
from cxrbench.train.folder import prepare_run_folder
from cxrbench.train.runtime import (
    RunContext,
    dist_info,
    init_distributed,
    loader_workers,
    pick_device,
    precision_policy,
)

__all__ = ["PENDING_BEST", "run_training"]

PENDING_BEST = "best.pending.safetensors"
R = TypeVar("R", bound=LoopResult)


@dataclass
class _Tracker:
    """Best value and epoch, epochs without improvement, training seconds: what resumes with the run."""

    mode: str
    best_value: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0
    train_seconds: float = 0.0

    def update(self, value: float, epoch: int) -> bool:
        """Count an epoch's monitored value; True when it is the best so far (NaN never is)."""
        better = value < self.best_value if self.mode == "min" else value > self.best_value
        improved = math.isfinite(value) and (self.best_epoch == 0 or better)
        if improved:
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def to_checkpoint(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "train_seconds": self.train_seconds}


class _RunningMeans:
    """Image-weighted means of each loss over an epoch's steps (kept on the device until the end)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.seen = 0

    def add(self, losses: Mapping[str, float | torch.Tensor], n: int) -> None:
        self.seen += n
        for k, v in losses.items():
            term = v.detach().double() * n if isinstance(v, torch.Tensor) else float(v) * n
            self.sums[k] = self.sums.get(k, 0.0) + term
            self.counts[k] = self.counts.get(k, 0) + n

    def means(self) -> dict[str, float]:
        return {k: float(total) / self.counts[k] for k, total in self.sums.items()}


def _open(family: Family, out: Path, resume: bool, overwrite: bool,
          progress: bool) -> tuple[RunContext, dict[str, Any] | None]:
    settings, info = family.settings, dist_info()
    if info.enabled and not settings.data_parallel:
        raise ValueError(f"{type(family).__name__} does not train data-parallel; run it as one process "
                         f"(not under torchrun with {info.world_size} processes)")
    if info.is_main:  # refuses a used or foreign folder before anything is written
        prepare_run_folder(out, resume=resume, overwrite=overwrite, progress=progress)
    device = pick_device(settings.device)
    dist = init_distributed(device)
    seed_everything(settings.seed + dist.rank)
    precision = precision_policy(device, settings.amp, settings.channels_last, settings.precision)
    workers, why = loader_workers(settings.num_workers, device)
    ctx = RunContext(out, device, dist, precision, progress, workers=workers, workers_reason=why)
    ckpt = open_run(out, family.config, resume, write=ctx.is_main)
    ctx.resuming = ckpt is not None
    ctx.barrier()  # the folder exists before any rank reads or writes in it
    return ctx, ckpt


def _train_loader(train_set: Dataset, settings: LoopSettings, ctx: RunContext,
                  parts: TrainingParts) -> tuple[DataLoader, DistributedSampler | None]:
    generator = torch.Generator().manual_seed(settings.seed + ctx.dist.rank)
    parts.generators["loader"] = generator
    n = len(train_set)  # type: ignore[arg-type]
    sampler: DistributedSampler | None = None
    if ctx.dist.enabled:
        sampler = DistributedSampler(train_set, shuffle=True, seed=settings.seed)
    loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=generator, num_workers=ctx.workers, drop_last=n > settings.batch_size,
                        pin_memory=ctx.device.type == "cuda")
    return loader, sampler


def _start(ckpt: dict[str, Any] | None, parts: TrainingParts, ctx: RunContext, log: MetricLog,
           settings: LoopSettings) -> tuple[_Tracker, int]:
    """A fresh run clears stale state; a resumed one restores it and brings the log to its epoch."""
    tracker = _Tracker(settings.mode)
    if ckpt is None:
        if ctx.is_main:
            log.truncate_after(0)
            for name in (BEST_WEIGHTS, PENDING_BEST):
                (ctx.out / name).unlink(missing_ok=True)
        return tracker, 1
    start = restore_training_state(ckpt, parts.model, parts.stateful(), rank=ctx.dist.rank)
    tracker = _Tracker(settings.mode, float(ckpt["best_value"]), int(ckpt["best_epoch"]), int(ckpt["bad_epochs"]),
                       float(ckpt["train_seconds"]))
    if ctx.is_main:
        log.truncate_after(start - 1)
        if log.last_epoch() < start - 1:  # killed between the checkpoint and the log
            log.append(ckpt["last_row"])
        pending = ctx.out / PENDING_BEST
        if best_weights_epoch(pending) == tracker.best_epoch:  # killed between the checkpoint and the rename
            os.replace(pending, ctx.out / BEST_WEIGHTS)
        pending.unlink(missing_ok=True)  # or the weights of an epoch that did not finish
        if ctx.progress:
            print(f"resuming {ctx.out} after epoch {start - 1} (best {settings.monitor} {tracker.best_value:.4f} "
                  f"at epoch {tracker.best_epoch})")
    return tracker, start


def _train_epoch(family: Family, net: nn.Module, loader: DataLoader, ctx: RunContext,
                 epoch: int) -> tuple[dict[str, float], int]:
    """One pass over the loader (at most ``max_steps_per_epoch`` steps); mean losses and images seen."""
    cap = family.settings.max_steps_per_epoch
    steps = len(loader) if cap is None else min(len(loader), cap)
    batches: Iterable[Any] = islice(loader, steps)
    if ctx.progress and ctx.is_main:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=steps, desc=f"epoch {epoch}", unit="batch", leave=False)
    net.train()
    running = _RunningMeans()
    for batch in batches:
        batch = ctx.to_device(batch)
        losses = family.train_step(net, batch, ctx)
        if losses is not None:
            running.add(losses, len(batch[0]))
    return running.means(), running.seen


def _validate(family: Family, model: nn.Module, ctx: RunContext, epoch: int) -> dict[str, Any]:
    """Rank 0 validates; every rank gets its metrics, so all take the same decisions."""
    metrics = [family.validate(model, ctx) if ctx.is_main else None]
    if ctx.dist.enabled:
        torch.distributed.broadcast_object_list(metrics, src=0)
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics[0].items()}  # type: ignore[union-attr]
    monitor = family.settings.monitor
    if monitor not in values:
        raise KeyError(f"{type(family).__name__}.validate returned no {monitor!r} (only {', '.join(values)})")
    if not math.isfinite(values[monitor]):
        warnings.warn(f"epoch {epoch}: the monitored {monitor} is {values[monitor]}; it does not count as an "
                      "improvement", RuntimeWarning, stacklevel=2)
    return values


def _checkpoint(epoch: int, parts: TrainingParts, family: Family, tracker: _Tracker, row: dict[str, Any],
                ctx: RunContext) -> None:
    """Checkpoint (every rank's random states, rank 0 writes), then settle the best weights."""
    states: list[Any] = [rng_state()]
    if ctx.dist.enabled:
        states = [None] * ctx.dist.world_size
        torch.distributed.all_gather_object(states, rng_state())
    if ctx.is_main:
        save_training_state(ctx.out, epoch, parts.model, parts.stateful(), family.config, rng=states,
                            last_row=row, **tracker.to_checkpoint())
        if (ctx.out / PENDING_BEST).is_file():
            os.replace(ctx.out / PENDING_BEST, ctx.out / BEST_WEIGHTS)


def _run_epoch(epoch: int, family: Family, net: nn.Module, parts: TrainingParts, loader: DataLoader,
               tracker: _Tracker, ctx: RunContext, log: MetricLog) -> dict[str, Any]:
    settings, clock = family.settings, time.perf_counter()
    losses, seen = _train_epoch(family, net, loader, ctx, epoch)
    train_seconds = time.perf_counter() - clock
    tracker.train_seconds += train_seconds
    metrics = _validate(family, parts.model, ctx, epoch)
    value = metrics[settings.monitor]
    for scheduler in parts.schedulers.values():
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        scheduler.step(value) if plateau else scheduler.step()
    improved = tracker.update(value, epoch)
    if improved and ctx.is_main:
        save_best(parts.model, ctx.out, epoch, name=PENDING_BEST)
    world = ctx.dist.world_size
    row = {"epoch": epoch, **losses, **metrics, "lr": next(iter(parts.optimizers.values())).param_groups[0]["lr"],
           "train_images": seen, "world_size": world, "seconds": time.perf_counter() - clock,
           "images_per_s": seen * world / max(train_seconds, 1e-9), "best": int(improved)}
    _checkpoint(epoch, parts, family, tracker, row, ctx)
    if ctx.is_main:
        log.append(row)  # after the checkpoint: a logged epoch is always a resumable one
        if ctx.progress:
            shown = [f"{label} {row.get(key, math.nan):{fmt}}" for label, key, fmt in settings.epoch_line]
            print(f"epoch {epoch}/{settings.epochs}: " + ", ".join([*shown, f"{row['images_per_s']:.1f} img/s"]))
    return row


def _wrap_ddp(model: nn.Module, ctx: RunContext) -> nn.Module:
    if not ctx.dist.enabled:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def run_training(family: Family[R], out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> R:
    """Train ``family`` into ``out_dir`` epoch by epoch, then finish it (see the module docstring).

    Parameters
    ----------
    family : the model family (its config, settings, data, steps and finish).
    out_dir : run folder (created): ``config.json``, ``checkpoint.pt``, ``metrics.csv``,
        ``best.safetensors`` and what the family writes.
    resume : continue from ``out_dir/checkpoint.pt``; an absent checkpoint starts afresh.
    overwrite : a fresh run into a folder that holds a run's results deletes them first; without it (and
        without ``resume``) such a folder is refused (:func:`~cxrbench.train.folder.prepare_run_folder`).
    progress : a progress bar per epoch and one line after it.

    Returns
    -------
    ``family.result_class`` with ``epochs_run`` (the last finished epoch), ``best_epoch`` /
    ``best_value`` of the monitored metric (0 / NaN when no epoch had a finite value), ``history``.
    """
    settings = family.settings
    try:
        ctx, ckpt = _open(family, Path(out_dir), resume, overwrite, progress)
        train_set = family.prepare(ctx)
        parts = family.build(ctx)
        loader, sampler = _train_loader(train_set, settings, ctx, parts)
        log = MetricLog(ctx.out / "metrics.csv")
        tracker, start = _start(ckpt, parts, ctx, log, settings)
        net, history = _wrap_ddp(parts.model, ctx), []
        epoch, stop = start - 1, 0 < settings.patience <= tracker.bad_epochs  # a resumed run that had stopped
        for epoch in range(start, settings.epochs + 1) if not stop else ():
            if sampler is not None:
                sampler.set_epoch(epoch)
            history.append(_run_epoch(epoch, family, net, parts, loader, tracker, ctx, log))
            if 0 < settings.patience <= tracker.bad_epochs:
                stop = True
                if ctx.is_main and progress:
                    print(f"early stop: no improvement of {settings.monitor} for {settings.patience} epochs")
                break
        result = family.result_class(out_dir=ctx.out, epochs_run=epoch, best_epoch=tracker.best_epoch,
                                     best_value=tracker.best_value, history=history, stopped_early=stop,
                                     train_seconds=tracker.train_seconds, precision=ctx.precision.describe(),
                                     precision_reason=ctx.precision.reason, loader_workers=ctx.workers,
                                     loader_workers_reason=ctx.workers_reason)
        if ctx.is_main:
            family.finish(load_best(parts.model, ctx.out), result, ctx)
        ctx.barrier()
    finally:
        if dist_info().enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return result
