"""Training the lung U-Net on image + mask pairs (``images/`` + ``masks/``; mask 127 = ignore).

The recipe (report weeks 4-5): BCE on logits, optionally plus a soft Dice loss, both over the valid
pixels only; Adam; light augmentation applied *identically* to image and mask (horizontal flip,
rotation <= 10 deg, small shifts and zooms; the mask is resampled nearest-neighbour); patient-level
70/10/20 split; the epoch with the best validation Dice is kept. Dice and IoU on the test patients
are measured on the displayed crop (source pixels, 256 px for the dev data), as
``cxrbench segment`` produces masks, and written to the bundle's card.

What a run writes to its output folder::

    config.json        the UNetConfig
    split.csv          image_id, patient_id, split, seed, fractions, manifest_sha256 (reused on resume if they match)
    metrics.csv        one row per epoch: losses, val Dice/IoU, lr, seconds
    checkpoint.pt      last finished epoch (model, optimizer, scheduler, generators, RNG states) for --resume
    best.safetensors   weights of the epoch with the best validation Dice
    evaluation_test.csv / evaluation_val.csv   per-image Dice and IoU (ignored pixels left out)
    bundle/            segmentation bundle: best weights + card (Dice/IoU on test in ``metrics``)

The epochs run in the one training loop (:mod:`cxrbench.train.loop`): interrupted runs resume from
``checkpoint.pt`` with ``resume=True`` and end with the same weights and metrics as an uninterrupted
run; under ``torchrun`` the U-Net trains data-parallel like the classifier (rank 0 writes).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
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
from cxrbench.train.common import RunConfig, run_split, training_record
from cxrbench.train.family import LoopResult, LoopSettings, TrainingParts
from cxrbench.train.loop import run_training
from cxrbench.train.runtime import RunContext

__all__ = ["MaskPairDataset", "PairAugmentation", "UNetConfig", "UNetFamily", "UNetTrainResult", "evaluate_unet",
           "load_mask_pairs", "train_unet"]


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
        """The preprocessing the training inputs, and so the bundle, use."""
        return Preprocess(size=self.image_size, normalize=self.normalize, equalize=self.equalize,  # type: ignore[arg-type]
                          channels=1)


@dataclass
class UNetTrainResult(LoopResult):
    """What :func:`train_unet` did: the loop's account plus the bundle and the per-image test evaluation."""

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
        """The same random flip/affine applied to an image and its mask; the image clamped to [0, 1]."""
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
# training


