"""Training a multi-label chest X-ray classifier: the Chester / CheXNet recipe as defaults.

Defaults (Chester §2): DenseNet-121, Adam (beta 0.9/0.999, lr 1e-3), learning rate x0.1 when the
validation loss plateaus, patient-level 70/10/20 split, BCE on logits (optionally with per-finding
``pos_weight``), light augmentation (rotation <= 5 deg, translation <= 5 %, scale 0.95-1.05).

What a run writes to its output folder::

    config.json       the ClassifierConfig
    split.csv         image_id, patient_id, split, seed, fractions, manifest_sha256 (reused on resume if they match)
    metrics.csv       one row per epoch: losses, val macro AUC, lr, seconds, images/s
    checkpoint.pt     last finished epoch (model, optimizer, scheduler, generators, RNG states) for --resume
    best.safetensors  weights of the best epoch on the monitored validation metric
    predictions_val.csv / predictions_test.csv
    evaluation.csv    per-finding AUC with half-split spread and bootstrap CI on the test split
    bundle/           the model bundle: best weights + card (operating points fitted on val, metrics on test)

The epochs validate on the uint8 cache (fast); the operating points, the test metrics and the predictions CSVs
come from the val and test files read as ``cxrbench predict`` reads them (:func:`~cxrbench.inference.recalibrate.
manifest_outputs`, the function of ``cxrbench evaluate`` and ``calibrate``), so ``predict`` on a test file gives
its row of ``predictions_test.csv`` and ``evaluate`` on the test split the card's AUCs; ``metrics.test.source``
says so.

The epochs run in the one training loop (:mod:`cxrbench.train.loop`): interrupted runs resume from
``checkpoint.pt`` with ``resume=True`` and end with the same weights and metrics as an uninterrupted
run. Under ``torchrun`` the loop runs data-parallel (DDP; gloo on CPU, nccl on CUDA); rank 0 writes.
On CUDA it uses bf16 autocast and channels_last (:func:`cxrbench.train.runtime.precision_policy`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from cxrbench.data import CXRDataset
from cxrbench.evaluation.calibration import fit_operating_points
from cxrbench.evaluation.metrics import evaluate_predictions
from cxrbench.inference.predict import predict_dataset, predictions_table
from cxrbench.inference.recalibrate import LabelledOutputs, manifest_outputs
from cxrbench.models.bundle import ModelCard, save_bundle
from cxrbench.models.classifier import build_classifier
from cxrbench.preprocess import Preprocess
from cxrbench.train.common import RunConfig, decode_all, run_split, training_record
from cxrbench.train.family import LoopResult, LoopSettings, TrainingParts
from cxrbench.train.loop import run_training
from cxrbench.train.runtime import RunContext

__all__ = ["PREDICT_PATH", "ClassifierConfig", "ClassifierFamily", "TrainResult", "cxr_augmentation",
           "train_classifier"]

#: where a run's operating points, test metrics and ``predictions_*.csv`` come from (``metrics.test.source``)
PREDICT_PATH = ("float path (as cxrbench predict): each val and test file read and preprocessed in float, "
                "not the 8-bit training cache")


@dataclass
class ClassifierConfig(RunConfig):
    """Hyper-parameters of a classifier run (all JSON-serialisable)."""

    RESUME_MAY_CHANGE = ("epochs", "num_workers", "device", "early_stopping_patience", "eval_bootstrap")

    arch: str = "densenet121"
    image_size: int = 224
    in_channels: int = 1
    normalize: str = "minus1_1"
    equalize: str = "none"
    pretrained: bool = False
    dropout: float = 0.0
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    plateau_factor: float = 0.1
    plateau_patience: int = 1
    early_stopping_patience: int = 3
    monitor: str = "val_loss"
    use_pos_weight: bool = True
    augment: bool = True
    max_rotation: float = 5.0
    max_translation: float = 0.05
    scale_range: tuple[float, float] = (0.95, 1.05)
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    num_workers: int | None = None  # None: auto (:func:`cxrbench.train.runtime.loader_workers`: 0 on the CPU)
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    precision: str = "auto"  # "auto" | "fp32" | "bf16": :func:`cxrbench.train.runtime.precision_policy`
    max_steps_per_epoch: int | None = None
    labels: list[str] | None = None
    eval_bootstrap: int = 1000

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.scale_range = tuple(self.scale_range)  # type: ignore[assignment]
        self.fractions = tuple(self.fractions)  # type: ignore[assignment]
        if self.monitor not in ("val_loss", "val_auc"):
            raise ValueError(f"monitor must be 'val_loss' or 'val_auc', got {self.monitor!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None (auto), got {self.num_workers}")

    def preprocess(self) -> Preprocess:
        """The preprocessing the training inputs, and so the bundle, use."""
        return Preprocess(size=self.image_size, normalize=self.normalize, equalize=self.equalize,  # type: ignore[arg-type]
                          channels=self.in_channels)


@dataclass
class TrainResult(LoopResult):
    """What :func:`train_classifier` did: the loop's account plus the bundle and the test evaluation."""

    bundle: Path | None = None
    evaluation: pd.DataFrame | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def cxr_augmentation(cfg: ClassifierConfig):
    """Small random affine moves suited to frontal CXRs (no flips: the heart side matters)."""
    from torchvision.transforms import v2

    return v2.RandomAffine(degrees=cfg.max_rotation, translate=(cfg.max_translation, cfg.max_translation),
                           scale=cfg.scale_range, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0)


