"""Training an autoencoder at a classifier's input resolution, for Latent Shift counterfactuals.

The OOD family's loop, split and steps (:mod:`cxrbench.train.ood`) with two differences: the autoencoder works at
the classifier's side and intensity preprocessing (``like=`` a classifier bundle copies its size, crop, resampling
and equalisation; normalisation is always [0, 1] grey, which :class:`~cxrbench.explain.latent_shift.LatentShift`
maps to the classifier's own), and the run ends in a bundle of kind ``"autoencoder"``: no cutoff, no guard, the
reconstruction quality on the validation and test images in its metrics and the classifier it was made for in
``training["like"]``. What the run folder holds otherwise is as for ``cxrbench train ood``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, cast

import pandas as pd
from torch import nn

from cxrbench.models.autoencoder import ConvAutoencoder, trunk_spatial
from cxrbench.models.bundle import ModelCard, read_card, save_bundle
from cxrbench.ood import OODModel
from cxrbench.preprocess import Preprocess
from cxrbench.train.common import training_record
from cxrbench.train.loop import run_training
from cxrbench.train.ood import OODConfig, OODFamily, OODTrainResult, _validate

__all__ = ["AutoencoderConfig", "AutoencoderFamily", "classifier_preprocess", "train_autoencoder"]


def classifier_preprocess(bundle: str | os.PathLike) -> dict[str, Any]:
    """The ``preprocess`` of a classifier bundle's card (raises naming the folder when it is not a classifier)."""
    card = read_card(bundle)
    if card.kind != "classifier":
        raise ValueError(f"{bundle}: --like needs a classifier bundle, this one is of kind {card.kind!r}")
    return dict(card.preprocess)


@dataclass
class AutoencoderConfig(OODConfig):
    """An :class:`OODConfig` for the plain autoencoder at ``image_size`` (a multiple of 16, >= 32).

    ``preprocess_like``: the classifier card's ``preprocess`` to match (its size wins over ``image_size``);
    ``like``: where it came from (recorded). The OOD-only fields (percentile, scorer, far_reference) are unused.
    """

    image_size: int = 96
    preprocess_like: dict[str, Any] | None = None
    like: str = ""

    def __post_init__(self) -> None:
        if self.model != "autoencoder":
            raise ValueError(f"cxrbench train autoencoder trains the plain autoencoder, not {self.model!r}")
        if self.preprocess_like:
            self.image_size = int(Preprocess.from_dict(self.preprocess_like).size)
        trunk_spatial(self.image_size)  # a side the network can take, or a clear error
        super().__post_init__()

    def preprocess(self) -> Preprocess:
        """The classifier's geometry and equalisation (or ``image_size`` px), as a [0, 1] grey image."""
        base = Preprocess.from_dict(self.preprocess_like) if self.preprocess_like else Preprocess(size=self.image_size)
        return base.replace(size=self.image_size, normalize="zero_one", channels=1)

    def builder_kwargs(self) -> dict[str, Any]:
        """Arguments of the ``"autoencoder"`` builder, with its side."""
        return {**super().builder_kwargs(), "image_size": self.image_size}

    def build_model(self) -> nn.Module:
        """A fresh, untrained autoencoder at ``image_size``."""
        return ConvAutoencoder(**self.builder_kwargs())


class AutoencoderFamily(OODFamily):
    """:class:`~cxrbench.train.ood.OODFamily` ending in an ``"autoencoder"`` bundle (see the module doc)."""

    def finish(self, model: nn.Module, result: OODTrainResult, ctx: Any) -> None:
        """Reconstruction quality on val and test -> bundle of kind ``"autoencoder"``."""
        cfg = cast(AutoencoderConfig, self.config)
        quality = {name: _validate(cast(OODModel, model), self._part(name), ctx.device)
                   for name in ("val", "test") if len(self._part(name))}
        metrics = {"best_epoch": result.best_epoch, "best_val_ssim_median": result.best_value,
                   **{f"{name}_{k.removeprefix('val_')}": v for name, q in quality.items() for k, v in q.items()}}
        card = ModelCard(
            kind="autoencoder", builder="autoencoder", builder_kwargs=cfg.builder_kwargs(), labels=[],
            preprocess=cfg.preprocess().to_dict(), metrics=metrics,
            training=training_record(result.out_dir, self.full.manifest, self.split, cfg, result.epochs_run,
                                     self.data_description, train_seconds=result.train_seconds,
                                     precision=result.precision, loader_workers=result.loader_workers,
                                     loader_workers_choice=result.loader_workers_reason, like=cfg.like or None),
            name=f"autoencoder-{cfg.image_size}px-z{cfg.latent_dim}-w{cfg.width}",
            description=f"autoencoder at {cfg.image_size} px for Latent Shift counterfactuals "
                        f"(cxrbench train autoencoder{' --like ' + cfg.like if cfg.like else ''})")
        result.bundle = save_bundle(result.out_dir / "bundle", model, card)


def train_autoencoder(manifest: pd.DataFrame, out_dir: str | os.PathLike, config: AutoencoderConfig | None = None, *,
                      split: pd.Series | None = None, resume: bool = False, overwrite: bool = False,
                      progress: bool = True, cache_dir: str | os.PathLike | None = "auto",
                      data_description: str = "") -> OODTrainResult:
    """Train the autoencoder of ``config`` on ``manifest``'s train split and write its bundle (module doc).

    Parameters as :func:`cxrbench.train.ood.train_ood`; ``result.bundle`` is the ``"autoencoder"`` bundle.
    """
    family = AutoencoderFamily(manifest, config or AutoencoderConfig(), split=split, cache_dir=cache_dir,
                               data_description=data_description)
    return run_training(family, out_dir, resume=resume, overwrite=overwrite, progress=progress)
