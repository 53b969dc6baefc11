"""One shared cache of small, fingerprinted bundles that the notebooks (and a student) reuse instead of training.

:func:`shared_bundle` returns the bundle folder of a named entry — ``"nih-classifier"`` (the demo classifier),
``"ood-autoencoder"`` (the demo OOD gate), ``"lung-unet"`` and ``"phantom-classifier"`` — training it once into
``<cache>/bundles/<name>-<key>/run/`` (announced first with an estimate, with a ``tqdm.auto`` bar) and reusing it
thereafter. The key is a hash of the entry's config (less its DataLoader workers), its data (the manifest's bytes
and folder, or the phantom settings) and the cxrbench version, so changing any of them trains a new entry beside
the old one. A file lock per entry makes a concurrent second caller wait and then reuse what the first trained; an
entry is complete only when its ``entry.json`` has been written (atomically, last), so an interrupted training is
resumed, never used.

``cxrbench bundles prepare`` warms the whole cache once (``make notebooks-html`` runs it first).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, cast

import pandas as pd

from cxrbench.train.autoencoder import AutoencoderConfig
from cxrbench.train.classifier import ClassifierConfig
from cxrbench.train.common import RunConfig
from cxrbench.train.ood import OODConfig
from cxrbench.train.unet import UNetConfig

__all__ = ["ENTRY_FILE", "SHARED_BUNDLES", "SharedBundleError", "SharedSpec", "bundle_or_shared",
           "prepare_shared_bundles", "run_or_shared", "shared_bundle", "shared_bundle_key", "shared_bundles_dir"]

ENTRY_FILE = "entry.json"
PHANTOM_PREVALENCE = {"Mass": 0.4, "Effusion": 0.4, "Cardiomegaly": 0.3, "Pneumothorax": 0.3}


class SharedBundleError(RuntimeError):
    """A shared bundle cannot be made: unknown name or setting, or its data is missing (the message says which)."""


@dataclass(frozen=True)
class SharedSpec:
    """One named entry: what it is, its config, and which data it trains on.

    ``data`` is ``"nih"`` (``cxr/nih`` of the shared dev data), ``"masks"`` (``cxr/masks``) or ``"phantoms"``
    (a phantom set written into the entry, ``extra["n_images"]`` of them at the config's image size).
    """

    name: str
    description: str
    config: Callable[[], RunConfig]
    data: str
    extra: dict[str, Any] = field(default_factory=dict)


def _nih_classifier() -> RunConfig:  # the demo classifier (cxrbench.app.demo.DemoSettings)
    return ClassifierConfig(arch="resnet18", image_size=128, epochs=6, batch_size=16, seed=0,
                            early_stopping_patience=0, eval_bootstrap=200)


def _ood_autoencoder() -> RunConfig:  # the demo OOD gate
    return OODConfig(model="autoencoder", epochs=8, percentile=95.0, seed=0)


def _lung_unet() -> RunConfig:
    return UNetConfig(image_size=128, epochs=20)


def _phantom_classifier() -> RunConfig:
    return ClassifierConfig(arch="resnet18", image_size=96, epochs=12, augment=False, early_stopping_patience=0,
                            labels=["Cardiomegaly", "Effusion", "Mass", "Pneumothorax"], eval_bootstrap=50)


def _phantom_autoencoder() -> RunConfig:  # Latent Shift's autoencoder, at the phantom classifier's preprocessing
    return AutoencoderConfig(epochs=10, seed=0)


#: the named entries of the shared cache
SHARED_BUNDLES: dict[str, SharedSpec] = {s.name: s for s in (
    SharedSpec("nih-classifier", "ResNet18 at 128 px over the 14 NIH findings, 6 epochs (the demo classifier)",
               _nih_classifier, "nih"),
    SharedSpec("ood-autoencoder", "autoencoder OOD gate at 64 px, 8 epochs, cutoff at the 95th percentile "
               "(the demo gate)", _ood_autoencoder, "nih"),
    SharedSpec("lung-unet", "lung U-Net at 128 px, 20 epochs, on the image+mask pairs", _lung_unet, "masks"),
    SharedSpec("phantom-classifier", "ResNet18 at 96 px on 400 synthetic phantoms with known lesions, 12 epochs",
               _phantom_classifier, "phantoms", {"n_images": 400, "seed": 1}),
    SharedSpec("phantom-autoencoder", "autoencoder at the phantom classifier's size and preprocessing, on the same "
               "400 phantoms, 10 epochs (Latent Shift in notebook 04)", _phantom_autoencoder, "phantoms",
               {"n_images": 400, "seed": 1, "like": "phantom-classifier"}),
)}


def shared_bundles_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/bundles``: ``cache_dir``, else ``$CXRBENCH_CACHE``, else ``~/.cache/cxrbench``."""
    from cxrbench.data import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir() / "bundles"


def _spec(name: str) -> SharedSpec:
    if name not in SHARED_BUNDLES:
        raise SharedBundleError(f"no shared bundle named {name!r}; choose one of {sorted(SHARED_BUNDLES)}")
    return SHARED_BUNDLES[name]


def _settings(spec: SharedSpec, settings: dict[str, Any] | None) -> tuple[RunConfig, dict[str, Any]]:
    """The entry's config and extra settings with ``settings`` applied (config fields or extra keys)."""
    config: Any = spec.config()
    extra = dict(spec.extra)
    names = {f.name for f in fields(config)}
    unknown = sorted(set(settings or {}) - names - set(extra))
    if unknown:
        raise SharedBundleError(f"{spec.name}: unknown settings {unknown}; give fields of {type(config).__name__}"
                                + (f" or {sorted(extra)}" if extra else ""))
    given = settings or {}
    extra.update({k: v for k, v in given.items() if k in spec.extra})
    return replace(config, **{k: v for k, v in given.items() if k in names}), extra


def _data_folder(spec: SharedSpec, data: Any) -> tuple[Path | None, str]:
    """The folder ``spec`` trains on (``None`` for phantoms, written later) and its kind."""
    from cxrbench.data import resolve_data_root

    if spec.data == "phantoms":
        return None, "phantoms"
    root, kind = resolve_data_root(str(data) if data else None)
    sub = {"nih": "nih", "masks": "masks"}[spec.data]
    if kind == "shared":
        folder = root / "cxr" / sub
    elif (root / sub / "manifest.csv").is_file():
        folder = root / sub
    else:
        folder = root
    if spec.data == "masks" and not (folder / "manifest.csv").is_file():
        raise SharedBundleError(f"{folder}: no image+mask manifest for the {spec.name} bundle (it needs "
                                "cxr/masks of the shared dev data, or a data root holding masks/manifest.csv)")
    return folder, kind


def _far_reference(spec: SharedSpec, config: RunConfig, folder: Path | None, kind: str) -> RunConfig:
    """The OOD gate places its far cutoff on the dev data's non-chest radiographs, as the demo does."""
    if isinstance(config, OODConfig) and not config.far_reference and folder is not None and kind == "shared":
        nonchest = folder.parent / "nonchest"
        if (nonchest / "manifest.csv").is_file():
            return replace(config, far_reference=str(nonchest))
    return config


def _resolve(name: str, data: Any, settings: dict[str, Any] | None) -> tuple[SharedSpec, RunConfig, dict, Path | None,
                                                                              str, str]:
    """``(spec, config, extra, data folder, kind, key)`` of one entry."""
    from cxrbench import __version__

    spec = _spec(name)
    config, extra = _settings(spec, settings)
    if extra.get("like"):  # an autoencoder made for a classifier: a shared entry's name or a bundle folder
        named = str(extra["like"])
        if named in SHARED_BUNDLES:  # keyed by that entry's key; its card is read when this one trains
            extra = {**extra, "like_key": shared_bundle_key(named, data), "like_data": str(data or "")}
        else:
            config = _made_like(config, Path(named))
    folder, kind = _data_folder(spec, data)
    config = _far_reference(spec, config, folder, kind)
    identity = config.to_dict()
    if "num_workers" in identity:  # how many processes load the data makes no other bundle; 0 was the default
        identity["num_workers"] = 0  # before ``auto`` (None), so the entries trained then keep their keys
    h = hashlib.sha1(json.dumps({"name": name, "config": identity, "extra": extra, "version": __version__},
                                sort_keys=True, default=str).encode())
    if folder is not None:
        manifest = folder / "manifest.csv"
        h.update(manifest.read_bytes() if manifest.is_file() else str(sorted(os.listdir(folder))[:1000]).encode())
        h.update(str(folder.resolve()).encode())
    return spec, config, extra, folder, kind, h.hexdigest()[:16]


def _made_like(config: RunConfig, classifier: Path) -> RunConfig:
    """An autoencoder config at ``classifier``'s size and preprocessing (``cxrbench train autoencoder --like``)."""
    from cxrbench.models.bundle import read_card

    return replace(cast(AutoencoderConfig, config), preprocess_like=read_card(classifier).preprocess,
                   like=str(classifier))


def shared_bundle_key(name: str, data: Any = None, *, settings: dict[str, Any] | None = None) -> str:
    """The 16-hex key of entry ``name`` on ``data`` with ``settings``: config + data fingerprint + version."""
    return _resolve(name, data, settings)[-1]


def _training_manifest(spec: SharedSpec, config: RunConfig, extra: dict, folder: Path | None,
                       entry: Path) -> tuple[pd.DataFrame, str]:
    from cxrbench.data import load_manifest
    from cxrbench.data.synthetic import write_phantom_set

    if folder is None:  # phantoms, written into the entry itself (the bundle's card names them)
        size = int(getattr(config, "image_size"))
        folder = entry / "phantoms"
        if not (folder / "manifest.csv").is_file():
            write_phantom_set(folder, int(extra["n_images"]), size=size, seed=int(extra["seed"]),
                              prevalence=PHANTOM_PREVALENCE)
        return load_manifest(folder), f"{folder} ({extra['n_images']} phantoms at {size} px)"
    return load_manifest(folder, on_missing="drop"), str(folder)


def _train(spec: SharedSpec, config: RunConfig, extra: dict, folder: Path | None, kind: str, entry: Path,
           progress: bool) -> Path:
    from cxrbench.train.ensure import _announce, _family

    if extra.get("like_key"):  # the shared classifier it is made like, trained first when missing
        config = _made_like(config, shared_bundle(str(extra["like"]), extra["like_data"] or None, progress=progress))
    _, word, train, _ = _family(config)
    manifest, source = _training_manifest(spec, config, extra, folder, entry)
    run = entry / "run"
    print(f"the shared {spec.name!r} bundle is not in the cache yet; training it once ({spec.description}), "
          "later calls reuse it", flush=True)
    _announce(run, config, word, manifest, f"{source} ({kind})", f"shared cache entry {entry.name}")
    kwargs: dict[str, Any] = {"data_description": f"{source} ({kind})"}
    if not isinstance(config, UNetConfig):
        kwargs["cache_dir"] = "auto"
    result = train(manifest, run, config, resume=True, progress=progress, **kwargs)
    if result.bundle is None:  # only a non-main torchrun rank writes no bundle
        raise SharedBundleError(f"{run}: training wrote no bundle (run it as one process, not under torchrun)")
    return Path(result.bundle)


def _complete(entry: Path) -> dict[str, Any] | None:
    path = entry / ENTRY_FILE
    if not path.is_file():
        return None
    info: dict[str, Any] = json.loads(path.read_text())
    return info if (Path(info["bundle"]) / "card.json").is_file() else None


def shared_bundle(name: str, data: Any = None, *, settings: dict[str, Any] | None = None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The bundle folder of the shared entry ``name``, trained into the cache the first time (see module doc).

    Parameters
    ----------
    name : one of :data:`SHARED_BUNDLES`.
    data : the data root to train on (``None``/``""``: the shared dev data if present, else phantoms); the
        phantom entry ignores it.
    settings : overrides of the entry's config fields (e.g. ``{"epochs": 1}``) or extra keys (``n_images``);
        they are part of the key, so a changed setting is a new entry.
    cache_dir : the folder holding the entries (default :func:`shared_bundles_dir`).

    The bundle's run folder (``split.csv``, ``metrics.csv``, ``predictions_test.csv``) is its parent.
    Raises :class:`SharedBundleError` for an unknown name or setting, or missing data.
    """
    from filelock import FileLock

    spec, config, extra, folder, kind, key = _resolve(name, data, settings)
    root = shared_bundles_dir(cache_dir)
    entry = root / f"{name}-{key}"
    info = _complete(entry)
    if info is None:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{name}-{key}.lock")):  # a second caller waits here, then reuses
            info = _complete(entry)
            if info is None:
                t0 = time.perf_counter()
                bundle = _train(spec, config, extra, folder, kind, entry, progress)
                info = {"name": name, "key": key, "bundle": str(bundle), "data": str(folder or entry / "phantoms"),
                        "kind": kind, "seconds": round(time.perf_counter() - t0, 1),
                        "trained": time.strftime("%Y-%m-%d %H:%M:%S")}
                tmp = entry / f".{ENTRY_FILE}.{os.getpid()}"
                tmp.write_text(json.dumps(info, indent=1) + "\n")
                os.replace(tmp, entry / ENTRY_FILE)
                return bundle
    if progress:
        print(f"using the shared {name!r} bundle ({spec.description}), trained {info['trained']} on "
              f"{info['data']}: {info['bundle']}")
    return Path(info["bundle"])


def bundle_or_shared(bundle: str | os.PathLike | None, name: str, data: Any = None, **kwargs: Any) -> Path:
    """``bundle`` when given (a folder the user named; used as it is), else :func:`shared_bundle` ``(name, data)``."""
    return Path(bundle) if bundle else shared_bundle(name, data, **kwargs)


def run_or_shared(run_dir: str | os.PathLike | None, name: str, config: RunConfig, *, data: Any = None,
                  train_if_missing: bool = False, progress: bool = True) -> Path:
    """The bundle folder of the run in ``run_dir`` when given (:func:`~cxrbench.train.ensure.ensure_run`: it trains
    there only when ``train_if_missing`` asks), else of the shared entry ``name`` (``config`` is then unused)."""
    from cxrbench.train.ensure import ensure_run

    if run_dir:
        return ensure_run(run_dir, config, data=data, train_if_missing=train_if_missing, progress=progress)
    return shared_bundle(name, data, progress=progress)


def prepare_shared_bundles(names: list[str] | None = None, data: Any = None, *,
                           progress: bool = True) -> list[dict[str, Any]]:
    """Warm the cache: train (or find) each entry; one row ``{name, bundle, seconds}`` each."""
    rows = []
    for name in names or list(SHARED_BUNDLES):
        t0 = time.perf_counter()
        bundle = shared_bundle(name, data, progress=progress)
        rows.append({"name": name, "bundle": str(bundle), "seconds": round(time.perf_counter() - t0, 1)})
    return rows