def _labels_of(manifest: pd.DataFrame, cfg: ClassifierConfig) -> list[str]:
    labels = list(cfg.labels or manifest.attrs.get("label_columns", []))
    if not labels:
        raise ValueError("the manifest has no label columns; pass labels=[...]")
    absent = [c for c in labels if c not in manifest.columns]
    if absent:
        raise ValueError(f"label columns {absent} are not in the manifest")
    return labels


def train_classifier(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    config: ClassifierConfig | None = None,
    *,
    split: pd.Series | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = "auto",
    data_description: str = "",
) -> TrainResult:
    """Train, calibrate on validation, evaluate on test, and write a bundle (see module doc).

    Parameters
    ----------
    manifest : table from :mod:`cxrbench.data` with a ``path`` column and the label columns.
    out_dir : run folder (created).
    split : optional split names per row (``train``/``val``/``test``); default a patient split.
    resume : continue from ``out_dir/checkpoint.pt``; an absent checkpoint starts afresh.
    overwrite : start clean in a folder that holds an earlier run (deletes its files); without it, or
        ``resume``, a fresh run into such a folder is refused.
    """
    family = ClassifierFamily(manifest, config or ClassifierConfig(), split=split, cache_dir=cache_dir,
                              data_description=data_description)
    return run_training(family, out_dir, resume=resume, overwrite=overwrite, progress=progress)


