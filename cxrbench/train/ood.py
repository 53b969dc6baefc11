"""Training the OOD gate's reconstruction model (the plain autoencoder or ALI) on 64 px chest X-rays.

The in-distribution data are split by patient (seeded, Chester's 70/10/20 by default): the model
learns on ``train``, the gate's cutoff is a percentile of the ``val`` scores (so about
``100 - percentile`` % of in-distribution images are rejected), and ``test`` stays held out for OOD
evaluation (:mod:`cxrbench.ood.evaluation`). With the same data, seed and fractions the split equals that
of ``cxrbench train classifier``, so the OOD test images are also the classifier's test images.

What a run writes to its output folder::

    config.json       the OODConfig
    split.csv         image_id, patient_id, split, seed, fractions, manifest_sha256 (reused on resume if they match)
    metrics.csv       one row per epoch: losses, val median SSIM, val L1/L2, seconds, images/s
    checkpoint.pt     last finished epoch (model, optimizers, generators, RNG states) for --resume
    best.safetensors  weights of the epoch with the highest validation median SSIM
    scores_val.csv / scores_test.csv   per-image scores of the best weights (higher = more OOD), the files read
                      in float as ``cxrbench ood-score`` and the Pipeline's gate read them (not the 8-bit
                      training cache), so the cutoff fitted on them is the one those apply
    bundle/           kind "ood": weights + card (scorer, cutoff, how it was chosen, val score summary, and the
                      blank-image guard fitted on the val images: ``ood["guard"]``,
                      :func:`cxrbench.ood.guard.fit_guard`)

The epochs run in the one training loop (:mod:`cxrbench.train.loop`): interrupted runs resume from
``checkpoint.pt`` with ``resume=True`` and end with the same weights and metrics as an uninterrupted
run. The OOD models train in one process (fp32; not under ``torchrun``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from cxrbench.data import CXRDataset
from cxrbench.models.ali import ALI, DEFAULT_RECON_WEIGHT, ali_train_step, make_ali_optimizers
from cxrbench.models.autoencoder import AE_LOSSES, ConvAutoencoder, ae_train_step
from cxrbench.models.bundle import ModelCard, save_bundle
from cxrbench.ood import SCORER_NAMES, OODCutoff, OODModel, chester_ssim_cutoff, fit_cutoff, score_batches
from cxrbench.ood.guard import fit_guard
from cxrbench.preprocess import Preprocess
from cxrbench.train.common import RunConfig, decode_all, run_split, training_record
from cxrbench.train.family import LoopResult, LoopSettings, TrainingParts
from cxrbench.train.loop import run_training
from cxrbench.train.runtime import RunContext

__all__ = ["OOD_MODELS", "OODConfig", "OODFamily", "OODTrainResult", "score_summary", "train_ood"]

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
    autoencoder's loss. ``percentile`` and ``scorer`` only shape the final cutoff. ``far_reference``, a folder
    of non-chest radiographs with a manifest (the dev data's ``cxr/nonchest``), places the far cutoff
    (:func:`cxrbench.ood.cutoffs.fit_far_cutoff`); without it the far cutoff keeps 99 % of validation images.
    """

    RESUME_MAY_CHANGE = ("epochs", "device", "num_workers", "percentile", "scorer", "far_reference")

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
    num_workers: int | None = None  # None: auto (:func:`cxrbench.train.runtime.loader_workers`: 0 on the CPU)
    max_steps_per_epoch: int | None = None
    far_reference: str = ""

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
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 or None (auto), got {self.num_workers}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.model]

    def preprocess(self) -> Preprocess:
        """The 64 px, [0, 1] preprocessing every OOD model uses."""
        return Preprocess(size=IMAGE_SIZE, normalize="zero_one")

    def builder_kwargs(self) -> dict[str, Any]:
        """Arguments of the bundle builder (``"ali"`` or ``"autoencoder"``)."""
        return {"latent_dim": self.latent_dim, "base_channels": self.width}

    def build_model(self) -> nn.Module:
        """A fresh, untrained ALI or autoencoder as configured."""
        cls = ALI if self.model == "ali" else ConvAutoencoder
        return cls(**self.builder_kwargs())