def train_unet(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    config: UNetConfig | None = None,
    *,
    split: pd.Series | None = None,
    resume: bool = False,
    overwrite: bool = False,
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
    overwrite : start clean in a folder that holds an earlier run (deletes its files); without it, or
        ``resume``, a fresh run into such a folder is refused.
    """
    family = UNetFamily(manifest, config or UNetConfig(), split=split, data_description=data_description)
    return run_training(family, out_dir, resume=resume, overwrite=overwrite, progress=progress)


class UNetFamily:
    """The lung U-Net as a family of the epoch loop (:func:`cxrbench.train.loop.run_training`).

    The best epoch has the highest validation Dice, which also drives the plateau schedule.
    """

    result_class = UNetTrainResult

    def __init__(self, manifest: pd.DataFrame, config: UNetConfig, *, split: pd.Series | None = None,
                 data_description: str = "") -> None:
        cfg = self.config = config
        self.manifest, self.given_split = manifest.reset_index(drop=True), split
        self.data_description = data_description
        self.preprocess = cfg.preprocess()
        self.settings = LoopSettings(
            epochs=cfg.epochs, batch_size=cfg.batch_size, monitor="val_dice", mode="max", seed=cfg.seed,
            device=cfg.device, max_steps_per_epoch=cfg.max_steps_per_epoch,
            epoch_line=(("train loss", "train_loss", ".4f"), ("val loss", "val_loss", ".4f"),
                        ("val Dice", "val_dice", ".4f"), ("IoU", "val_iou", ".4f")))

    def prepare(self, ctx: RunContext) -> MaskPairDataset:
        """The patient split; every pair decoded at the model's size; the train (augmented) and val sets."""
        cfg = self.config
        self.split = ctx.main_first(lambda write: run_split(self.manifest, ctx.out, cfg.fractions, cfg.seed,
                                                            self.given_split, write=write))
        images, labels, errors = load_mask_pairs(self.manifest, self.preprocess)
        for pos, reason in errors.items() if ctx.is_main else ():
            warnings.warn(f"skipping pair {self.manifest['path'][pos]}: {reason}", RuntimeWarning, stacklevel=2)
        self.readable = np.array([i not in errors for i in range(len(self.manifest))], dtype=bool)
        train, val = ((self.split == name).to_numpy() & self.readable for name in ("train", "val"))
        augment = (PairAugmentation(cfg.hflip, cfg.max_rotation, cfg.max_translation, cfg.scale_range)
                   if cfg.augment else None)
        train_set = MaskPairDataset(images[train], labels[train], self.preprocess, augment)
        self.val_set = MaskPairDataset(images[val], labels[val], self.preprocess)
        if len(train_set) == 0 or len(self.val_set) == 0:
            raise ValueError("no readable training or validation pairs")
        return train_set

    def build(self, ctx: RunContext) -> TrainingParts:
        """The U-Net, Adam, and the plateau schedule on the validation Dice."""
        cfg = self.config
        model = ctx.place(UNet(1, cfg.base_channels, cfg.depth))
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode="max", factor=cfg.plateau_factor,
                                                             patience=cfg.plateau_patience)
        return TrainingParts(model, {"adam": self.optimizer}, {"plateau": plateau})

    def train_step(self, model: nn.Module, batch: list[Any], ctx: RunContext) -> dict[str, torch.Tensor]:
        """One Adam step on ``(x, target, valid)`` (see :class:`MaskPairDataset`); BCE (+ soft Dice)."""
        x, target, valid = batch
        with ctx.autocast():
            loss = _loss(model(x).float(), target, valid, self.config.dice_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"train_loss": loss.detach()}

    def validate(self, model: nn.Module, ctx: RunContext) -> dict[str, float]:
        """``val_loss``, ``val_dice`` (monitored) and ``val_iou`` at the model's resolution."""
        return _validate(model, self.val_set, ctx.device, self.config)

    def finish(self, model: nn.Module, result: UNetTrainResult, ctx: RunContext) -> None:
        """Per-image Dice/IoU on val and test at the displayed-crop resolution -> bundle."""
        cfg, out = self.config, result.out_dir
        metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "best_val_dice": result.best_value}
        for name in ("val", "test"):
            rows = self.manifest[(self.split == name).to_numpy() & self.readable].reset_index(drop=True)
            table = evaluate_unet(model, self.preprocess, rows, threshold=cfg.threshold, device=ctx.device)
            table.to_csv(out / f"evaluation_{name}.csv", index=False)
            if len(table):
                metrics[name] = {"split": name, **_summary(table)}
            if name == "test":
                result.evaluation, result.summary = table, metrics.get("test", {})
        card = ModelCard(
            kind="segmentation", builder="unet",
            builder_kwargs={"in_channels": 1, "base_channels": cfg.base_channels, "depth": cfg.depth},
            labels=["lung"], preprocess=self.preprocess.to_dict(),
            training=training_record(out, self.manifest, self.split, cfg, result.epochs_run, self.data_description,
                                     threshold=cfg.threshold, output="(B, 1, H, W) logits; lung = sigmoid > threshold",
                                     precision=result.precision),
            metrics=metrics, name=f"unet-{cfg.base_channels}x{cfg.depth}-{cfg.image_size}px",
            description="lung U-Net trained with cxrbench train unet (mask value 127 ignored)")
        result.bundle = save_bundle(out / "bundle", model, card)


def _loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, dice_weight: float) -> torch.Tensor:
    loss = masked_bce_loss(logits, target, valid)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_dice_loss(logits, target, valid)
    return loss


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
