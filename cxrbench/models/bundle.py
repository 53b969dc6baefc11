"""The saved form of a trained model: safetensors weights + a JSON card, in one folder.

::

    my_model/
        model.safetensors   tensors only; loading never unpickles anything
        card.json           what the weights are and how to use them

The card says everything needed to use the weights correctly, so a model cannot be fed with the
wrong preprocessing or read with the wrong label order: the architecture and its arguments, the
labels, the :class:`~cxrbench.preprocess.Preprocess`, calibration (operating points), an OOD cutoff,
what it was trained on (data, split file, seed, hyper-parameters), its metrics, and the package
versions. It also records the SHA-256 of the weights file, so a truncated or swapped file is caught.

Architectures are built from a fixed registry (:data:`BUILDERS`), never from names imported out of a
card, so loading a bundle cannot run code chosen by whoever wrote it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrbench.models.card import BUILDERS, BUNDLE_FORMAT, BundleError, ModelCard, describe_card, format_metric, versions
from cxrbench.preprocess import Preprocess

__all__ = ["BUILDERS", "BUNDLE_FORMAT", "Bundle", "BundleError", "ModelCard", "build_model", "describe_card",
           "file_sha256", "format_metric", "load_bundle", "read_card", "remove_stale_temporaries", "save_bundle",
           "untrained_classifier_bundle", "versions"]

WEIGHTS_FILE, CARD_FILE = "model.safetensors", "card.json"


@dataclass
class Bundle:
    """A loaded bundle: the model (eval mode, on CPU) and its card."""

    model: nn.Module
    card: ModelCard
    path: Path | None = None

    @property
    def preprocess(self) -> Preprocess:
        """The card's preprocessing (what every input must go through)."""
        return self.card.preprocessing

    @property
    def labels(self) -> list[str]:
        """The model's output names, in output order."""
        return list(self.card.labels)


def build_model(builder: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate a registered architecture (never pretrained weights: the bundle brings its own)."""
    if builder not in BUILDERS:
        raise BundleError(f"unknown builder {builder!r}; expected one of {sorted(BUILDERS)}")
    module_name, attr = BUILDERS[builder].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    kwargs = dict(kwargs)
    if builder == "classifier":
        kwargs["pretrained"] = False
    return factory(**kwargs)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (bundle weights, imported checkpoints, exported graphs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(path: str | os.PathLike, model: nn.Module, card: ModelCard) -> Path:
    """Write ``model``'s weights and ``card`` to the folder ``path``, atomically.

    The folder is written next to its final place and renamed into it, so an interrupted save never
    leaves a half-written bundle where a good one was.
    """
    from safetensors.torch import save_file

    path = Path(path)
    card.validate(str(path / CARD_FILE), require_checksum=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        # one metadata key: safetensors writes them in hash-map order, so two would make equal weights
        # give different files (and checksums) from run to run
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        card.weights_sha256 = file_sha256(tmp / WEIGHTS_FILE)
        card_json = json.dumps(card.to_dict(), indent=2, sort_keys=False, default=_json_default)
        (tmp / CARD_FILE).write_text(card_json + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Tidy what interrupted saves of the bundle ``path`` left beside it: their temporary folders (once their
    process is gone) and the previous bundle set aside during the final renames (put back when ``path`` is
    missing, i.e. the save was killed between its two renames; deleted otherwise)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*-*"):
        pid = tmp.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _stacked(images: Any, preprocess: Preprocess) -> torch.Tensor:
    return torch.from_numpy(np.stack([preprocess(im) for im in images]))


def untrained_classifier_bundle(path: str | os.PathLike, *, arch: str = "resnet18",
                                preprocess: Preprocess | None = None, images: Any = None,
                                thresholds: dict[str, float | None] | None = None, seed: int = 0, name: str = "",
                                description: str = "seeded random weights (no skill)") -> Path:
    """A 14-finding classifier bundle with seeded random weights, for plumbing where skill does not matter.

    Export and parity checks, latency benchmarks and app tests need a real bundle of the real size, not
    a trained one. Operating points: the median raw probability of each finding over ``images``
    (pixel arrays in [0, 1]), so calibrated outputs fall on both sides of 0.5; 0.5 without images.
    ``thresholds`` then overrides single findings (``None``: no operating point).
    """
    from cxrbench.labels import NIH_FINDINGS

    preprocess = preprocess or Preprocess(size=224)
    kwargs = {"arch": arch, "num_outputs": len(NIH_FINDINGS), "in_channels": preprocess.channels}
    torch.manual_seed(seed)
    model = build_model("classifier", kwargs).eval()
    ops: dict[str, float | None] = {f: 0.5 for f in NIH_FINDINGS}
    if images is not None and len(images):
        with torch.no_grad():
            raw = torch.sigmoid(model(_stacked(images, preprocess))).numpy()
        ops = {f: float(m) for f, m in zip(NIH_FINDINGS, np.median(raw, axis=0))}
    ops.update(thresholds or {})
    return save_bundle(path, model, ModelCard(
        kind="classifier", builder="classifier", builder_kwargs=kwargs, labels=list(NIH_FINDINGS),
        preprocess=preprocess.to_dict(), operating_points={"thresholds": ops, "fitted_on": "untrained"},
        name=name or f"untrained {arch}", description=description))


def read_card(path: str | os.PathLike) -> ModelCard:
    """Only the card of a bundle (cheap: no weights read), validated against the card schema."""
    path = Path(path)
    card_path = path / CARD_FILE
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder")
    if not card_path.is_file():
        raise BundleError(f"{path}: not a cxrbench bundle (no {CARD_FILE})")
    try:
        data = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{card_path}: corrupted card ({exc})") from None
    return ModelCard.from_dict(data, where=str(card_path))


def load_bundle(path: str | os.PathLike, *, kind: str | None = None, verify: bool = True) -> Bundle:
    """Load a bundle folder into a model in eval mode.

    Parameters
    ----------
    kind : if given, the bundle must be of this kind (``"classifier"``, ``"ood"``, ``"segmentation"``).
    verify : check the weights' SHA-256 against the card (catches truncated or swapped files); every card
        has one (:meth:`ModelCard.validate`).

    Raises
    ------
    BundleError
        Missing folder/files, corrupted card or weights, checksum mismatch, wrong kind, or weights
        that do not fit the card's architecture (with the first mismatching keys).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    card = read_card(path)
    if kind is not None and card.kind != kind:
        raise BundleError(f"{path}: this is a bundle of kind {card.kind!r}, but a {kind!r} bundle is needed here")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{path}: weights file {WEIGHTS_FILE} is missing")
    if verify and file_sha256(weights) != card.weights_sha256:
        raise BundleError(f"{weights}: checksum does not match the card: the file is corrupted or was replaced")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights}: corrupted weights ({exc})") from None
    model = build_model(card.builder, card.builder_kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes "
                         f"(e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})")
        raise BundleError(f"{weights}: weights do not fit the card's {card.builder}{card.builder_kwargs}: "
                          + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    model.eval()
    n_labels = len(card.labels)
    if card.kind == "classifier" and card.labels and getattr(model, "num_outputs", n_labels) != n_labels:
        raise BundleError(f"{path}: card lists {len(card.labels)} labels for a model with {model.num_outputs} outputs")
    return Bundle(model, card, path)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot write {type(obj).__name__} to a card")