@dataclass
class OODTrainResult(LoopResult):
    """What :func:`train_ood` did: the loop's account plus the bundle, the fitted cutoff and per-image scores."""

    bundle: Path | None = None
    cutoff: OODCutoff | None = None
    scores: pd.DataFrame | None = None


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
    overwrite: bool = False,
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
    overwrite : start clean in a folder that holds an earlier run (deletes its files); without it, or
        ``resume``, a fresh run into such a folder is refused.
    """
    family = OODFamily(manifest, config or OODConfig(), split=split, cache_dir=cache_dir,
                       data_description=data_description)
    return run_training(family, out_dir, resume=resume, overwrite=overwrite, progress=progress)


class OODFamily:
    """The OOD reconstruction model as a family of the epoch loop (:func:`cxrbench.train.loop.run_training`).

    The best epoch has the highest validation median SSIM of the reconstructions; no schedule, no
    early stopping.
    """

    result_class = OODTrainResult

    def __init__(self, manifest: pd.DataFrame, config: OODConfig, *, split: pd.Series | None = None,
                 cache_dir: str | os.PathLike | None = "auto", data_description: str = "") -> None:
        cfg = self.config = config
        self.manifest, self.given_split, self.cache_dir = manifest, split, cache_dir
        self.data_description = data_description
        self.settings = LoopSettings(
            epochs=cfg.epochs, batch_size=cfg.batch_size, monitor="val_ssim_median", mode="max", seed=cfg.seed,
            device=cfg.device, num_workers=cfg.num_workers, max_steps_per_epoch=cfg.max_steps_per_epoch,
            data_parallel=False,
            epoch_line=(("train loss", "train_loss", ".4f"), ("val median SSIM", "val_ssim_median", ".3f"),
                        ("val L1", "val_l1", ".4f")))

    def prepare(self, ctx: RunContext) -> CXRDataset:
        """The patient split, the 64 px uint8 cache, the train and val sets (>= 2 and >= 1 images)."""
        cfg = self.config
        self.split = run_split(self.manifest, ctx.out, cfg.fractions, cfg.seed, self.given_split)
        self.full = CXRDataset(self.manifest, cfg.preprocess(), label_columns=[], cache_dir=self.cache_dir)
        decode_all(self.full, ctx.progress, ctx.workers)
        train_set, self.val_set = self._part("train"), self._part("val")
        if len(train_set) < 2 or len(self.val_set) < 1:
            raise ValueError(f"need >= 2 readable train and >= 1 val images, got {len(train_set)} and "
                             f"{len(self.val_set)}")
        return train_set

    def _part(self, name: str) -> CXRDataset:
        return self.full.subset((self.split == name).to_numpy()).readable()

    def build(self, ctx: RunContext) -> TrainingParts:
        """The model, Adam (one for the autoencoder; discriminator + encoder/decoder for ALI), ALI's noise."""
        cfg = self.config
        model = ctx.place(cfg.build_model())
        lr = DEFAULT_LR[cfg.model] if cfg.lr is None else cfg.lr
        if isinstance(model, ALI):
            self.optimizers = dict(zip(("d", "g"), make_ali_optimizers(model, lr=lr, betas=cfg.betas)))
        else:
            self.optimizers = {"g": torch.optim.Adam(model.parameters(), lr=lr, betas=cfg.betas)}
        self.noise = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 1)
        return TrainingParts(model, dict(self.optimizers), generators={"noise": self.noise})

    def train_step(self, model: nn.Module, batch: list[Any], ctx: RunContext) -> dict[str, float] | None:
        """One step on ``(x (B, 1, 64, 64) in [0, 1], ...)``; ``train_loss`` is the reconstruction L1.

        ALI also reports its discriminator and generator losses (those of a halted generator step are
        left out of the epoch's means) and ``g_steps_fraction``.
        """
        x = batch[0]
        if len(x) < 2:  # batch norm needs two images
            return None
        cfg = self.config
        if isinstance(model, ConvAutoencoder):
            return {"train_loss": ae_train_step(model, self.optimizers["g"], x, loss=cfg.ae_loss)}  # type: ignore[arg-type]
        assert isinstance(model, ALI)
        out = ali_train_step(model, self.optimizers["d"], self.optimizers["g"], x, recon_weight=cfg.recon_weight,
                             generator=self.noise)
        out.pop("latent_mse")  # latent cycle term not used here
        out["g_steps_fraction"] = out.pop("g_step_taken")
        if not out["g_steps_fraction"]:
            del out["g_adv_loss"], out["g_loss"]
        return {"train_loss": out["recon_l1"], **out}

    def validate(self, model: nn.Module, ctx: RunContext) -> dict[str, float]:
        """Median SSIM of the val reconstructions (monitored), mean L1 / L2, median latent norm."""
        return _validate(cast(OODModel, model), self.val_set, ctx.device)

    def finish(self, model: nn.Module, result: OODTrainResult, ctx: RunContext) -> None:
        """Scores of val and test -> percentile cutoff on val -> bundle."""
        _finish(result, cast(OODModel, model), self, ctx.device)


def _loader(ds: CXRDataset, batch_size: int = 64) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def _validate(model: OODModel, val_set: CXRDataset, device: torch.device) -> dict[str, float]:
    scores = score_batches(model, _loader(val_set), device=device)
    return {"val_ssim_median": float(np.median(scores["ssim_raw"])), "val_l1": float(scores["l1"].mean()),
            "val_l2": float(scores["l2"].mean()), "val_latent_median": float(np.median(scores["latent"]))}


