"""Published pretrained classifiers as cxrbench bundles: torchxrayvision's DenseNet-121 / ResNet-50 sets, CheXNet.

:func:`import_xrv` and :func:`import_chexnet` (``cxrbench import xrv NAME`` / ``cxrbench import chexnet FILE``)
convert the weights into a cxrbench classifier with the 14 NIH outputs (:data:`cxrbench.labels.NIH_FINDINGS`)
and write a bundle whose card records

* the source, licence and citation (``card.source``);
* the model's own preprocessing: for torchxrayvision 1 channel, [-1024, 1024], centre crop of the long side
  (``XRayCenterCrop``) and ``XRayResizer`` (scikit-image) to 224 px, 512 px for the ResNet-50;
* its labels mapped onto the NIH names by exact name; torchxrayvision outputs outside the 14 (Lung Lesion,
  Fracture, Lung Opacity, Enlarged Cardiomediastinum) are dropped and listed in ``source["dropped_outputs"]``;
* the NIH findings the weights never trained (an empty torchxrayvision label, for which xrv returns a constant
  0.5) in ``card.untrained``: their head rows are zero and every face masks them ("not trained by this model");
* torchxrayvision's published operating points (``op_threshs``) as the calibration, NaN ones as null.

Files are read with ``torch.load(weights_only=True)`` only. torchxrayvision's DenseNet release files are pickled
whole models, so ``--weights FILE`` refuses them (:class:`~cxrbench.models.weights.PickledCheckpointError`,
with how to save a state dict); ``allow_download=True`` lets torchxrayvision itself download and load them
(it unpickles its own release files). The ResNet-50 release file is a plain state dict and loads directly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrbench.labels import NIH_FINDINGS
from cxrbench.models.bundle import build_model, file_sha256, save_bundle
from cxrbench.models.card import ModelCard
from cxrbench.models.weights import (
    WeightsUnavailableError,
    _load_checked,
    _read_state_dict,
    _rename_old_dense_keys,
    load_chexnet_checkpoint,
)
from cxrbench.preprocess import Preprocess

__all__ = ["CHEXNET_SOURCE", "XRV_CITATION", "XRV_LICENCE", "XRV_WEIGHTS", "chexnet_card", "convert_xrv_state_dict",
           "import_chexnet", "import_xrv", "xrv_model_state", "xrv_preprocess", "xrv_spec"]

#: the torchxrayvision weight sets ``cxrbench import xrv`` converts: name -> (cxrbench arch, input size)
XRV_WEIGHTS: dict[str, tuple[str, int]] = {
    **{f"densenet121-res224-{k}": ("densenet121", 224) for k in ("all", "nih", "pc", "chex", "rsna", "mimic_nb",
                                                                 "mimic_ch")},
    "resnet50-res512-all": ("resnet50", 512),
}
XRV_LICENCE = ("torchxrayvision code and models: Apache-2.0; the weights were trained on datasets with their own "
               "terms of use (e.g. CheXpert, MIMIC-CXR, PadChest: research use); check them before any other use")
XRV_CITATION = ("Cohen JP et al. TorchXRayVision: A library of chest X-ray datasets and models. MIDL 2022 "
                "(arXiv:2111.00595); https://github.com/mlmed/torchxrayvision")
CHEXNET_SOURCE: dict[str, str] = {
    "origin": "CheXNet reimplementation (arnoweng/CheXNet-style state dict)",
    "licence": "not stated in the checkpoint: check the terms of whoever published the file",
    "citation": ("Rajpurkar P et al. CheXNet: Radiologist-level pneumonia detection on chest X-rays with deep "
                 "learning. arXiv:1711.05225 (2017); reimplementation: https://github.com/arnoweng/CheXNet"),
    "preprocessing": ("3 channels, ImageNet normalisation, 224 px; the original test used Resize(256) + TenCrop(224),"
                      " cxrbench uses one centre crop resized to 224 px"),
}
_XRV_PREPROCESSING = ("1 channel; xrv.utils.normalize to [-1024, 1024]; XRayCenterCrop (centre square of the long "
                      "side); XRayResizer({size}) (skimage.transform.resize, bilinear, anti-aliased)")


def _xrv() -> Any:
    try:
        import torchxrayvision as xrv
    except ImportError as err:
        raise ImportError("importing torchxrayvision weights needs the package 'torchxrayvision' "
                          "(pip install torchxrayvision); it is not installed in this environment") from err
    return xrv


def xrv_spec(name: str) -> dict[str, Any]:
    """What torchxrayvision publishes about weight set ``name``: ``arch``, ``size``, ``labels`` (18, ``""`` where
    untrained), ``op_threshs`` (18 floats, NaN where none), ``url``, ``description``. ``ValueError`` for other names."""
    if name not in XRV_WEIGHTS:
        raise ValueError(f"unknown torchxrayvision weights {name!r}; expected one of {', '.join(XRV_WEIGHTS)}")
    entry = _xrv().models.model_urls[name]
    arch, size = XRV_WEIGHTS[name]
    return {"arch": arch, "size": size, "labels": list(entry["labels"]),
            "op_threshs": [float(v) for v in entry.get("op_threshs", [math.nan] * len(entry["labels"]))],
            "url": entry["weights_url"], "description": entry.get("description", "")}


def xrv_preprocess(size: int) -> Preprocess:
    """Torchxrayvision's preprocessing at ``size`` px as a cxrbench :class:`~cxrbench.preprocess.Preprocess`."""
    return Preprocess(size=size, crop="center", resample="skimage", normalize="xrv", channels=1)


