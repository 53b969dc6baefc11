"""Training the lung U-Net on image + mask pairs (``images/`` + ``masks/``; mask 127 = ignore).

The recipe (report weeks 4-5): BCE on logits, optionally plus a soft Dice loss, both over the valid
pixels only; Adam; light augmentation applied *identically* to image and mask (horizontal flip,
rotation <= 10 deg, small shifts and zooms; the mask is resampled nearest-neighbour); patient-level
70/10/20 split; the epoch with the best validation Dice is kept. Dice and IoU on the test patients
are measured on the displayed crop (source pixels, 256 px for the dev data), as
``cxrbench segment`` produces masks, and written to the bundle's card.

What a run writes to its output folder::

    config.json        the UNetConfig
    split.csv          image_id, patient_id, split (reused on resume)
    metrics.csv        one row per epoch: losses, val Dice/IoU, lr, seconds
    checkpoint.pt      last finished epoch (model, optimizer, scheduler, RNG) for --resume
    best.safetensors   weights of the epoch with the best validation Dice
    evaluation_test.csv / evaluation_val.csv   per-image Dice and IoU (ignored pixels left out)
    bundle/            segmentation bundle: best weights + card (Dice/IoU on test in ``metrics``)
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from cxrbench.io import ImageReadError
from cxrbench.models.bundle import ModelCard, save_bundle
from cxrbench.models.unet import (
    IGNORE_CODE,
    IGNORE_VALUE,
    UNet,
    dice_iou,
    masked_bce_loss,
    predict_lung_mask,
    read_mask_pair,
    soft_dice_loss,
)
from cxrbench.preprocess import Preprocess
from cxrbench.train.common import (
    MetricLog,
    RunConfig,
    Stopwatch,
    load_best,
    open_run,
    pick_device,
    restore_training_state,
    run_split,
    save_best,
    save_training_state,
    seed_everything,
    training_record,
)

__all__ = ["MaskPairDataset", "PairAugmentation", "UNetConfig", "UNetTrainResult", "evaluate_unet", "load_mask_pairs",
           "train_unet"]


@dataclass
class UNetConfig(RunConfig):
    """Hyper-parameters of a U-Net run (all JSON-serialisable)."""

    image_size: int = 128
    base_channels: int = 16
    depth: int = 4
    normalize: str = "minus1_1"
    equalize: str = "none"
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    dice_weight: float = 1.0
    augment: bool = True
    hflip: bool = True
    max_rotation: float = 10.0
    max_translation: float = 0.05
    scale_range: tuple[float, float] = (0.9, 1.1)
    plateau_patience: int = 4
    plateau_factor: float = 0.5
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    threshold: float = 0.5
    seed: int = 0
    device: str = "auto"
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        self.scale_range = tuple(self.scale_range)  # type: ignore[assignment]
        self.fractions = tuple(self.fractions)  # type: ignore[assignment]
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")

    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.image_size, normalize=self.normalize, equalize=self.equalize, channels=1)


@dataclass
class UNetTrainResult:
    out_dir: Path
    epochs_run: int
    best_epoch: int
    best_value: float
    history: list[dict[str, Any]] = field(default_factory=list)
    bundle: Path | None = None
    evaluation: pd.DataFrame | None = None
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# data


def load_mask_pairs(manifest: pd.DataFrame, preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Decode every image and its mask with :func:`read_mask_pair` at ``preprocess.size``.

    Parameters
    ----------
    manifest : mask-pair table (``path``, ``mask_path``), e.g. ``load_manifest(".../cxr/masks")``.

    Returns
    -------
    images : (N, S, S) float32 in [0, 1]; rows of unreadable pairs are zeros.
    codes : (N, S, S) uint8, 0 background, 1 lung, 2 ignore.
    errors : row position -> reason, for pairs that could not be read.
    """
    if not {"path", "mask_path"} <= set(manifest.columns):
        raise ValueError("manifest needs 'path' and 'mask_path' columns (an images/ + masks/ folder)")
    size = preprocess.size
    images = np.zeros((len(manifest), size, size), np.float32)
    codes = np.zeros((len(manifest), size, size), np.uint8)
    errors: dict[int, str] = {}
    for pos, (path, mask_path) in enumerate(zip(manifest["path"], manifest["mask_path"])):
        try:
            images[pos], codes[pos] = read_mask_pair(path, mask_path, preprocess)
        except (ImageReadError, ValueError) as exc:
            errors[pos] = str(exc)
    return images, codes, errors


