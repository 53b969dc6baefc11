"""Training the OOD gate's reconstruction model (the plain autoencoder or ALI) on 64 px chest X-rays.

The in-distribution data are split by patient (seeded, Chester's 70/10/20 by default): the model
learns on ``train``, the gate's cutoff is a percentile of the ``val`` scores (so about
``100 - percentile`` % of in-distribution images are rejected), and ``test`` stays held out for OOD
evaluation (:mod:`cxrbench.ood.evaluation`). With the same data, seed and fractions the split equals that
of ``cxrbench train classifier``, so the OOD test images are also the classifier's test images.

What a run writes to its output folder::

    config.json       the OODConfig
    split.csv         image_id, patient_id, split (reused on resume)
    metrics.csv       one row per epoch: losses, val median SSIM, val L1/L2, seconds, images/s
    checkpoint.pt     last finished epoch (model, optimizers, RNG states) for --resume
    best.safetensors  weights of the epoch with the highest validation median SSIM
    scores_val.csv / scores_test.csv   per-image scores of the best weights (higher = more OOD)
    bundle/           kind "ood": weights + card (scorer, cutoff, how it was chosen, val score summary)

Interrupted runs resume from ``checkpoint.pt`` with ``resume=True`` and end at the same epoch count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from cxrbench.data import CXRDataset
from cxrbench.models.ali import ALI, DEFAULT_RECON_WEIGHT, ali_train_step, make_ali_optimizers
from cxrbench.models.autoencoder import AE_LOSSES, ConvAutoencoder, ae_train_step
from cxrbench.models.bundle import ModelCard, save_bundle
from cxrbench.ood import SCORER_NAMES, OODCutoff, chester_ssim_cutoff, fit_cutoff, score_batches
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

__all__ = ["OOD_MODELS", "OODConfig", "OODTrainResult", "score_summary", "train_ood"]

OOD_MODELS: tuple[str, ...] = ("autoencoder", "ali")
DEFAULT_LR: dict[str, float] = {"autoencoder": 1e-3, "ali": 5e-4}
IMAGE_SIZE = 64
SCORE_COLUMNS: tuple[str, ...] = ("l1", "l2", "ssim", "ssim_raw", "latent")


@dataclass
class OODConfig(RunConfig):
    """Hyper-parameters of an OOD-model run (all JSON-serialisable).

    The logged ``train_loss`` is the reconstruction L1 of the training batches (the autoencoder's loss;
    ALI's ``recon_l1``, next to its ``d_loss``, ``g_adv_loss``, ``g_loss`` and ``g_steps_fraction``).

    ``lr=None`` takes the model's default (1e-3 autoencoder, 5e-4 ALI). ``recon_weight`` is ALI's L1
    reconstruction weight (:data:`cxrbench.models.ali.DEFAULT_RECON_WEIGHT`); ``ae_loss`` the
    autoencoder's loss. ``percentile`` and ``scorer`` only shape the final cutoff.
    """

    RESUME_MAY_CHANGE = ("epochs", "device", "num_workers", "percentile", "scorer")

    model: str = "autoencoder"
    latent_dim: int = 128
    width: int = 16
    epochs: int = 30
    batch_size: int = 32
    lr: float | None = None
    betas: tuple[float, float] = (0.5, 0.999)
    recon_weight: float = DEFAULT_RECON_WEIGHT
    ae_loss: str = "l1"
    percentile: float = 95.0
    scorer: str = "ssim"
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.fractions = tuple(self.fractions)  # type: ignore[assignment]
        if self.model not in OOD_MODELS:
            raise ValueError(f"unknown OOD model {self.model!r}; choose one of {OOD_MODELS}")
        if self.ae_loss not in AE_LOSSES:
            raise ValueError(f"unknown autoencoder loss {self.ae_loss!r}; choose one of {AE_LOSSES}")
        if self.scorer not in SCORER_NAMES:
            raise ValueError(f"unknown scorer {self.scorer!r}; choose one of {SCORER_NAMES}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must lie in (0, 100], got {self.percentile}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch_size >= 2 (batch norm), got {self.epochs}, {self.batch_size}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.model]

    def preprocess(self) -> Preprocess:
        """The 64 px, [0, 1] preprocessing every OOD model uses."""
        return Preprocess(size=IMAGE_SIZE, normalize="zero_one")

    def builder_kwargs(self) -> dict[str, Any]:
        """Arguments of the bundle builder (``"ali"`` or ``"autoencoder"``)."""
        return {"latent_dim": self.latent_dim, "base_channels": self.width}

    def build_model(self) -> nn.Module:
        cls = ALI if self.model == "ali" else ConvAutoencoder
        return cls(**self.builder_kwargs())


@dataclass
class OODTrainResult:
    """What :func:`train_ood` did: epochs, best epoch, the fitted cutoff and per-image scores."""

    out_dir: Path
    epochs_run: int
    best_epoch: int
    best_value: float
    history: list[dict[str, Any]] = field(default_factory=list)
    bundle: Path | None = None
    cutoff: OODCutoff | None = None
    scores: pd.DataFrame | None = None
    train_seconds: float = 0.0


def score_summary(values: np.ndarray) -> dict[str, float]:
    """Distribution summary of (N,) scores: n, mean, std, min, p5, p25, median, p75, p95, max."""
    v = np.asarray(values, dtype=float)
    q = np.percentile(v, [0, 5, 25, 50, 75, 95, 100]) if v.size else [math.nan] * 7
    return {"n": int(v.size), "mean": float(v.mean()) if v.size else math.nan,
            "std": float(v.std()) if v.size else math.nan,
            **{k: float(x) for k, x in zip(("min", "p5", "p25", "median", "p75", "p95", "max"), q)}}


def train_ood(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    config: OODConfig | None = None,
    *,
    split: pd.Series | None = None,
    resume: bool = False,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = "auto",
    data_description: str = "",
) -> OODTrainResult:
    """Train an OOD reconstruction model, fit the cutoff on validation, write a bundle (see module doc).

    Parameters
    ----------
    manifest : table from :mod:`cxrbench.data` with ``path`` and ``patient_id`` (in-distribution images).
    out_dir : run folder (created).
    split : optional split names per row (``train``/``val``/``test``); default a seeded patient split.
    resume : continue from ``out_dir/checkpoint.pt``; an absent checkpoint starts afresh.
    """
    cfg = config or OODConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    s = run_split(manifest, out, cfg.fractions, cfg.seed, split)
    full = CXRDataset(manifest, cfg.preprocess(), label_columns=[], cache_dir=cache_dir)
    report = full.build_cache(workers=2, progress=progress)
    if report.n_failed:
        print(f"warning: {report.summary()}")
    train_set = full.subset((s == "train").to_numpy()).readable()
    val_set = full.subset((s == "val").to_numpy()).readable()
    if len(train_set) < 2 or len(val_set) < 1:
        raise ValueError(f"need >= 2 readable train and >= 1 val images, got {len(train_set)} and {len(val_set)}")

    model = cfg.build_model().to(device)
    if cfg.model == "ali":
        opts = dict(zip(("d", "g"), make_ali_optimizers(model, lr=cfg.lr, betas=cfg.betas)))
    else:
        opts = {"g": torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)}
    loader_rng = torch.Generator().manual_seed(cfg.seed)
    noise_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=loader_rng,
                        num_workers=cfg.num_workers, drop_last=len(train_set) > cfg.batch_size,
                        persistent_workers=cfg.num_workers > 0, pin_memory=device.type == "cuda")

    log = MetricLog(out / "metrics.csv")
    start_epoch, best_value, best_epoch, train_seconds = 1, -math.inf, 0, 0.0
    stateful = {"optimizers": opts, "loader_rng": loader_rng, "noise_rng": noise_rng}
    ckpt = open_run(out, cfg, resume)
    if ckpt is not None:
        start_epoch = restore_training_state(ckpt, model, stateful)
        best_value, best_epoch = float(ckpt["best_value"]), int(ckpt["best_epoch"])
        train_seconds = float(ckpt["train_seconds"])
        history = [dict(r) for r in ckpt["history"]]
        log.truncate_after(0)  # the checkpoint's rows are the log: no row lost or repeated by a kill
        for row in history:
            log.append(row)
        if progress:
            print(f"resuming {out} after epoch {start_epoch - 1} (best val median SSIM {best_value:.4f} "
                  f"at epoch {best_epoch})")
    else:
        history = []
        log.truncate_after(0)

    first_new = len(history)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        clock = Stopwatch()
        losses, seen = _train_one_epoch(model, opts, loader, device, cfg, epoch, progress, noise_rng)
        epoch_train_seconds = clock()
        train_seconds += epoch_train_seconds
        val = _validate(model, val_set, device)
        improved = val["val_ssim_median"] > best_value
        if improved:
            best_value, best_epoch = val["val_ssim_median"], epoch
            save_best(model, out)
        row = {"epoch": epoch, **losses, **val, "lr": cfg.lr, "train_images": seen, "seconds": clock(),
               "images_per_s": seen / max(epoch_train_seconds, 1e-9), "best": int(improved)}
        history.append(row)
        save_training_state(out, epoch, model, stateful, cfg, best_value=best_value, best_epoch=best_epoch,
                            train_seconds=train_seconds, history=history)
        log.append(row)  # after the checkpoint, so a logged epoch is always a resumable one
        if progress:
            print(f"epoch {epoch}/{cfg.epochs}: train loss {losses['train_loss']:.4f}, val median SSIM "
                  f"{val['val_ssim_median']:.3f}, val L1 {val['val_l1']:.4f}, {row['images_per_s']:.1f} img/s")

    result = OODTrainResult(out, epoch, best_epoch, best_value, history[first_new:], train_seconds=train_seconds)
    _finish(result, model, full, s, cfg, device, data_description)
    return result


def _train_one_epoch(model, opts, loader, device, cfg: OODConfig, epoch: int, progress: bool,
                     noise_rng: torch.Generator) -> tuple[dict[str, float], int]:
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False)
    sums: dict[str, list[float]] = {}
    seen = 0
    for step, (x, _, _) in enumerate(batches):
        if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
            break
        if len(x) < 2:  # batch norm needs two images
            continue
        x = x.to(device, non_blocking=True)
        if cfg.model == "ali":
            out = ali_train_step(model, opts["d"], opts["g"], x, recon_weight=cfg.recon_weight, generator=noise_rng)
            out.pop("latent_mse")  # latent cycle term not used here
            out = {"train_loss": out["recon_l1"], **out}
        else:
            out = {"train_loss": ae_train_step(model, opts["g"], x, loss=cfg.ae_loss)}
        for k, v in out.items():
            sums.setdefault(k, []).append(v)
        seen += len(x)
    means = {k: _nanmean(v) for k, v in sums.items()}
    if "g_step_taken" in means:
        means["g_steps_fraction"] = means.pop("g_step_taken")
    means.setdefault("train_loss", math.nan)
    return means, seen


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _loader(ds: CXRDataset, batch_size: int = 64) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def _validate(model: nn.Module, val_set: CXRDataset, device: torch.device) -> dict[str, float]:
    scores = score_batches(model, _loader(val_set), device=device)
    return {"val_ssim_median": float(np.median(scores["ssim_raw"])), "val_l1": float(scores["l1"].mean()),
            "val_l2": float(scores["l2"].mean()), "val_latent_median": float(np.median(scores["latent"]))}


def _scores_table(model: nn.Module, ds: CXRDataset, name: str, device: torch.device) -> pd.DataFrame:
    if len(ds) == 0:
        return pd.DataFrame(columns=["image_id", "split", *SCORE_COLUMNS])
    scores = score_batches(model, _loader(ds), device=device)
    table = pd.DataFrame({"image_id": ds.manifest["image_id"].astype(str).to_numpy(), "split": name})
    for col in SCORE_COLUMNS:
        table[col] = scores[col]
    return table


def _finish(result: OODTrainResult, model: nn.Module, full: CXRDataset, s: pd.Series, cfg: OODConfig,
            device: torch.device, data_description: str) -> None:
    """Best weights -> scores of val and test -> percentile cutoff on val -> bundle."""
    out = result.out_dir
    load_best(model, out)
    tables = {name: _scores_table(model, full.subset((s == name).to_numpy()).readable(), name, device)
              for name in ("val", "test")}
    cutoff = fit_cutoff(tables["val"][cfg.scorer].to_numpy(), cfg.percentile, cfg.scorer)
    chester = chester_ssim_cutoff()
    rejected: dict[str, dict[str, float | None]] = {}
    for name, table in tables.items():
        table["is_ood"] = cutoff.is_ood(table[cfg.scorer].to_numpy())
        table.to_csv(out / f"scores_{name}.csv", index=False)
        n = len(table)
        rejected[name] = {"bundle_cutoff": float(table["is_ood"].mean()) if n else None,
                          "chester_ssim_0.60": float(chester.is_ood(table["ssim"].to_numpy()).mean()) if n else None,
                          "n_images": n}
    result.cutoff = cutoff
    result.scores = pd.concat([t for t in tables.values() if len(t)], ignore_index=True)
    val_summary = {name: score_summary(tables["val"][name].to_numpy()) for name in SCORE_COLUMNS}
    ood_info = {
        "cutoff": cutoff.to_dict(),
        "scorer": cfg.scorer,
        "how_chosen": f"{cutoff.method} (patient-level split, seed {cfg.seed}); higher score = more OOD",
        "scorer_definitions": {"l1": "mean |x - D(E(x))|", "l2": "mean squared error", "ssim": "1 - SSIM "
                               "(pytorch-msssim, data_range 1, 11-px Gaussian window)", "latent": "||mu(x)||_2"},
        "validation_scores": val_summary,
        "rejected_fraction": rejected,
        "chester_cutoff": chester.to_dict(),
    }
    metrics = {"best_epoch": result.best_epoch, "best_val_ssim_median": result.best_value,
               "val_ssim_median": val_summary["ssim_raw"]["median"], "val_l1_mean": val_summary["l1"]["mean"],
               "test_rejected_fraction": rejected["test"]["bundle_cutoff"]}
    card = ModelCard(
        kind="ood", builder=cfg.model, builder_kwargs=cfg.builder_kwargs(), labels=[],
        preprocess=cfg.preprocess().to_dict(), ood=ood_info,
        training=training_record(out, full.manifest, s, cfg, result.epochs_run, data_description,
                                 train_seconds=result.train_seconds),
        metrics=metrics, name=f"{cfg.model}-z{cfg.latent_dim}-w{cfg.width}",
        description="OOD gate trained with cxrbench train ood; an image is OOD when its score > cutoff")
    result.bundle = save_bundle(out / "bundle", model, card)