class ClassifierFamily:
    """The classifier as a family of the epoch loop (:func:`cxrbench.train.loop.run_training`)."""

    result_class = TrainResult

    def __init__(self, manifest: pd.DataFrame, config: ClassifierConfig, *, split: pd.Series | None = None,
                 cache_dir: str | os.PathLike | None = "auto", data_description: str = "") -> None:
        cfg = self.config = config
        self.manifest, self.given_split, self.cache_dir = manifest, split, cache_dir
        self.data_description = data_description
        self.labels = _labels_of(manifest, cfg)
        self.preprocess = cfg.preprocess()
        self.settings = LoopSettings(
            epochs=cfg.epochs, batch_size=cfg.batch_size, monitor=cfg.monitor,
            mode="min" if cfg.monitor == "val_loss" else "max", seed=cfg.seed, device=cfg.device,
            patience=cfg.early_stopping_patience, num_workers=cfg.num_workers,
            max_steps_per_epoch=cfg.max_steps_per_epoch, amp=cfg.amp, channels_last=cfg.channels_last,
            precision=cfg.precision,
            epoch_line=(("train loss", "train_loss", ".4f"), ("val loss", "val_loss", ".4f"),
                        ("val macro AUC", "val_auc", ".3f")))

    def prepare(self, ctx: RunContext) -> CXRDataset:
        """The patient split, the uint8 cache (decoded once, by rank 0), the train and val sets."""
        cfg = self.config
        self.split = ctx.main_first(lambda write: run_split(self.manifest, ctx.out, cfg.fractions, cfg.seed,
                                                            self.given_split, write=write))
        self.full = CXRDataset(self.manifest, self.preprocess, label_columns=self.labels, cache_dir=self.cache_dir)
        ctx.main_first(lambda write: decode_all(self.full, ctx.progress, ctx.workers) if write else None)
        self.train_set = self._part("train")
        if cfg.augment:
            self.train_set.transform = cxr_augmentation(cfg)
        self.val_set = self._part("val")
        return self.train_set

    def _part(self, name: str) -> CXRDataset:
        return self.full.subset((self.split == name).to_numpy()).readable()

    def build(self, ctx: RunContext) -> TrainingParts:
        """The network, BCE with per-finding ``pos_weight``, Adam and the plateau schedule."""
        cfg = self.config
        model = ctx.place(build_classifier(cfg.arch, len(self.labels), cfg.in_channels, pretrained=cfg.pretrained,
                                           dropout=cfg.dropout))
        pos_weight = self.train_set.pos_weight().to(ctx.device) if cfg.use_pos_weight else None
        self.criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode=self.settings.mode,
                                                             factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        return TrainingParts(model, {"adam": self.optimizer}, {"plateau": plateau})

    def train_step(self, model: nn.Module, batch: list[Any], ctx: RunContext) -> dict[str, torch.Tensor]:
        """One Adam step on ``(x (B, C, S, S), y (B, F) 0/1, index)``; the batch's mean BCE."""
        x, y, _ = batch
        with ctx.autocast():
            loss = self.criterion(model(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"train_loss": loss.detach()}

    def validate(self, model: nn.Module, ctx: RunContext) -> dict[str, float]:
        """``val_loss`` (BCE, no pos_weight), ``val_auc`` (macro), ``val_auc_defined`` (findings with both classes)."""
        return _validate(model, self.val_set, self.criterion, self.labels, ctx.device, self.config)

    def finish(self, model: nn.Module, result: TrainResult, ctx: RunContext) -> None:
        """Operating points on val -> predictions and evaluation on test -> bundle, from :meth:`predicted`."""
        cfg, out = self.config, result.out_dir
        if ctx.progress:
            print("predicting the val and test files as `cxrbench predict` reads them (operating points, test metrics)")
        parts = {name: self.predicted(model, name, ctx) for name in ("val", "test")}
        ops = fit_operating_points(parts["val"].labels, parts["val"].probabilities, self.labels, fitted_on="validation")
        for name, res in parts.items():
            table = predictions_table(res.image_ids, res.logits, self.labels, ops)
            for j, f in enumerate(self.labels):
                table[f"{f}_label"] = res.labels[:, j].astype(int)
            table.to_csv(out / f"predictions_{name}.csv", index=False)
        metrics: dict[str, Any] = {"best_epoch": result.best_epoch, f"best_{cfg.monitor}": _num(result.best_value)}
        test = parts["test"]
        if len(test.labels):
            evaluation, summary = evaluate_predictions(test.labels, test.probabilities, self.labels, ops,
                                                       n_boot=cfg.eval_bootstrap, seed=cfg.seed)
            evaluation.to_csv(out / "evaluation.csv", index=False)
            result.evaluation, result.summary = evaluation, summary
            metrics["test"] = {**_test_metrics(evaluation, summary, len(test.labels)),
                               "source": f"{PREDICT_PATH}; the network in fp32 on {ctx.device}"}
        card = ModelCard(
            kind="classifier", builder="classifier",
            builder_kwargs={"arch": cfg.arch, "num_outputs": len(self.labels), "in_channels": cfg.in_channels,
                            "dropout": cfg.dropout},
            labels=list(self.labels), preprocess=self.preprocess.to_dict(), operating_points=ops.to_dict(),
            training=training_record(out, self.full.manifest, self.split, cfg, result.epochs_run,
                                     self.data_description, precision=result.precision,
                                     precision_choice=result.precision_reason,
                                     loader_workers=result.loader_workers,
                                     loader_workers_choice=result.loader_workers_reason),
            metrics=metrics, name=f"{cfg.arch}-{len(self.labels)}",
            description="trained with cxrbench train classifier")
        result.bundle = save_bundle(out / "bundle", model, card)

    def predicted(self, model: nn.Module, name: str, ctx: RunContext) -> LabelledOutputs:
        """The best weights' outputs on the split ``name``, each file read as ``cxrbench predict`` reads it (not the
        uint8 cache the epochs validate on), by the network in fp32 and the memory layout of a loaded bundle."""
        model = model.to(memory_format=torch.contiguous_format)
        return manifest_outputs(model, self.preprocess, self._part(name).manifest, self.labels,
                                batch_size=max(self.config.batch_size, 32), device=ctx.device,
                                progress=ctx.progress, where=f"the {name} split")


@torch.no_grad()
def _validate(model, val_set, criterion, labels, device, cfg) -> dict[str, float]:
    from cxrbench.evaluation.metrics import auc_per_finding, macro_auc

    preds = predict_dataset(model, val_set, batch_size=max(cfg.batch_size, 32), device=device)
    logits = torch.from_numpy(preds.logits)
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(preds.labels)))
    aucs = auc_per_finding(preds.labels, preds.probabilities, labels)["auc"].to_numpy()
    macro = macro_auc(aucs)
    return {"val_loss": loss, "val_auc": float(macro.auc), "val_auc_defined": int(macro.n_defined)}


def _test_metrics(evaluation: pd.DataFrame, summary: dict[str, Any], n_images: int) -> dict[str, Any]:
    keys = ("auc", "auc_std_half_splits", "auc_ci_low", "auc_ci_high", "n_pos", "f1")
    return {"split": "test", "n_images": n_images, "summary": _jsonable(summary),
            "per_finding": {r["finding"]: {k: _num(r[k]) for k in keys} for r in evaluation.to_dict("records")}}


def _num(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else f


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _num(v) if not isinstance(v, (dict, list, str)) else v for k, v in d.items()}
