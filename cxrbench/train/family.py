"""What a model family gives the epoch loop (:func:`cxrbench.train.loop.run_training`).

A family is a small object with its run config, its :class:`LoopSettings` and five methods
(:class:`Family`): ``prepare`` the data, ``build`` the model and optimizers, ``train_step`` on a
batch, ``validate``, and ``finish`` (calibration, evaluation, bundle). The classifier, the OOD model
and the lung U-Net are the three in :mod:`cxrbench.train`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
from torch import nn
from torch.utils.data import Dataset

from cxrbench.train.common import RunConfig
from cxrbench.train.runtime import RunContext

__all__ = ["Family", "LoopResult", "LoopSettings", "TrainingParts"]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs to know of a family's config.

    ``monitor`` names the validation metric that picks the best epoch, steps plateau schedulers and
    drives early stopping (``patience`` epochs without improvement; 0: off); ``mode`` says whether
    lower (``"min"``) or higher (``"max"``) is better. ``amp`` / ``channels_last`` ask
    :func:`~cxrbench.train.runtime.precision_policy` for them (``precision``: its mode, auto / fp32 / bf16).
    ``data_parallel=False`` refuses to run under torchrun.
    ``epoch_line`` lists ``(label, row key, format)`` for the line printed after each epoch.
    """

    epochs: int
    batch_size: int
    monitor: str
    mode: Literal["min", "max"]
    seed: int = 0
    device: str = "auto"
    patience: int = 0
    num_workers: int | None = 0  # None: auto (:func:`~cxrbench.train.runtime.loader_workers`)
    max_steps_per_epoch: int | None = None
    amp: bool = False
    channels_last: bool = False
    precision: str = "auto"
    data_parallel: bool = True
    epoch_line: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1, patience >= 0; got {self.epochs}, "
                             f"{self.batch_size}, {self.patience}")


@dataclass
class TrainingParts:
    """The model (on the run's device) and everything the checkpoint must hold to resume it."""

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any] = field(default_factory=dict)
    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def stateful(self) -> dict[str, Any]:
        """What a checkpoint saves and a resume restores besides the model."""
        return {"optimizers": self.optimizers, "schedulers": self.schedulers, "generators": self.generators}


@dataclass
class LoopResult:
    """What the loop did; each family's result class extends it with what its finish step adds."""

    out_dir: Path
    epochs_run: int
    best_epoch: int
    best_value: float
    history: list[dict[str, Any]] = field(default_factory=list)  # rows of the epochs this call ran
    stopped_early: bool = False
    train_seconds: float = 0.0  # training steps only, summed over every epoch (also before a resume)
    precision: str = "fp32"
    precision_reason: str = ""  # why (:attr:`cxrbench.train.runtime.Precision.reason`)
    loader_workers: int = 0  # the training DataLoader's workers (:func:`~cxrbench.train.runtime.loader_workers`)
    loader_workers_reason: str = ""  # why


R = TypeVar("R", bound=LoopResult)


class Family(Protocol[R]):
    """A model family, as :func:`~cxrbench.train.loop.run_training` drives it.

    ``train_step`` gets the model the loop trains (under torchrun its DDP wrapper: call it, not its
    methods, for the forward pass, so gradients are averaged across ranks), a batch whose tensors are
    on the device, and the context (``ctx.autocast()`` for forward passes and losses). ``validate`` and
    ``finish`` get the plain model.
    """

    @property
    def config(self) -> RunConfig:
        """The run's config (its resume key must match a resumed checkpoint's)."""

    @property
    def settings(self) -> LoopSettings:
        """What the loop needs of the config."""

    @property
    def result_class(self) -> type[R]:
        """The result the loop makes, the finish step completes and the training function returns."""

    def prepare(self, ctx: RunContext) -> Dataset:
        """Split, decode and set up the data; return the training set (items: images first)."""

    def build(self, ctx: RunContext) -> TrainingParts:
        """The model (``ctx.place``d) and its optimizers, schedulers and generators."""

    def train_step(self, model: nn.Module, batch: list[Any], ctx: RunContext
                   ) -> Mapping[str, float | torch.Tensor] | None:
        """One optimisation step on a device batch; its losses (None: batch skipped)."""

    def validate(self, model: nn.Module, ctx: RunContext) -> dict[str, float]:
        """Validation metrics, including ``settings.monitor`` (run on rank 0 only)."""

    def finish(self, model: nn.Module, result: R, ctx: RunContext) -> None:
        """With the best weights loaded (eval mode): evaluate, calibrate, write the bundle (rank 0 only)."""
