"""ONNX export of the Chester models, with a parity check against PyTorch on real images.

``export_models`` writes one folder::

    DIR/
        classifier.onnx   x -> logits, probabilities (sigmoid), calibrated (Chester Eq. 1, operating points baked in)
        cam.onnx          x -> the same three outputs + cam: per-finding CAM at input size (forward only)
        saliency.onnx     x, w -> the same three outputs + saliency: Chester's input-gradient map of sum(w * logits),
                          forward and backward in one graph, batch 1 (:mod:`cxrbench.export.gradient`)
        ood.onnx          x64 -> reconstruction, latent_mean, and the OOD scores l1, l2, ssim (1 - SSIM),
                          ssim_raw, latent
        export.json       what was exported: files, inputs/outputs, labels, preprocessing, thresholds, cutoff, parity
        parity.csv        max/mean |torch - ONNX Runtime| per graph output

Every graph has a dynamic batch axis and carries its bundle's card (``card.json``) in the model's
``metadata_props`` (key ``cxrbench_card``), so an ``.onnx`` file alone says what it is and how to feed it.
Graph inputs are the *model inputs* (after :class:`~cxrbench.preprocess.Preprocess`), exactly what the
PyTorch model takes. The export is written next to ``DIR`` and only moved into place when the parity
check passes: with a maximum absolute logit difference above the tolerance (default 1e-4) it fails
with :class:`ParityError` and nothing is left behind.

``export_gate`` writes the OOD graph alone, ``export_segmenter`` a lung U-Net's ``unet.onnx`` (x -> logits; the
pipeline's lung masks, :func:`cxrbench.export.runtime.load_pipeline`), each with the same parity check.

The forward graphs use the TorchScript-based ``torch.onnx.export(..., dynamo=False)``; the saliency graph is
traced with ``make_fx`` and written by the dynamo exporter (``onnxscript``), see :mod:`cxrbench.export.gradient`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d
from torch import nn

from cxrbench import __version__
from cxrbench.data import load_manifest, shared_data_root
from cxrbench.evaluation.calibration import OperatingPoints, calibrate
from cxrbench.explain import get_explainer
from cxrbench.io import read_image
from cxrbench.models.bundle import Bundle, ModelCard, _json_default, file_sha256
from cxrbench.models.classifier import classifier_layer, feature_maps
from cxrbench.ood.scoring import SSIM_WIN_SIZE, OODModel, as_ood_model, score_batch

__all__ = ["CLASSIFIER_OUTPUTS", "CAM_OUTPUTS", "DEFAULT_OPSET", "OOD_OUTPUTS", "CalibratedClassifier", "OODGraph",
           "ExportResult", "ParityError", "calibration_constants", "card_fingerprint", "default_parity_images",
           "export_gate", "export_models", "export_segmenter", "image_pixels", "make_session", "parity_check",
           "read_onnx_card"]

DEFAULT_OPSET = 17
CLASSIFIER_OUTPUTS = ("logits", "probabilities", "calibrated")
CAM_OUTPUTS = (*CLASSIFIER_OUTPUTS, "cam")
OOD_OUTPUTS = ("reconstruction", "latent_mean", "l1", "l2", "ssim", "ssim_raw", "latent")
GRAPH_FILES = {"classifier": "classifier.onnx", "cam": "cam.onnx", "ood": "ood.onnx", "saliency": "saliency.onnx",
               "unet": "unet.onnx"}
MANIFEST = "export.json"


class ParityError(ValueError):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance; the message gives the worst outputs."""