def _file_batches(paths: list[str], preprocess: Preprocess, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """``(B, 1, S, S)`` batches of the files read and preprocessed in float, as ``cxrbench ood-score`` and the
    Pipeline's gate read them (not the training's 8-bit cache)."""
    from cxrbench.io import read_image

    for i in range(0, len(paths), batch_size):
        yield torch.as_tensor(np.stack([preprocess(read_image(p).pixels) for p in paths[i:i + batch_size]]))


def _scores_table(model: OODModel, ds: CXRDataset, name: str, device: torch.device) -> pd.DataFrame:
    """Per-image scores of ``ds``'s files through the float path (:func:`_file_batches`): the run's recorded
    scores and cutoff are what ``ood-score`` gives for the same files."""
    if len(ds) == 0:
        return pd.DataFrame(columns=["image_id", "split", *SCORE_COLUMNS])
    scores = score_batches(model, _file_batches(ds.manifest["path"].astype(str).tolist(), ds.preprocess),
                           device=device)
    table = pd.DataFrame({"image_id": ds.manifest["image_id"].astype(str).to_numpy(), "split": name})
    for col in SCORE_COLUMNS:
        table[col] = scores[col]
    return table


def guard_record(val_set: CXRDataset) -> dict[str, Any]:
    """The card's ``ood["guard"]``: the blank-image guard fitted on the validation images (their 64 px crops from
    the training cache, which are the guard's own analysis resolution): cutoffs, keep rate, measure summaries."""
    guard, record = fit_guard([val_set.display_image(i) for i in range(len(val_set))])
    return {**guard.to_dict(), **record}


def _far_cutoff(model: OODModel, family: OODFamily, val: pd.DataFrame, near: OODCutoff,
                device: torch.device) -> dict[str, Any]:
    """``far_cutoff`` (scored on the config's ``far_reference`` set when given) and the gate's false-rejection
    rates on the validation chest X-rays, for the card."""
    from cxrbench.data import load_manifest
    from cxrbench.ood.cutoffs import fit_far_cutoff

    cfg = family.config
    far_scores = None
    if cfg.far_reference:
        ref = CXRDataset(load_manifest(cfg.far_reference, on_missing="drop"), cfg.preprocess(), label_columns=[],
                         cache_dir=None).readable()
        far_scores = _scores_table(model, ref, "far_reference", device)[cfg.scorer].to_numpy()
    scores = val[cfg.scorer].to_numpy()
    far, record = fit_far_cutoff(scores, far_scores, near=near.threshold, scorer=cfg.scorer)
    false_rejection = {"split": "val", "n_images": int(scores.size), "near": float(near.is_ood(scores).mean()),
                       "far": float(far.is_ood(scores).mean())}
    return {"far_cutoff": {**far.to_dict(), "reference": cfg.far_reference or None, **record},
            "false_rejection": false_rejection}


def _finish(result: OODTrainResult, model: OODModel, family: OODFamily, device: torch.device) -> None:
    """Scores of val and test -> percentile cutoff on val -> bundle."""
    out, cfg, s = result.out_dir, family.config, family.split
    tables = {name: _scores_table(model, family._part(name), name, device) for name in ("val", "test")}
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
        "guard": guard_record(family._part("val")),
        "cutoff": cutoff.to_dict(),
        "scorer": cfg.scorer,
        "how_chosen": f"{cutoff.method} (patient-level split, seed {cfg.seed}); higher score = more OOD",
        "scorer_definitions": {"l1": "mean |x - D(E(x))|", "l2": "mean squared error", "ssim": "1 - SSIM "
                               "(pytorch-msssim, data_range 1, 11-px Gaussian window)", "latent": "||mu(x)||_2"},
        "validation_scores": val_summary,
        "rejected_fraction": rejected,
        "chester_cutoff": chester.to_dict(),
        **_far_cutoff(model, family, tables["val"], cutoff, device),
    }
    metrics = {"best_epoch": result.best_epoch, "best_val_ssim_median": result.best_value,
               "val_ssim_median": val_summary["ssim_raw"]["median"], "val_l1_mean": val_summary["l1"]["mean"],
               "test_rejected_fraction": rejected["test"]["bundle_cutoff"]}
    card = ModelCard(
        kind="ood", builder=cfg.model, builder_kwargs=cfg.builder_kwargs(), labels=[],
        preprocess=cfg.preprocess().to_dict(), ood=ood_info,
        training=training_record(out, family.full.manifest, s, cfg, result.epochs_run, family.data_description,
                                 train_seconds=result.train_seconds, precision=result.precision,
                                 loader_workers=result.loader_workers,
                                 loader_workers_choice=result.loader_workers_reason),
        metrics=metrics, name=f"{cfg.model}-z{cfg.latent_dim}-w{cfg.width}",
        description="OOD gate trained with cxrbench train ood; an image is OOD when its score > cutoff")
    result.bundle = save_bundle(out / "bundle", cast(nn.Module, model), card)