def xrv_model_state(xrv_model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a torchxrayvision ``DenseNet`` or ``ResNet`` in the keys of its network
    (a ResNet's ``model.`` prefix removed; the ``op_threshs`` buffer left out)."""
    state = {k.removeprefix("model."): v for k, v in xrv_model.state_dict().items()}
    return {k: v for k, v in state.items() if k != "op_threshs"}


def convert_xrv_state_dict(state: dict[str, torch.Tensor], name: str, *, labels: list[str] | None = None,
                           op_threshs: list[float] | None = None, source: str = "") -> tuple[nn.Module, ModelCard]:
    """A cxrbench classifier (14 NIH outputs, eval mode) and its card from a torchxrayvision state dict.

    ``labels``/``op_threshs`` default to what torchxrayvision publishes for ``name`` (:func:`xrv_spec`); a test
    passes its own for a seeded model. The head's row for NIH finding ``f`` is xrv's row labelled ``f``; a finding
    without one (untrained) gets a zero row and is listed in ``card.untrained``.
    """
    spec = xrv_spec(name)
    labels = spec["labels"] if labels is None else list(labels)
    op_threshs = spec["op_threshs"] if op_threshs is None else [float(v) for v in op_threshs]
    head_w, head_b = ("classifier.weight", "classifier.bias") if spec["arch"] == "densenet121" else \
        ("fc.weight", "fc.bias")
    state = {k.removeprefix("model."): v for k, v in state.items() if k != "op_threshs"}
    state = _rename_old_dense_keys(state)
    if head_w not in state or state[head_w].shape[0] != len(labels):
        got = tuple(state[head_w].shape) if head_w in state else "no such key"
        raise ValueError(f"{source or name}: expected a {spec['arch']} state dict with a {len(labels)}-output "
                         f"head {head_w!r} (torchxrayvision {name}); got {got}")
    model = build_model("classifier", {"arch": spec["arch"], "num_outputs": len(NIH_FINDINGS), "in_channels": 1})
    where = {f: labels.index(f) for f in NIH_FINDINGS if f in labels}
    rows = torch.zeros(len(NIH_FINDINGS), state[head_w].shape[1], dtype=state[head_w].dtype)
    bias = torch.zeros(len(NIH_FINDINGS), dtype=state[head_b].dtype)
    for i, f in enumerate(NIH_FINDINGS):
        if f in where:
            rows[i], bias[i] = state[head_w][where[f]], state[head_b][where[f]]
    state = {**state, head_w: rows, head_b: bias}
    _load_checked(model, state, source=source or f"torchxrayvision {name}")
    card = _xrv_card(name, spec, labels, op_threshs, where, source)
    return model.eval(), card


def _xrv_card(name: str, spec: dict[str, Any], labels: list[str], op_threshs: list[float], where: dict[str, int],
              source: str) -> ModelCard:
    thresholds = {f: (None if f not in where or not math.isfinite(op_threshs[where[f]])
                      or not 0 < op_threshs[where[f]] < 1 else op_threshs[where[f]]) for f in NIH_FINDINGS}
    dropped = [lab for lab in labels if lab and lab not in NIH_FINDINGS]
    untrained = [f for f in NIH_FINDINGS if f not in where]
    return ModelCard(
        kind="classifier", builder="classifier",
        builder_kwargs={"arch": spec["arch"], "num_outputs": len(NIH_FINDINGS), "in_channels": 1},
        labels=list(NIH_FINDINGS), preprocess=xrv_preprocess(spec["size"]).to_dict(),
        operating_points={"method": "published (torchxrayvision op_threshs)", "fitted_on": "publisher's",
                          "thresholds": thresholds},
        untrained=untrained,
        source={"origin": "torchxrayvision", "weights": name, "url": spec["url"], "licence": XRV_LICENCE,
                "citation": XRV_CITATION, "description": spec["description"],
                "preprocessing": _XRV_PREPROCESSING.format(size=spec["size"]),
                "label_mapping": {f: where.get(f) for f in NIH_FINDINGS}, "dropped_outputs": dropped,
                "imported_from": source},
        name=f"torchxrayvision {name}",
        description=(f"torchxrayvision {name} weights imported by cxrbench; "
                     f"{len(untrained)} of the 14 findings not trained by this model"))


def _load_xrv_state(name: str, weights: str | os.PathLike[str] | None, allow_download: bool
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, where it came from) for ``import_xrv``."""
    if weights is not None:
        path = Path(weights)
        try:
            state = _read_state_dict(path)
        except ValueError as exc:
            if name.startswith("densenet") and "pickled" in str(exc):
                raise type(exc)(f"{exc} torchxrayvision's DenseNet release files are such pickles: where "
                                "torchxrayvision is installed and you trust the file, run `python -c \"import "
                                f"torch, torchxrayvision; torch.save(torch.load('{path}', weights_only=False)"
                                f".state_dict(), '{name}-state.pt')\"` and pass --weights {name}-state.pt, or "
                                "let torchxrayvision download and load it with --allow-download") from None
            raise
        return state, f"{path} (sha256 {file_sha256(path)[:16]}…)"
    if not allow_download:
        spec = xrv_spec(name)
        raise WeightsUnavailableError(
            f"no weights for torchxrayvision {name}: pass --weights FILE (a state dict of these weights) or "
            f"--allow-download to let torchxrayvision fetch {spec['url']}")
    xrv = _xrv()
    model = xrv.models.DenseNet(weights=name) if name.startswith("densenet") else xrv.models.ResNet(weights=name)
    return xrv_model_state(model), f"downloaded by torchxrayvision {xrv.__version__} ({model.weights_filename_local})"


def import_xrv(name: str, out: str | os.PathLike[str], *, weights: str | os.PathLike[str] | None = None,
               allow_download: bool = False) -> Path:
    """Write torchxrayvision weight set ``name`` as a cxrbench bundle at ``out`` (see the module doc).

    ``weights``: a state dict file (DenseNet or ResNet keys, ``model.`` prefix and ``op_threshs`` allowed);
    without it torchxrayvision downloads the release file only when ``allow_download`` (else
    :class:`~cxrbench.models.weights.WeightsUnavailableError`).
    """
    state, where = _load_xrv_state(name, weights, allow_download)
    model, card = convert_xrv_state_dict(state, name, source=where)
    return save_bundle(out, model, card)


def chexnet_card() -> ModelCard:
    """The card of an imported CheXNet: DenseNet-121, 3 channels, ImageNet normalisation, 224 px, the 14 NIH
    findings in Wang et al.'s order, no operating points (run ``cxrbench calibrate`` on a validation split)."""
    return ModelCard(
        kind="classifier", builder="classifier",
        builder_kwargs={"arch": "densenet121", "num_outputs": len(NIH_FINDINGS), "in_channels": 3},
        labels=list(NIH_FINDINGS), preprocess=Preprocess(size=224, normalize="imagenet", channels=3).to_dict(),
        source=dict(CHEXNET_SOURCE), name="CheXNet (imported)",
        description="CheXNet-style DenseNet-121 weights imported by cxrbench; no operating points until calibrated")


def import_chexnet(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write a CheXNet checkpoint (``module.densenet121.`` keys, pre-0.4 ``norm.1`` names, a ``state_dict`` entry
    or a bare state dict; :func:`~cxrbench.models.weights.load_chexnet_checkpoint`) as a bundle at ``out``."""
    path = Path(checkpoint)
    card = chexnet_card()
    model = build_model(card.builder, card.builder_kwargs)
    load_chexnet_checkpoint(model, path)
    card.source["imported_from"] = f"{path} (sha256 {file_sha256(path)[:16]}…)"
    return save_bundle(out, model.eval(), card)