class PairAugmentation:
    """The same random flip/rotation/shift/zoom for an image and its label map (torchvision v2).

    Called on ``(image (1, S, S) float in [0, 1], labels (1, S, S) uint8 codes)``; the image is
    resampled bilinearly, the labels nearest-neighbour; pixels moved in from outside are 0
    (black / background). Draws from torch's global RNG (seeded and checkpointed by the loop).
    """

    def __init__(self, hflip: bool = True, max_rotation: float = 10.0, max_translation: float = 0.05,
                 scale_range: tuple[float, float] = (0.9, 1.1)) -> None:
        from torchvision.transforms import v2

        steps = [v2.RandomHorizontalFlip(0.5)] if hflip else []
        steps.append(v2.RandomAffine(degrees=max_rotation, translate=(max_translation, max_translation),
                                     scale=tuple(scale_range), interpolation=v2.InterpolationMode.BILINEAR, fill=0))
        self.transform = v2.Compose(steps)

    def __call__(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        out_image, out_labels = self.transform(tv_tensors.Image(image), tv_tensors.Mask(labels))
        return out_image.as_subclass(torch.Tensor).clamp(0.0, 1.0), out_labels.as_subclass(torch.Tensor)


class MaskPairDataset(Dataset):
    """Items ``(x, target, valid)``: ``(C, S, S)`` normalised input, ``(1, S, S)`` float 0/1 lung target,
    ``(1, S, S)`` float 0/1 validity (0 where the mask said ignore)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocess: Preprocess,
                 transform: PairAugmentation | None = None) -> None:
        if images.shape != labels.shape:
            raise ValueError(f"images {images.shape} and labels {labels.shape} differ in shape")
        self.images, self.labels, self.preprocess, self.transform = images, labels, preprocess, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, labels = torch.from_numpy(self.images[i])[None], torch.from_numpy(self.labels[i])[None]
        if self.transform is not None:
            image, labels = self.transform(image, labels)
        x = torch.from_numpy(self.preprocess.intensity(image[0].numpy()))
        return x, (labels == 1).float(), (labels != IGNORE_CODE).float()


# --------------------------------------------------------------------------------------------------
# the loop


def train_unet(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    config: UNetConfig | None = None,
    *,
    split: pd.Series | None = None,
    resume: bool = False,
    progress: bool = True,
    data_description: str = "",
) -> UNetTrainResult:
    """Train the lung U-Net, evaluate it on the test patients and write a bundle (see module doc).

    Parameters
    ----------
    manifest : mask-pair table with ``path``, ``mask_path``, ``patient_id``.
    out_dir : run folder (created).
    split : optional split names per row; default a seeded patient split (``cfg.fractions``).
    resume : continue from ``out_dir/checkpoint.pt``; an absent checkpoint starts afresh.
    """
    cfg = config or UNetConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    manifest = manifest.reset_index(drop=True)
    s = run_split(manifest, out, cfg.fractions, cfg.seed, split)
    preprocess = cfg.preprocess()
    images, labels, errors = load_mask_pairs(manifest, preprocess)
    for pos, reason in errors.items():
        warnings.warn(f"skipping pair {manifest['path'][pos]}: {reason}", RuntimeWarning, stacklevel=2)
    readable = np.array([i not in errors for i in range(len(manifest))], dtype=bool)
    part = {name: ((s == name).to_numpy() & readable) for name in ("train", "val", "test")}
    augment = (PairAugmentation(cfg.hflip, cfg.max_rotation, cfg.max_translation, cfg.scale_range)
               if cfg.augment else None)
    train_set = MaskPairDataset(images[part["train"]], labels[part["train"]], preprocess, augment)
    val_set = MaskPairDataset(images[part["val"]], labels[part["val"]], preprocess)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError("no readable training or validation pairs")

    model = UNet(1, cfg.base_channels, cfg.depth).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                        drop_last=len(train_set) > cfg.batch_size)

    log = MetricLog(out / "metrics.csv")
    start_epoch, best_value, best_epoch = 1, -math.inf, 0
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "loader_rng": generator}
    ckpt = open_run(out, cfg, resume)
    if ckpt is not None:
        start_epoch = restore_training_state(ckpt, model, stateful)
        best_value, best_epoch = float(ckpt["best_value"]), int(ckpt["best_epoch"])
        log.truncate_after(start_epoch - 1)
        if progress:
            print(f"resuming {out} after epoch {start_epoch - 1} "
                  f"(best val Dice {best_value:.4f} at epoch {best_epoch})")
    else:
        log.truncate_after(0)

    history: list[dict[str, Any]] = []
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        clock = Stopwatch()
        train_loss, seen = _train_one_epoch(model, loader, optimizer, device, cfg)
        train_seconds = clock()
        val = _validate(model, val_set, device, cfg)
        scheduler.step(val["val_dice"])
        improved = val["val_dice"] > best_value
        if improved:
            best_value, best_epoch = val["val_dice"], epoch
            save_best(model, out)
        row = {"epoch": epoch, "train_loss": train_loss, **val, "lr": optimizer.param_groups[0]["lr"],
               "train_images": seen, "seconds": clock(), "images_per_s": seen / max(train_seconds, 1e-9),
               "best": int(improved)}
        history.append(row)
        log.append(row)
        save_training_state(out, epoch, model, stateful, cfg, best_value=best_value, best_epoch=best_epoch)
        if progress:
            print(f"epoch {epoch}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val['val_loss']:.4f}, "
                  f"val Dice {val['val_dice']:.4f}, IoU {val['val_iou']:.4f}, {row['seconds']:.1f} s")

    result = UNetTrainResult(out, epoch, best_epoch, best_value, history)
    _finish(result, model, manifest, s, readable, cfg, preprocess, device, data_description)
    return result


def _loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, dice_weight: float) -> torch.Tensor:
    loss = masked_bce_loss(logits, target, valid)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_dice_loss(logits, target, valid)
    return loss


def _train_one_epoch(model, loader, optimizer, device, cfg: UNetConfig) -> tuple[float, int]:
    model.train()
    total, seen = 0.0, 0
    for step, (x, target, valid) in enumerate(loader):
        if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
            break
        x, target, valid = x.to(device), target.to(device), valid.to(device)
        loss = _loss(model(x), target, valid, cfg.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(x)
        seen += len(x)
    return total / max(seen, 1), seen


@torch.no_grad()
def _validate(model, dataset: MaskPairDataset, device, cfg: UNetConfig) -> dict[str, float]:
    model.eval()
    losses, dices, ious = [], [], []
    for x, target, valid in DataLoader(dataset, batch_size=max(cfg.batch_size, 16)):
        logits = model(x.to(device)).cpu()
        losses.append(float(_loss(logits, target, valid, cfg.dice_weight)) * len(x))
        dice, iou = dice_iou(torch.sigmoid(logits) > cfg.threshold, target, valid > 0)
        dices.append(dice)
        ious.append(iou)
    return {"val_loss": sum(losses) / len(dataset), "val_dice": float(np.mean(np.concatenate(dices))),
            "val_iou": float(np.mean(np.concatenate(ious)))}


def evaluate_unet(model: torch.nn.Module, preprocess: Preprocess, manifest: pd.DataFrame, *,
                  threshold: float = 0.5, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Per-image Dice and IoU at the displayed-crop resolution (the square crop in source pixels).

    Returns a table ``image_id, patient_id, dice, iou, ignored_pixels, error`` (NaN scores and the
    reason for unreadable pairs); ignored (127) pixels count neither way.
    """
    rows = []
    for pos in range(len(manifest)):
        item = manifest.iloc[pos]
        row = {"image_id": item.get("image_id", Path(item["path"]).name), "patient_id": item.get("patient_id", ""),
               "dice": np.nan, "iou": np.nan, "ignored_pixels": 0, "error": ""}
        try:
            display, codes = read_mask_pair(item["path"], item["mask_path"], None)
        except (ImageReadError, ValueError) as exc:
            row["error"] = str(exc)
        else:
            pred, _ = predict_lung_mask(model, preprocess, display, threshold=threshold, device=device)
            dice, iou = dice_iou(pred, codes == 1, codes != IGNORE_CODE)
            row.update(dice=float(dice), iou=float(iou), ignored_pixels=int((codes == IGNORE_CODE).sum()))
        rows.append(row)
    return pd.DataFrame(rows, columns=["image_id", "patient_id", "dice", "iou", "ignored_pixels", "error"])


def _summary(table: pd.DataFrame) -> dict[str, Any]:
    ok = table.dropna(subset=["dice"])
    return {"n_images": int(len(ok)), "n_patients": int(ok["patient_id"].nunique()),
            "dice_mean": float(ok["dice"].mean()), "dice_std": float(ok["dice"].std(ddof=1)) if len(ok) > 1 else 0.0,
            "dice_median": float(ok["dice"].median()), "dice_min": float(ok["dice"].min()),
            "iou_mean": float(ok["iou"].mean()), "iou_std": float(ok["iou"].std(ddof=1)) if len(ok) > 1 else 0.0,
            "resolution": "displayed crop (source pixels)", "ignored_value": IGNORE_VALUE}


def _finish(result: UNetTrainResult, model, manifest, s, readable, cfg: UNetConfig, preprocess, device,
            data_description: str) -> None:
    """Best weights -> per-image Dice/IoU on val and test -> bundle."""
    out = result.out_dir
    load_best(model, out)
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "best_val_dice": result.best_value}
    for name in ("val", "test"):
        rows = manifest[(s == name).to_numpy() & readable].reset_index(drop=True)
        table = evaluate_unet(model, preprocess, rows, threshold=cfg.threshold, device=device)
        table.to_csv(out / f"evaluation_{name}.csv", index=False)
        if len(table):
            metrics[name] = {"split": name, **_summary(table)}
        if name == "test":
            result.evaluation = table
            result.summary = metrics.get("test", {})
    card = ModelCard(
        kind="segmentation", builder="unet",
        builder_kwargs={"in_channels": 1, "base_channels": cfg.base_channels, "depth": cfg.depth},
        labels=["lung"], preprocess=preprocess.to_dict(),
        training=training_record(out, manifest, s, cfg, result.epochs_run, data_description,
                                 threshold=cfg.threshold, output="(B, 1, H, W) logits; lung = sigmoid > threshold"),
        metrics=metrics, name=f"unet-{cfg.base_channels}x{cfg.depth}-{cfg.image_size}px",
        description="lung U-Net trained with cxrbench train unet (mask value 127 ignored)")
    result.bundle = save_bundle(out / "bundle", model, card)
