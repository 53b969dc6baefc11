"""Training a multi-label chest X-ray classifier: the Chester / CheXNet recipe as defaults.

Defaults (Chester §2): DenseNet-121, Adam (beta 0.9/0.999, lr 1e-3), learning rate x0.1 when the
validation loss plateaus, patient-level 70/10/20 split, BCE on logits (optionally with per-finding
``pos_weight``), light augmentation (rotation <= 5 deg, translation <= 5 %, scale 0.95-1.05).

What a run writes to its output folder::

    config.json       the ClassifierConfig
    split.csv         image_id, patient_id, split (reused on resume)
    metrics.csv       one row per epoch: losses, val macro AUC, lr, seconds, images/s
    checkpoint.pt     last finished epoch (model, optimizer, scheduler, RNG, history) for --resume
    best.safetensors  weights of the best epoch on the monitored validation metric
    predictions_val.csv / predictions_test.csv
    evaluation.csv    per-finding AUC with half-split spread and bootstrap CI on the test split
    bundle/           the model bundle: best weights + card (operating points fitted on val, metrics on test)

Interrupted runs resume from ``checkpoint.pt`` with ``resume=True`` and end at the same epoch count.
Under ``torchrun`` the loop runs data-parallel (DDP; gloo on CPU, nccl on CUDA); rank 0 writes.
On CUDA it uses bf16 autocast and channels_last.
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
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from cxrbench.data import CXRDataset
from cxrbench.evaluation.calibration import fit_operating_points
from cxrbench.evaluation.metrics import evaluate_predictions
from cxrbench.inference.predict import predict_dataset, predictions_table
from cxrbench.models.bundle import ModelCard, save_bundle
from cxrbench.models.classifier import build_classifier
from cxrbench.preprocess import Preprocess
from cxrbench.train.common import (
    MetricLog,
    RunConfig,
    Stopwatch,
    autocast,
    init_distributed,
    load_best,
    open_run,
    pick_device,
    restore_training_state,
    run_split,
    save_best,
    save_training_state,
    seed_everything,
    training_record,
    wrap_ddp,
)

__all__ = ["ClassifierConfig", "TrainResult", "cxr_augmentation", "train_classifier"]


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
    num_workers: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
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

    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.image_size, normalize=self.normalize, equalize=self.equalize,
                          channels=self.in_channels)


@dataclass
class TrainResult:
    out_dir: Path
    epochs_run: int
    best_epoch: int
    best_value: float
    history: list[dict[str, Any]] = field(default_factory=list)
    bundle: Path | None = None
    evaluation: pd.DataFrame | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False


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
    """
    cfg = config or ClassifierConfig()
    out = Path(out_dir)
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    labels = _labels_of(manifest, cfg)
    seed_everything(cfg.seed + dist.rank)
    preprocess = cfg.preprocess()
    s = run_split(manifest, out, cfg.fractions, cfg.seed, split, write=dist.is_main)

    full = CXRDataset(manifest, preprocess, label_columns=labels, cache_dir=cache_dir)
    train_set = full.subset((s == "train").to_numpy())
    if cfg.augment:
        train_set.transform = cxr_augmentation(cfg)
    val_set = full.subset((s == "val").to_numpy())
    if dist.is_main:  # decode every file once, up front, and drop unreadable ones with one report
        report = full.build_cache(workers=2, progress=progress)
        if report.n_failed:
            print(f"warning: {report.summary()}")
    if dist.enabled:
        torch.distributed.barrier()
    train_set, val_set = train_set.readable(), val_set.readable()

    model = build_classifier(cfg.arch, len(labels), cfg.in_channels, pretrained=cfg.pretrained, dropout=cfg.dropout)
    model = model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp_model = wrap_ddp(model, device, dist)
    pos_weight = train_set.pos_weight().to(device) if cfg.use_pos_weight else None
    criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    mode = "min" if cfg.monitor == "val_loss" else "max"
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    sampler = DistributedSampler(train_set, shuffle=True, seed=cfg.seed) if dist.enabled else None
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=cfg.num_workers, drop_last=len(train_set) > cfg.batch_size,
                        generator=generator if sampler is None else None,
                        persistent_workers=cfg.num_workers > 0, pin_memory=device.type == "cuda")

    log = MetricLog(out / "metrics.csv")
    start_epoch, best_value, best_epoch, bad_epochs = 1, math.inf if mode == "min" else -math.inf, 0, 0
    history: list[dict[str, Any]] = []
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "loader_rng": generator}
    ckpt = open_run(out, cfg, resume, write=dist.is_main)
    if ckpt is not None:
        start_epoch = restore_training_state(ckpt, model, stateful)
        best_value, best_epoch, bad_epochs = float(ckpt["best_value"]), int(ckpt["best_epoch"]), int(ckpt["bad_epochs"])
        if dist.is_main:
            log.truncate_after(start_epoch - 1)
            print(f"resuming {out} after epoch {start_epoch - 1} (best {cfg.monitor} {best_value:.4f} at epoch {best_epoch})")
    elif dist.is_main:
        log.truncate_after(0)

    stopped_early = False
    epoch = start_epoch - 1
    patience = cfg.early_stopping_patience
    if patience > 0 and bad_epochs >= patience:  # a resumed run that had already stopped early
        stopped_early, start_epoch = True, cfg.epochs + 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        clock = Stopwatch()
        train_loss, seen = _train_one_epoch(ddp_model, loader, criterion, optimizer, device, cfg, epoch, progress and dist.is_main)
        train_seconds = clock()
        val = _validate(model, val_set, criterion, labels, device, cfg)
        value = val["val_loss"] if mode == "min" else val["val_auc"]
        if math.isnan(value):
            value = val["val_loss"]
        scheduler.step(value)
        improved = value < best_value if mode == "min" else value > best_value
        if improved:
            best_value, best_epoch, bad_epochs = value, epoch, 0
            if dist.is_main:
                save_best(model, out)
        else:
            bad_epochs += 1
        row = {"epoch": epoch, "train_loss": train_loss, **val, "lr": optimizer.param_groups[0]["lr"],
               "train_images": seen, "world_size": dist.world_size, "seconds": clock(),
               "images_per_s": seen * dist.world_size / max(train_seconds, 1e-9), "best": int(improved)}
        history.append(row)
        if dist.is_main:
            log.append(row)
            save_training_state(out, epoch, model, stateful, cfg,
                                best_value=best_value, best_epoch=best_epoch, bad_epochs=bad_epochs)
            if progress:
                print(f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val['val_loss']:.4f}, "
                      f"val macro AUC {val['val_auc']:.3f}, {row['images_per_s']:.1f} img/s")
        if patience > 0 and bad_epochs >= patience:
            stopped_early = True
            if dist.is_main and progress:
                print(f"early stop: no improvement of {cfg.monitor} for {patience} epochs")
            break

    result = TrainResult(out, epoch, best_epoch, best_value, history, stopped_early=stopped_early)
    if dist.is_main:
        _finish(result, model, full, s, labels, cfg, preprocess, device, data_description)
    if dist.enabled:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _train_one_epoch(model, loader, criterion, optimizer, device, cfg, epoch, progress) -> tuple[float, int]:
    model.train()
    total, seen = 0.0, 0
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False)
    for step, (x, y, _) in enumerate(batches):
        if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, cfg.amp):
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(x)
        seen += len(x)
    return total / max(seen, 1), seen


