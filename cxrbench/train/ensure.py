"""A finished run folder for a notebook or a script: use the one the user named, train it only when asked.

:func:`ensure_run` never writes into the folder it is given unless ``train_if_missing`` asks for training; a
path that is not a run folder (a bundle folder, a data folder, a typo) gets one clear error naming it. When it
trains, it says first what it trains, where, on which data, and how long that should take
(:func:`estimate_training_seconds`, from a timed training step).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from cxrbench.models.bundle import read_card
from cxrbench.train.autoencoder import AutoencoderConfig, train_autoencoder
from cxrbench.train.classifier import ClassifierConfig, cxr_augmentation, train_classifier
from cxrbench.train.common import RunConfig
from cxrbench.train.folder import RunFolderError, inspect_run_folder, not_a_run_folder
from cxrbench.train.ood import OODConfig, train_ood
from cxrbench.train.runtime import Precision, pick_device, precision_policy
from cxrbench.train.unet import UNetConfig, train_unet

__all__ = ["ensure_run", "estimate_training_seconds"]

#: config class -> (bundle kind, the word for it, the training function, the shared data folder it trains on)
_FAMILIES: dict[type, tuple[str, str, Callable[..., Any], str]] = {  # subclasses first (isinstance order)
    AutoencoderConfig: ("autoencoder", "autoencoder", train_autoencoder, "cxr/nih"),
    ClassifierConfig: ("classifier", "classifier", train_classifier, "cxr/nih"),
    OODConfig: ("ood", "OOD model", train_ood, "cxr/nih"),
    UNetConfig: ("segmentation", "lung U-Net", train_unet, "cxr/masks"),
}


def _family(config: RunConfig) -> tuple[str, str, Callable[..., Any], str]:
    for cls, family in _FAMILIES.items():
        if isinstance(config, cls):
            return family
    raise TypeError(f"no training family for {type(config).__name__}; give a ClassifierConfig, OODConfig or UNetConfig")


def _manifest(data: Any, shared_folder: str) -> tuple[pd.DataFrame, str]:
    """The training manifest of ``data`` (a manifest, a dataset folder, or ``None``/``""``: the shared dev
    data if present, else phantoms) and a description of where it came from."""
    from cxrbench.data import load_manifest, resolve_data_root

    if isinstance(data, pd.DataFrame):
        return data, str(data.attrs.get("root", "a manifest"))
    root, kind = resolve_data_root(str(data) if data else None)
    folder = root / shared_folder if kind == "shared" else root
    return load_manifest(folder, on_missing="drop"), f"{folder} ({kind})"


def _model_and_batch(config: RunConfig, n_outputs: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from cxrbench.models.classifier import build_classifier
    from cxrbench.models.unet import UNet

    if isinstance(config, ClassifierConfig):
        model = build_classifier(config.arch, n_outputs, config.in_channels)
        return model, torch.rand(config.batch_size, config.in_channels, config.image_size, config.image_size)
    if isinstance(config, OODConfig):
        size = config.preprocess().size
        return config.build_model(), torch.rand(config.batch_size, 1, size, size)
    if isinstance(config, UNetConfig):
        model = UNet(1, config.base_channels, config.depth)
        return model, torch.rand(config.batch_size, 1, config.image_size, config.image_size)
    raise TypeError(f"cannot time {type(config).__name__}")


def _step_precision(config: RunConfig, device: torch.device) -> Precision:
    """The precision the run's own steps use (:func:`precision_policy` with the config's amp / channels_last /
    precision; families without those fields train in fp32), so the timed step is the step the run takes."""
    return precision_policy(device, bool(getattr(config, "amp", False)), bool(getattr(config, "channels_last", False)),
                            str(getattr(config, "precision", "auto")))


def _seconds_per_step(model: torch.nn.Module, x: torch.Tensor, device: torch.device,
                      precision: Precision | None = None, *,
                      augment: Callable[[torch.Tensor], torch.Tensor] | None = None, warm_up: int = 2,
                      timed: int = 2) -> float:
    """Seconds of an Adam step (the batch's per-image ``augment``, as the training set applies it; forward and a
    stand-in loss under the run's autocast, backward, step) in the run's precision and memory format, the median
    of ``timed`` steps after ``warm_up`` untimed ones (the first steps create oneDNN's kernels and are several
    times slower)."""
    precision = precision or Precision()
    model = model.to(device).train()
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    times = []
    for _ in range(warm_up + timed):
        t0 = time.perf_counter()
        batch = torch.stack([augment(image) for image in x]) if augment is not None else x
        batch = batch.to(device)
        if precision.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device):
            out = model(batch)
            loss = sum(o.float().mean() for o in out) if isinstance(out, tuple) else out.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times[warm_up:]))


def estimate_training_seconds(config: RunConfig, n_images: int, n_outputs: int = 14) -> dict[str, Any]:
    """How long training ``config`` on ``n_images`` (train + val + test) should take here, from a timed step.

    The step is timed as the run takes it: with a classifier's per-image augmentation, in the precision and memory
    format the run's precision policy picks (bf16 autocast + channels_last on CPUs with avx512_bf16,
    :func:`~cxrbench.train.runtime.precision_policy`), after warm-up steps. Returns ``{"seconds",
    "seconds_per_step", "steps_per_epoch", "train_images", "precision"}``: the training steps only (decoding,
    validation and the final evaluation come on top).
    """
    fractions = getattr(config, "fractions", (0.7, 0.1, 0.2))
    n_train = max(1, round(n_images * fractions[0]))
    batch = int(getattr(config, "batch_size"))
    steps = max(1, n_train // batch if n_train > batch else 1)
    cap = getattr(config, "max_steps_per_epoch", None)
    steps = min(steps, cap) if cap else steps
    model, x = _model_and_batch(config, n_outputs)
    device = pick_device(getattr(config, "device", "auto"))
    precision = _step_precision(config, device)
    augment = cxr_augmentation(config) if isinstance(config, ClassifierConfig) and config.augment else None
    per_step = _seconds_per_step(model, x, device, precision, augment=augment)
    return {"seconds": per_step * steps * int(getattr(config, "epochs")), "seconds_per_step": per_step,
            "steps_per_epoch": steps, "train_images": n_train, "precision": precision.describe()}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def _announce(run: Path, config: RunConfig, word: str, manifest: pd.DataFrame, source: str, why: str) -> None:
    labels = manifest.attrs.get("label_columns", [])
    estimate = estimate_training_seconds(config, len(manifest), len(getattr(config, "labels", None) or labels) or 1)
    size = getattr(config, "image_size", None) or config.preprocess().size  # type: ignore[attr-defined]
    what = getattr(config, "arch", None) or getattr(config, "model", None) or word
    epochs = int(getattr(config, "epochs"))
    article = "an" if word.startswith("OOD") else "a"
    plural = "" if epochs == 1 else "s"
    print(f"training {article} {word} into {run} ({why}): {what} at {size} px, {epochs} epoch{plural} "
          f"of {estimate['steps_per_epoch']} steps (batch {getattr(config, 'batch_size')}, about "
          f"{estimate['train_images']} training images of {len(manifest)} from {source}); estimated "
          f"{_duration(estimate['seconds'])} of training steps on {pick_device(getattr(config, 'device', 'auto'))} "
          f"({estimate['seconds_per_step']:.2f} s per step, measured in {estimate['precision']}; decoding and "
          "evaluation add to it)")


def _why_missing(run: Path) -> str:
    folder = inspect_run_folder(run)
    if not folder.exists:
        return "no such folder"
    if folder.empty:
        return "an empty folder"
    return f"an unfinished run ({folder.describe()})"


def ensure_run(run_dir: str | os.PathLike, config: RunConfig, *, data: Any = None, train_if_missing: bool = False,
               progress: bool = True, cache_dir: str | os.PathLike | None = "auto") -> Path:
    """The bundle folder of the finished run in ``run_dir``; trains the run there only when ``train_if_missing``.

    Parameters
    ----------
    run_dir : a run folder (``cxrbench train ...`` or notebook 01), holding ``bundle/`` when finished.
    config : the run's family and, when it trains, its settings (a ClassifierConfig, OODConfig or UNetConfig);
        a finished run is used as it is, whatever its settings.
    data : what to train on when it trains: a manifest, a dataset folder, or ``None``/``""`` (the shared dev
        data if present, else phantoms); not read otherwise.
    train_if_missing : train (or finish an interrupted run, resuming it) when ``run_dir`` holds no finished run,
        saying first what, where, on which data and for about how long. ``False`` (the default) never writes.

    Raises
    ------
    RunFolderError
        ``run_dir`` is not a run folder (e.g. a bundle folder: the message names its run folder when there is
        one), holds a run of another family, or holds no finished run and training was not asked for
        (then nothing is created).
    """
    run = Path(run_dir)
    kind, word, train, shared_folder = _family(config)
    folder = inspect_run_folder(run)
    if not folder.empty and not folder.is_run:
        where = "; a bundle without a run goes where a bundle is asked for (notebook 02: bundle)" \
            if folder.is_bundle and kind == "classifier" else ""
        raise not_a_run_folder(folder, f"give the folder of a {word} run{where}")
    bundle = run / "bundle"
    if (bundle / "card.json").is_file():
        card = read_card(bundle)
        if card.kind != kind:
            raise RunFolderError(f"{run}: holds a run of kind {card.kind!r}; {word} runs (kind {kind!r}) are "
                                 "needed here")
        if progress:
            print(f"using the {word} run in {run}: {card.name}, trained on {card.training.get('data') or '?'}")
        return bundle
    why = _why_missing(run)
    if not train_if_missing:
        raise RunFolderError(f"{run}: {why}, no finished {word} run (no bundle/); check the path, or ask for "
                             "training (train_if_missing = True) to train one there")
    manifest, source = _manifest(data, shared_folder)
    _announce(run, config, word, manifest, source, why)
    kwargs: dict[str, Any] = {"data_description": source}
    if not isinstance(config, UNetConfig):
        kwargs["cache_dir"] = cache_dir
    result = train(manifest, run, config, resume=True, progress=progress, **kwargs)
    if result.bundle is None:
        raise RunFolderError(f"{run}: training wrote no bundle")
    return Path(result.bundle)