def calibration_constants(thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Per-finding constants of Chester Eq. 1 for in-graph calibration, each ``(F,)`` float32.

    ``calibrated = clip(where(p <= opt, p * low, 1 - (1 - p) * high), 0, 1) + nan`` with ``low = 1/(2 opt)``
    (0 when opt = 0), ``high = 1/(2 (1 - opt))`` (0 when opt = 1) and ``nan`` NaN where the finding has no
    operating point: the same values as :func:`cxrbench.evaluation.calibration.calibrate`.
    """
    o = np.asarray(thresholds, dtype=np.float64)
    ok = np.isfinite(o)
    safe = np.where(ok, o, 0.5)
    with np.errstate(divide="ignore"):
        low = np.where(ok & (safe > 0), 1.0 / (2.0 * safe), 0.0)
        high = np.where(ok & (safe < 1), 1.0 / (2.0 * (1.0 - safe)), 0.0)
    return {"opt": safe.astype(np.float32), "low": low.astype(np.float32), "high": high.astype(np.float32),
            "nan": np.where(ok, 0.0, np.nan).astype(np.float32)}


class CalibratedClassifier(nn.Module):
    """A cxrbench classifier plus sigmoid and Chester Eq. 1 as graph operations (and optionally CAM).

    ``forward(x)``: x ``(B, C, S, S)`` float32 model input -> logits ``(B, F)``, probabilities ``(B, F)``
    in [0, 1], calibrated ``(B, F)`` in [0, 1] (NaN without an operating point) and, with ``cam=True``,
    cam ``(B, F, S, S)``: ``sum_k w_fk relu(f_k)`` (Chester Eq. 4, no bias, logit units) bilinearly
    upsampled to the input size, as :class:`cxrbench.explain.CAM` computes it before normalisation.
    """

    opt: torch.Tensor  # the buffers of calibration_constants, each (F,)
    low: torch.Tensor
    high: torch.Tensor
    nan: torch.Tensor

    def __init__(self, model: nn.Module, thresholds: np.ndarray, *, cam: bool = False) -> None:
        super().__init__()
        self.model: nn.Module = model
        self.fc: nn.Linear = classifier_layer(model)  # TypeError unless model is a cxrbench classifier
        self.cam = cam
        for name, value in calibration_constants(thresholds).items():
            self.register_buffer(name, torch.from_numpy(value))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits, probabilities and calibrated probabilities (and, with ``cam``, the class activation maps)."""
        if self.cam:
            features = feature_maps(self.model, x)  # (B, K, h, w), rectified as CAM uses them
            logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
        else:
            logits = self.model(x)
        p = torch.sigmoid(logits)
        calibrated = torch.where(p <= self.opt, p * self.low, 1.0 - (1.0 - p) * self.high).clamp(0.0, 1.0) + self.nan
        if not self.cam:
            return logits, p, calibrated
        maps = torch.einsum("fk,bkhw->bfhw", self.fc.weight, features)
        maps = F.interpolate(maps, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return logits, p, calibrated, maps


@runtime_checkable
class _Decodable(OODModel, Protocol):
    """An OOD model with the decoder the graph runs on the latent mean (ALI and autoencoder have one)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, Z) -> (B, 1, S, S) in [0, 1]."""


class OODGraph(nn.Module):
    """An OOD model (ALI or autoencoder) as one graph: reconstruction, latent mean and every score.

    ``forward(x)``: x ``(B, 1, 64, 64)`` float32 in [0, 1] -> reconstruction ``(B, 1, 64, 64)``, latent_mean
    ``(B, Z)``, then ``(B,)`` scores as :func:`cxrbench.ood.scoring.score_batch` defines them: l1, l2 (MSE), ssim
    (1 - SSIM, data_range 1, 11-px window), ssim_raw, latent (||mu||_2).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, _Decodable):
            raise TypeError(f"{type(model).__name__} is not an ALI or autoencoder (it lacks decode)")
        self.model: _Decodable = model
        # the window as a constant (pytorch-msssim builds it from x.shape[1], a dynamic value in the trace)
        self.register_buffer("window", _fspecial_gauss_1d(SSIM_WIN_SIZE, 1.5)[None])  # (1, 1, 1, 11)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reconstruction, latent mean and the scores ``l1, l2, ssim, ssim_raw, latent`` of one batch."""
        z = self.model.latent_mean(x)
        recon = self.model.decode(z)
        diff = (x - recon).flatten(1)
        similarity = ssim(x, recon, data_range=1.0, size_average=False, win=self.window)
        return (recon, z, diff.abs().mean(1), diff.pow(2).mean(1), 1.0 - similarity, similarity,
                torch.linalg.vector_norm(z, dim=1))


# ------------------------------------------------------------------------------------------------
# writing graphs


def _thresholds(card: ModelCard) -> np.ndarray:
    if not card.operating_points:
        return np.full(len(card.labels), np.nan)
    return OperatingPoints.from_dict(card.operating_points).as_array(card.labels)


def _card_json(card: ModelCard) -> str:
    return json.dumps(card.to_dict(), default=_json_default)


def card_fingerprint(card: ModelCard) -> str:
    """SHA-256 of the whole card (weights checksum, preprocessing, operating points, cutoff, ...): what an export of
    the bundle depends on besides the code. Recorded per bundle in ``export.json`` (``card_sha256``)."""
    return hashlib.sha256(json.dumps(card.to_dict(), default=_json_default, sort_keys=True).encode()).hexdigest()


def _export_graph(module: nn.Module, example: torch.Tensor, path: Path, outputs: Sequence[str], *, graph: str,
                  card: ModelCard, opset: int) -> dict[str, Any]:
    """Trace ``module`` on ``example`` into ``path`` (dynamic batch), add metadata, check it."""
    module.eval()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notice, shape checks seen by the tracer
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=list(outputs), do_constant_folding=True,
                          dynamic_axes={name: {0: "batch"} for name in ("x", *outputs)})
    return finish_graph(path, ["batch", *example.shape[1:]], outputs, graph=graph, card=card)


def finish_graph(path: Path, input_shape: Sequence[Any], outputs: Sequence[str], *, graph: str,
                 card: ModelCard) -> dict[str, Any]:
    """Add the card and graph kind to the ``metadata_props`` of the ONNX file at ``path`` and check it.

    Returns the graph's entry of ``export.json``."""
    import onnx

    proto = onnx.load(str(path))
    meta = {"cxrbench_card": _card_json(card), "cxrbench_graph": graph, "cxrbench_version": __version__,
            "cxrbench_outputs": json.dumps(list(outputs))}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.doc_string = "cxrbench", f"cxrbench {graph} graph of {card.name or card.builder}"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return {"file": path.name, "input": {"name": "x", "shape": list(input_shape)},
            "outputs": list(outputs), "sha256": file_sha256(path),
            "bytes": path.stat().st_size}


def read_onnx_card(path: str | os.PathLike) -> tuple[ModelCard, str]:
    """The bundle card and graph kind (``"classifier"``, ``"cam"``, ``"ood"``) stored in an exported ``.onnx``."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "cxrbench_card" not in meta:
        raise ValueError(f"{path}: not a cxrbench export (no 'cxrbench_card' in the model's metadata_props)")
    return ModelCard.from_dict(json.loads(meta["cxrbench_card"])), meta.get("cxrbench_graph", "")


# ------------------------------------------------------------------------------------------------
# parity


def make_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session for ``path`` (``threads``: intra-op threads, None for ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Threads spin between the operators of a run (without it, each of the ~2,600 operators of DenseNet-121's
    # saliency graph waits for a woken thread: 136 -> 125 ms a run, 2 threads) and stop when the run returns, so
    # that idle ORT threads do not spin and slow PyTorch in the same process (2 shared cores: the torch step
    # after a run took 128 ms with spinning left on, 74 ms with it off or stopped)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def default_parity_images(n: int = 8) -> tuple[list[Any], str]:
    """``n`` real NIH images from the shared data (paths), else synthetic phantoms (arrays); and which."""
    root = shared_data_root()
    if root is not None and (root / "cxr" / "nih" / "manifest.csv").is_file():
        paths = load_manifest(root / "cxr" / "nih", on_missing="drop")["path"].tolist()
        return [str(p) for p in paths[:n]], f"NIH ChestX-ray14 ({root / 'cxr' / 'nih'})"
    from cxrbench.data.synthetic import make_phantom  # only without real data: keeps scipy's filters off the import

    return [make_phantom(256, seed=i).image for i in range(n)], "synthetic phantoms (no real data found)"


def image_pixels(source: Any) -> np.ndarray:
    """``(H, W)`` float [0, 1] pixels of a path / bytes (:func:`cxrbench.io.read_image`) or of an array as is."""
    return np.asarray(source, dtype=np.float32) if isinstance(source, np.ndarray) else read_image(source).pixels


def _compare(graph: str, output: str, ref: np.ndarray, got: np.ndarray, tolerance: float, scaled: bool) -> dict:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise ParityError(f"{graph}/{output}: ONNX Runtime gave shape {got.shape}, PyTorch {ref.shape}")
    same_nan = np.array_equal(np.isnan(ref), np.isnan(got))
    ok = ~np.isnan(ref) & ~np.isnan(got)
    diff = np.abs(ref[ok] - got[ok]) if ok.any() else np.zeros(1)
    tol = tolerance * max(1.0, float(np.abs(ref[ok]).max())) if scaled and ok.any() else tolerance
    return {"graph": graph, "output": output, "n_images": int(ref.shape[0]), "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()), "tolerance": tol, "outside_tolerance": float(np.mean(diff > tol)),
            "passed": bool(same_nan and diff.max() <= tol)}


def parity_check(export_dir: str | os.PathLike, classifier: Bundle, ood: Bundle | None = None,
                 images: Sequence[Any] | None = None, *, tolerance: float = 1e-4, threads: int | None = None
                 ) -> pd.DataFrame:
    """Run PyTorch and ONNX Runtime on the same images (one batch) and compare every graph output.

    Parameters
    ----------
    images : paths / bytes / ``(H, W)`` [0, 1] arrays; default :func:`default_parity_images`.
    tolerance : largest allowed absolute difference: as is for logits (the gate of the issue); for the
        other outputs scaled by ``max(1, max |reference|)`` (CAM values are sums over 512-1024 channels).

    Returns one row per graph output: ``graph, output, n_images, max_abs_diff, mean_abs_diff, tolerance,
    passed``. Calibrated outputs are compared with :func:`~cxrbench.evaluation.calibration.calibrate` applied to
    PyTorch's probabilities; NaN positions (no operating point) must match.
    """
    if images is None:
        images = default_parity_images()[0]
    if not len(images):
        raise ValueError("parity_check needs at least one image")
    export_dir = Path(export_dir)
    pixels = [image_pixels(s) for s in images]
    pp = classifier.preprocess
    x = torch.from_numpy(np.stack([pp(p) for p in pixels]))
    model = classifier.model.eval()
    with torch.no_grad():
        logits = model(x).numpy()
    probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    ref = {"logits": logits, "probabilities": probabilities,
           "calibrated": calibrate(probabilities, _thresholds(classifier.card)),
           "cam": get_explainer("cam", model)(x)}
    rows = []
    if (export_dir / GRAPH_FILES["saliency"]).is_file():
        from cxrbench.export.gradient import saliency_parity

        session = make_session(export_dir / GRAPH_FILES["saliency"], threads)
        rows += saliency_parity(session, model, x, tolerance=tolerance)
    for graph in ("classifier", "cam"):
        outputs = make_session(export_dir / GRAPH_FILES[graph], threads).run(None, {"x": x.numpy()})
        for name, value in zip(CAM_OUTPUTS, outputs):
            rows.append(_compare(graph, name, ref[name], value, tolerance, scaled=name != "logits"))
    if ood is not None:
        rows += _gate_parity_rows(export_dir, ood, pixels, tolerance, threads)
    return pd.DataFrame(rows)


def _gate_parity_rows(export_dir: Path, ood: Bundle, pixels: Sequence[np.ndarray], tolerance: float,
                      threads: int | None) -> list[dict]:
    """Parity rows of ``ood.onnx`` against the torch OOD model on ``pixels`` (``(H, W)`` [0, 1] each)."""
    opp = ood.preprocess
    x64 = torch.from_numpy(np.stack([opp(p) for p in pixels]))
    ood_model = as_ood_model(ood.model.eval())
    with torch.no_grad():
        oref = score_batch(ood_model, x64)
        oref["reconstruction"] = ood_model.reconstruct(x64).numpy()
        oref["latent_mean"] = ood_model.latent_mean(x64).numpy()
    outputs = make_session(export_dir / GRAPH_FILES["ood"], threads).run(None, {"x": x64.numpy()})
    return [_compare("ood", name, oref[name], value, tolerance, scaled=True)
            for name, value in zip(OOD_OUTPUTS, outputs)]


# ------------------------------------------------------------------------------------------------
# the whole export


@dataclass
class ExportResult:
    """Where the export went, what is in it (``manifest``, also ``export.json``) and its parity table."""

    path: Path
    manifest: dict[str, Any]
    parity: pd.DataFrame

    @property
    def max_logit_diff(self) -> float:
        """The largest absolute logit difference between PyTorch and ONNX Runtime over the parity images."""
        rows = self.parity[self.parity["output"] == "logits"]
        return float(rows["max_abs_diff"].max())


def _atomic_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _saliency_graph(classifier: Bundle, path: Path, *, opset: int) -> dict[str, Any]:
    """Write ``saliency.onnx`` (:mod:`cxrbench.export.gradient`); its manifest entry."""
    from cxrbench.export.gradient import SALIENCY_OUTPUTS, gradient_program, write_saliency_onnx

    pp, n = classifier.preprocess, len(classifier.labels)
    net = CalibratedClassifier(classifier.model.eval(), _thresholds(classifier.card))
    write_saliency_onnx(gradient_program(net, pp.channels, pp.size, n), pp.channels, pp.size, n, path, opset=opset)
    entry = finish_graph(path, [1, pp.channels, pp.size, pp.size], SALIENCY_OUTPUTS, graph="saliency",
                         card=classifier.card)
    entry["weights"] = {"name": "w", "shape": [1, n],
                        "meaning": "logit weights: all ones = summed saliency, one-hot = one finding"}
    return entry


def _write_graphs(classifier: Bundle, ood: Bundle | None, tmp: Path, *, opset: int, saliency: bool | str,
                  failed: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every graph of an export into ``tmp``; their manifest entries by graph kind. With ``saliency="optional"``
    a failing gradient export is recorded in ``failed`` (graph -> reason) instead of raised."""
    pp = classifier.preprocess
    example = torch.randn(2, pp.channels, pp.size, pp.size)
    graphs = {}
    for graph, cam in (("classifier", False), ("cam", True)):
        module = CalibratedClassifier(classifier.model.eval(), _thresholds(classifier.card), cam=cam)
        outputs = CAM_OUTPUTS if cam else CLASSIFIER_OUTPUTS
        graphs[graph] = _export_graph(module, example, tmp / GRAPH_FILES[graph], outputs, graph=graph,
                                      card=classifier.card, opset=opset)
    if saliency:
        try:
            graphs["saliency"] = _saliency_graph(classifier, tmp / GRAPH_FILES["saliency"], opset=opset)
        except Exception as exc:  # an operator without a decomposition, an exporter failure: torch explains instead
            if saliency != "optional":
                raise
            failed["saliency"] = failure_reason(exc)
            (tmp / GRAPH_FILES["saliency"]).unlink(missing_ok=True)
    if ood is not None:
        example64 = torch.rand(2, 1, ood.preprocess.size, ood.preprocess.size)
        graphs["ood"] = _export_graph(OODGraph(ood.model.eval()), example64, tmp / GRAPH_FILES["ood"], OOD_OUTPUTS,
                                      graph="ood", card=ood.card, opset=opset)
    return graphs


def _move_into_place(tmp: Path, out: Path, *, replace: bool) -> None:
    """Rename the finished export ``tmp`` to ``out`` (one atomic rename; readers never see a half-written folder).

    ``replace``: an existing ``out`` is deleted first. Without it (the cache of
    :mod:`cxrbench.export.runtime`, whose writers hold a lock) an ``out`` that another writer completed in the
    meantime is kept and ``tmp`` is discarded by the caller.
    """
    if out.exists():
        if not replace and (out / MANIFEST).is_file():
            return
        shutil.rmtree(out)
    try:
        os.replace(tmp, out)
    except OSError:  # another writer renamed its folder to out between the check and the rename
        if replace or not (out / MANIFEST).is_file():
            raise


def failure_reason(exc: BaseException) -> str:
    """``"Type: first line of the message"``: why an export failed, for a manifest or a warning."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _check_parity(parity: pd.DataFrame, what: str, n_images: int) -> None:
    failed = parity[~parity["passed"]]
    if len(failed):
        worst = "; ".join(f"{r.graph}/{r.output}: max |diff| {r.max_abs_diff:.3g} > {r.tolerance:.3g} "
                          f"on {r.outside_tolerance:.2%} of the values" for r in failed.itertuples())
        raise ParityError(f"ONNX export of {what} fails the parity check on {n_images} images: {worst}")


def _drop_failed_saliency(parity: pd.DataFrame, tmp: Path, what: str, n_images: int, graphs: dict[str, Any],
                          failed: dict[str, str]) -> pd.DataFrame:
    """``saliency="optional"``: a saliency graph that fails its parity rows is removed from ``tmp`` and
    ``graphs`` and its reason recorded in ``failed``; the rows stay in the table (they show the failure)."""
    rows = parity["graph"] == "saliency"
    try:
        _check_parity(parity[rows], what, n_images)
    except ParityError as exc:
        failed["saliency"] = failure_reason(exc)
        graphs.pop("saliency", None)
        (tmp / GRAPH_FILES["saliency"]).unlink(missing_ok=True)
    return parity[~rows]


def _check_opset(opset: int) -> None:
    if opset < 17:
        raise ValueError(f"opset must be 17 or newer, got {opset}")


def _export_target(out: str | os.PathLike, images: Sequence[Any] | None) -> tuple[Path, Sequence[Any], str]:
    """``(out, parity images, where they came from)``; refuses a non-empty folder that is not an export."""
    image_source = "given images"
    if images is None:
        images, image_source = default_parity_images()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(f"{out} exists and is not a cxrbench ONNX export; choose an empty or new folder")
    return out, images, image_source


def _finish_export(tmp: Path, out: Path, manifest: dict[str, Any], parity: pd.DataFrame, *, replace: bool) -> None:
    """Write ``export.json`` and ``parity.csv`` into ``tmp``, then move it into place as ``out``."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default) + "\n")
    parity.to_csv(tmp / "parity.csv", index=False)
    _move_into_place(tmp, out, replace=replace)


def export_models(classifier: Bundle, out: str | os.PathLike, ood: Bundle | None = None, *,
                  images: Sequence[Any] | None = None, tolerance: float = 1e-4, opset: int = DEFAULT_OPSET,
                  threads: int | None = None, replace: bool = True, saliency: bool | str = True) -> ExportResult:
    """Export a classifier bundle (and an OOD bundle) to ONNX in ``out`` and check parity.

    Parameters
    ----------
    classifier, ood : loaded bundles (:func:`cxrbench.models.bundle.load_bundle`).
    images : parity images (paths or ``(H, W)`` arrays in [0, 1]); default :func:`default_parity_images`.
    tolerance : see :func:`parity_check`; the export fails above it.
    opset : ONNX opset (17 or newer).
    threads : ONNX Runtime intra-op threads for the check (None: its default).
    replace : False keeps an ``out`` that another writer completed while this export ran (see
        :func:`_move_into_place`); the result then describes this export, which was discarded.
    saliency : also write ``saliency.onnx`` (forward + input gradient; its maps are held to ``tolerance``
        relative to their maximum). ``"optional"`` (the cache of :mod:`cxrbench.export.cache`): when the gradient
        export or its parity check fails, the export goes on without it and ``export.json``'s ``failed_graphs``
        says why.

    Raises :class:`ParityError` (and writes nothing) when ONNX Runtime disagrees with PyTorch.
    """
    if classifier.card.kind != "classifier":
        raise ValueError(f"{classifier.path}: expected a classifier bundle, got a {classifier.card.kind} bundle")
    if ood is not None and ood.card.kind != "ood":
        raise ValueError(f"{ood.path}: expected an OOD bundle, got a {ood.card.kind} bundle")
    _check_opset(opset)
    out, images, image_source = _export_target(out, images)
    tmp = _atomic_dir(out)
    try:
        pp, thresholds = classifier.preprocess, _thresholds(classifier.card)
        failed: dict[str, str] = {}
        graphs = _write_graphs(classifier, ood, tmp, opset=opset, saliency=saliency, failed=failed)
        parity = parity_check(tmp, classifier, ood, images, tolerance=tolerance, threads=threads)
        checked = parity if saliency != "optional" else _drop_failed_saliency(
            parity, tmp, str(classifier.path), len(images), graphs, failed)
        _check_parity(checked, str(classifier.path), len(images))
        import onnxruntime

        mean, std = pp.stats()
        manifest = {
            "format": 1, "cxrbench": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "opset": opset, "graphs": graphs, "classifier_bundle": str(classifier.path),
            "weights_sha256": {"classifier": classifier.card.weights_sha256,
                               **({"ood": ood.card.weights_sha256} if ood is not None else {})},
            "card_sha256": {"classifier": card_fingerprint(classifier.card),
                            **({"ood": card_fingerprint(ood.card)} if ood is not None else {})},
            "labels": classifier.labels,
            "preprocess": pp.to_dict(), "normalize_mean": mean.tolist(), "normalize_std": std.tolist(),
            "thresholds": [None if not np.isfinite(t) else float(t) for t in thresholds],
            "ood_bundle": str(ood.path) if ood is not None else None,
            "ood_preprocess": ood.preprocess.to_dict() if ood is not None else None,
            "ood_cutoff": ood.card.ood.get("cutoff") if ood is not None else None,
            "parity": {"images": len(images), "source": image_source, "tolerance": tolerance,
                       "rows": parity.to_dict(orient="records")},
            **({"failed_graphs": failed} if failed else {}),
        }
        _finish_export(tmp, out, manifest, parity, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, manifest, parity)


def export_gate(ood: Bundle, out: str | os.PathLike, *, images: Sequence[Any] | None = None,
                tolerance: float = 1e-4, opset: int = DEFAULT_OPSET, threads: int | None = None,
                replace: bool = True) -> ExportResult:
    """Export an OOD bundle alone (``ood.onnx``, ``export.json`` with ``"kind": "gate"``, ``parity.csv``) to ``out``.

    The gate's half of :func:`export_models`, with the same parity check (:class:`ParityError`, nothing written)
    and the same atomic rename; used by :func:`cxrbench.export.runtime.load_gate` for ``ood-score`` and the gate of
    a pipeline whose classifier runs in PyTorch.
    """
    if ood.card.kind != "ood":
        raise ValueError(f"{ood.path}: expected an OOD bundle, got a {ood.card.kind} bundle")
    opp = ood.preprocess
    return _export_one(ood, out, "gate", "ood", OODGraph(ood.model.eval()), OOD_OUTPUTS, _gate_parity_rows,
                       {"ood_bundle": str(ood.path), "ood_preprocess": opp.to_dict(),
                        "ood_cutoff": ood.card.ood.get("cutoff")},
                       images=images, tolerance=tolerance, opset=opset, threads=threads, replace=replace)


def _export_one(bundle: Bundle, out: str | os.PathLike, kind: str, graph_name: str, module: nn.Module,
                outputs: Sequence[str], parity_rows: Callable[..., list[dict]], described: dict[str, Any], *,
                images: Sequence[Any] | None, tolerance: float, opset: int, threads: int | None,
                replace: bool) -> ExportResult:
    """An export of one bundle's one graph (``kind`` in ``export.json``; the role of its card is
    ``graph_name``): traced, parity-checked with ``parity_rows(tmp, bundle, pixels, tolerance, threads)`` and
    moved into place atomically; ``described`` goes into the manifest."""
    _check_opset(opset)
    out, images, image_source = _export_target(out, images)
    tmp = _atomic_dir(out)
    try:
        pp = bundle.preprocess
        graph = _export_graph(module, torch.rand(2, pp.channels, pp.size, pp.size), tmp / GRAPH_FILES[graph_name],
                              outputs, graph=graph_name, card=bundle.card, opset=opset)
        parity = pd.DataFrame(parity_rows(tmp, bundle, [image_pixels(s) for s in images], tolerance, threads))
        _check_parity(parity, str(bundle.path), len(images))
        import onnxruntime

        manifest = {
            "format": 1, "kind": kind, "cxrbench": __version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": opset, "graphs": {graph_name: graph},
            "weights_sha256": {graph_name: bundle.card.weights_sha256},
            "card_sha256": {graph_name: card_fingerprint(bundle.card)}, **described,
            "parity": {"images": len(images), "source": image_source, "tolerance": tolerance,
                       "rows": parity.to_dict(orient="records")},
        }
        _finish_export(tmp, out, manifest, parity, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, manifest, parity)


def _segmenter_parity_rows(export_dir: Path, unet: Bundle, pixels: Sequence[np.ndarray], tolerance: float,
                           threads: int | None) -> list[dict]:
    """Parity of ``unet.onnx``'s logits against the torch U-Net on ``pixels`` (tolerance scaled by the largest
    logit, as for the other outputs: a mask pixel can then differ only where its logit is that close to 0)."""
    x = torch.from_numpy(np.stack([unet.preprocess(p) for p in pixels]))
    with torch.no_grad():
        ref = unet.model.eval()(x).numpy()
    got = make_session(export_dir / GRAPH_FILES["unet"], threads).run(None, {"x": x.numpy()})[0]
    return [_compare("unet", "logits", ref, got, tolerance, scaled=True)]


def export_segmenter(unet: Bundle, out: str | os.PathLike, *, images: Sequence[Any] | None = None,
                     tolerance: float = 1e-4, opset: int = DEFAULT_OPSET, threads: int | None = None,
                     replace: bool = True) -> ExportResult:
    """Export a lung U-Net bundle (``unet.onnx``: model input ``(B, 1, S, S)`` -> logits ``(B, 1, S, S)``;
    ``export.json`` with ``"kind": "segmentation"``; ``parity.csv``) to ``out``.

    The same parity check (on ``images``, default :func:`default_parity_images`; :class:`ParityError`, nothing
    written) and atomic rename as :func:`export_gate`; :func:`cxrbench.export.runtime.load_pipeline` segments
    with it (a report's U-Net on ONNX Runtime: 8.8 -> 5.2 ms at 128 px on 2 threads, measured).
    """
    if unet.card.kind != "segmentation":
        raise ValueError(f"{unet.path}: expected a segmentation bundle, got a {unet.card.kind} bundle")
    return _export_one(unet, out, "segmentation", "unet", unet.model.eval(), ("logits",), _segmenter_parity_rows,
                       {"unet_bundle": str(unet.path), "unet_preprocess": unet.preprocess.to_dict()},
                       images=images, tolerance=tolerance, opset=opset, threads=threads, replace=replace)