@torch.no_grad()
def _validate(model, val_set, criterion, labels, device, cfg) -> dict[str, float]:
    from cxrbench.evaluation.metrics import auc_per_finding, macro_auc

    preds = predict_dataset(model, val_set, batch_size=max(cfg.batch_size, 32), device=device)
    logits = torch.from_numpy(preds.logits)
    loss = float(nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(preds.labels)))
    aucs = auc_per_finding(preds.labels, preds.probabilities, labels)["auc"].to_numpy()
    macro = macro_auc(aucs)
    return {"val_loss": loss, "val_auc": float(macro.auc), "val_auc_defined": int(macro.n_defined)}


def _finish(result: TrainResult, model, full: CXRDataset, s: pd.Series, labels, cfg, preprocess, device,
            data_description) -> None:
    """Best weights -> operating points on val -> evaluation on test -> bundle."""
    out = result.out_dir
    load_best(model, out)
    parts = {}
    for name in ("val", "test"):
        ds = full.subset((s == name).to_numpy()).readable()
        preds = predict_dataset(model, ds, batch_size=max(cfg.batch_size, 32), device=device)
        parts[name] = (ds, preds)
    val_ds, val_preds = parts["val"]
    ops = fit_operating_points(val_preds.labels, val_preds.probabilities, labels, fitted_on="validation")
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, f"best_{cfg.monitor}": result.best_value}
    for name, (ds, preds) in parts.items():
        table = predictions_table(ds.manifest["image_id"].tolist(), preds.logits, labels, ops)
        for j, f in enumerate(labels):
            table[f"{f}_label"] = preds.labels[:, j].astype(int)
        table.to_csv(out / f"predictions_{name}.csv", index=False)
    test_ds, test_preds = parts["test"]
    if len(test_ds):
        evaluation, summary = evaluate_predictions(test_preds.labels, test_preds.probabilities, labels, ops,
                                                   n_boot=cfg.eval_bootstrap, seed=cfg.seed)
        evaluation.to_csv(out / "evaluation.csv", index=False)
        result.evaluation, result.summary = evaluation, summary
        metrics["test"] = {
            "split": "test", "n_images": len(test_ds), "summary": _jsonable(summary),
            "per_finding": {r["finding"]: {k: _num(r[k]) for k in ("auc", "auc_std_half_splits", "auc_ci_low",
                                                                       "auc_ci_high", "n_pos", "f1")}
                            for r in evaluation.to_dict("records")}}
    card = ModelCard(
        kind="classifier", builder="classifier",
        builder_kwargs={"arch": cfg.arch, "num_outputs": len(labels), "in_channels": cfg.in_channels, "dropout": cfg.dropout},
        labels=list(labels), preprocess=preprocess.to_dict(), operating_points=ops.to_dict(),
        training=training_record(out, full.manifest, s, cfg, result.epochs_run, data_description),
        metrics=metrics, name=f"{cfg.arch}-{len(labels)}", description="trained with cxrbench train classifier")
    result.bundle = save_bundle(out / "bundle", model, card)


def _num(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else f


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _num(v) if not isinstance(v, (dict, list, str)) else v for k, v in d.items()}
