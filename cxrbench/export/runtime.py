"""ONNX Runtime backend: the exported graphs as backends of the same :class:`~cxrbench.inference.pipeline.Pipeline`.

The exported graphs (:mod:`cxrbench.export.onnx`) are wrapped in small parameter-free adapters that follow
the protocols of :mod:`cxrbench.inference.backend`, so the pipeline runs them exactly as it runs PyTorch:
the same reading, preprocessing, gate, calibration, targets and :class:`~cxrbench.inference.pipeline.Report`.

- :class:`OnnxClassifier`: ``logits(x)`` from ``classifier.onnx``; ``explain(x, "cam", ...)`` through
  ``cam.onnx`` (:class:`OnnxCAM`); ``explain(x, "saliency", ...)`` through ``saliency.onnx`` where the export
  has it (:class:`OnnxSaliency`: forward and input gradient in one graph). The other gradient methods
  (Grad-CAM, IG, ...) need the torch backend.
- :class:`OnnxOODModel`: ``score(x)`` (every OOD score and the reconstruction) from ``ood.onnx``; also
  ``latent_mean`` / ``reconstruct`` of :class:`cxrbench.ood.scoring.OODModel`.
- :class:`OnnxSegmenter`: a lung U-Net's logits from ``unet.onnx`` (the pipeline's ``segmenter``).

>>> pipe = load_pipeline("bundles/classifier", ood="bundles/ood", backend="onnx")   # doctest: +SKIP
>>> pipe.analyze("chest.png", explain="cam").table()                               # doctest: +SKIP

:func:`load_pipeline` accepts bundle folders (exported once to ``$CXRBENCH_CACHE/onnx/<hash>``, parity
checked, :mod:`cxrbench.export.cache`) or a folder written by ``cxrbench export``. ``backend="auto"`` (the CLI's
default) runs on ONNX Runtime what has a graph -- the classifier without an explanation, with CAM or with Chester's
saliency (``saliency.onnx``), the gate and the lung U-Net always -- and on PyTorch the other gradient methods, or a
model whose export fails (one warning naming the bundle and the reason);
:func:`load_gate` does the same for ``ood-score``, :func:`backend_note` says what ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, cast

import numpy as np
import torch
from torch import nn

from cxrbench._threads import interactive_threads
from cxrbench._types import to_numpy
from cxrbench.explain.base import TargetChooser, Targets, postprocess_maps, resize_maps, target_matrix
from cxrbench.explain.saliency import ChesterSaliency
from cxrbench.export.cache import cached_export, cached_segmenter_export
from cxrbench.export.onnx import GRAPH_FILES, MANIFEST, failure_reason, make_session, read_onnx_card
from cxrbench.inference.backend import GateOutput
from cxrbench.inference.pipeline import Pipeline
from cxrbench.models.bundle import Bundle, BundleError, load_bundle, read_card

__all__ = ["BACKENDS", "BACKEND_NAMES", "GRADIENT_FREE_METHODS", "ONNX_METHODS", "SALIENCY_METHODS",
           "BackendFallbackWarning", "ExportedModels", "OnnxCAM", "OnnxClassifier", "OnnxOODModel", "OnnxSaliency",
           "OnnxSaliencyGraph", "OnnxSegmenter", "backend_agreement", "backend_note", "ensure_export", "latency_table",
           "load_export", "load_gate", "load_gate_export", "load_pipeline", "load_segmenter", "load_segmenter_export",
           "make_session", "model_backend", "pipeline_from_export"]

#: ``--backend`` choices of the CLI: ONNX Runtime where no gradients are needed (``auto``), PyTorch, or ONNX Runtime
BACKENDS = ("auto", "torch", "onnx")


#: the explainers :class:`OnnxSaliency` computes from ``saliency.onnx``
SALIENCY_METHODS = ("saliency", "saliency_per_finding")


class _OrtGraph(nn.Module):
    """Base adapter: one ONNX Runtime session, outputs by name, the last result cached."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = make_session(self.path, threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._last: tuple[bytes, dict[str, np.ndarray]] | None = None

    def outputs(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Every graph output for the batch ``x`` (float32 numpy arrays, by output name)."""
        arr = to_numpy(x, name="batch")
        key = hashlib.blake2b(repr(arr.shape).encode() + arr.tobytes(), digest_size=16).digest()
        if self._last is None or self._last[0] != key:
            self._last = (key, dict(zip(self.output_names, self.session.run(None, {"x": arr}))))
        return self._last[1]


class OnnxClassifier(_OrtGraph):
    """``classifier.onnx`` as a :class:`~cxrbench.inference.backend.ClassifierBackend`: ``(B, C, S, S)`` model
    input -> logits ``(B, F)``; CAM maps through ``cam.onnx`` and Chester's saliency through ``saliency.onnx``
    when the export has them (``explain_methods`` says which)."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, cam_path: str | os.PathLike | None = None, *,
                 saliency_path: str | os.PathLike | None = None, threads: int | None = None) -> None:
        super().__init__(path, threads)
        shape = self.session.get_inputs()[0].shape
        self.in_channels, self.image_size = int(shape[1]), int(shape[-1])
        self.num_outputs = int(self.session.get_outputs()[0].shape[1])
        self.arch = "onnx"
        self.cam_path = Path(cam_path) if cam_path else None
        self.saliency_path = Path(saliency_path) if saliency_path else None
        self.explain_methods: tuple[str, ...] = (("cam",) if self.cam_path else ()) + (
            SALIENCY_METHODS if self.saliency_path else ())
        self.threads = threads
        self._cam: _OrtGraph | None = None
        self._saliency: OnnxSaliencyGraph | None = None
        self.explainers: dict[tuple[tuple[str, Any], ...], OnnxSaliency] = {}

    def logits(self, x: torch.Tensor) -> np.ndarray:
        """``(B, F)`` float32 logits from ``classifier.onnx``."""
        return self.outputs(x)["logits"].copy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits as a tensor on ``x``'s device (the ``nn.Module`` interface)."""
        return torch.from_numpy(self.logits(x)).to(x.device)

    def cam(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """``cam.onnx`` outputs: logits, probabilities, calibrated ``(B, F)`` and cam ``(B, F, S, S)``."""
        if self.cam_path is None:
            raise ValueError(f"{self.path.parent}: no CAM graph ({GRAPH_FILES['cam']}) in this export")
        if self._cam is None:
            self._cam = _OrtGraph(self.cam_path, self.threads)
        return self._cam.outputs(x)

    def saliency(self, method: str = "saliency", **options: Any) -> OnnxSaliency:
        """The (cached) :class:`OnnxSaliency` explainer of ``method`` (``"saliency"``: the chosen findings summed
        in one map; ``"saliency_per_finding"``: one map each) with post-processing ``options`` (``normalize``,
        ``sigma``, ``relu``); ``ValueError`` when the export has no ``saliency.onnx``."""
        if self.saliency_path is None:
            raise ValueError(f"{self.path.parent}: no saliency graph ({GRAPH_FILES['saliency']}) in this export")
        if self._saliency is None:
            self._saliency = OnnxSaliencyGraph(self.saliency_path, threads=self.threads)
        key = (("method", method), *sorted(options.items()))
        if key not in self.explainers:
            self.explainers[key] = OnnxSaliency(self._saliency, per_finding=method == "saliency_per_finding",
                                                **options)
        return self.explainers[key]

    def explain(self, x: torch.Tensor, method: str, targets: Targets = None, **options: Any) -> np.ndarray:
        """CAM (:class:`OnnxCAM`) or saliency (:class:`OnnxSaliency`) maps ``(B, K, S, S)`` with ``options``;
        other methods raise ``ValueError``."""
        self._check_method(method)
        if method in SALIENCY_METHODS:
            return self.saliency(method, **options)(x, targets)
        return OnnxCAM(self, **options)(x, targets)

    def explain_with_logits(self, x: torch.Tensor, method: str, targets: Targets | TargetChooser = None,
                            **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """Logits and maps from one run of ``cam.onnx`` or ``saliency.onnx`` per image (``targets`` may be a
        function of the logits)."""
        self._check_method(method)
        if method in SALIENCY_METHODS:
            return self.saliency(method, **options).explain_with_logits(x, targets)
        logits = self.cam(x)["logits"].copy()
        return logits, OnnxCAM(self, **options)(x, targets(logits.copy()) if callable(targets) else targets)

    def _check_method(self, method: str) -> None:
        if method not in self.explain_methods:
            graphs = " and ".join(repr(m) for m in self.explain_methods) or "nothing"
            raise ValueError(f"{self.path.parent}: the ONNX backend explains with {graphs} here (the exported "
                             f"graphs); {method!r} needs gradients without a graph: use the torch backend")


class OnnxSaliencyGraph(_OrtGraph):
    """``saliency.onnx`` (:mod:`cxrbench.export.gradient`): one image ``(1, C, S, S)`` and logit weights ``(1, F)``
    -> its logits and ``max(0, sum_c d(sum_i w_i logit_i) / dx_c)`` ``(1, 1, S, S)`` from one run."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__(path, threads)
        x, w = self.session.get_inputs()
        self.input_shape = tuple(int(d) for d in x.shape)
        self.num_outputs = int(w.shape[1])

    def gradient(self, x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``((1, F) logits, (1, 1, S, S) saliency)`` of one image ``x`` for the logit ``weights`` ``(F,)``."""
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"{self.path}: the saliency graph takes one image of shape {self.input_shape}, "
                             f"got {tuple(x.shape)}")
        logits, saliency = self.session.run(["logits", "saliency"], {
            "x": np.ascontiguousarray(x, dtype=np.float32), "w": weights.reshape(1, -1).astype(np.float32)})
        return logits, saliency

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a batch, one image per run (the ``nn.Module`` interface)."""
        ones = np.ones(self.num_outputs, np.float32)
        arr = to_numpy(x, name="batch")
        return torch.from_numpy(np.concatenate([self.gradient(arr[b:b + 1], ones)[0] for b in range(len(arr))]))


class OnnxSaliency(ChesterSaliency):
    """:class:`cxrbench.explain.ChesterSaliency` with the forward and input gradient from ``saliency.onnx``.

    Targets, ``per_finding``, the non-finite guard and the post-processing (resize, ReLU, smoothing, min-max) are
    :class:`~cxrbench.explain.base.Explainer`'s, so maps equal the torch explainer's up to the rounding of another
    kernel (:func:`cxrbench.export.gradient.saliency_parity`). The graph has a batch of 1: each image runs once
    with the weights of its chosen logits (``w_i`` = how often output i is chosen; one run per finding with
    ``per_finding``). When the targets are a function of the logits (:data:`~cxrbench.explain.base.TargetChooser`,
    the pipeline's one-pass report) the image first runs with the weights the previous call chose (all ones at
    first), and runs again only when the chooser picks other ones: logits and map then come from one run.
    """

    needs_gradients: ClassVar[bool] = False  # ONNX Runtime computes them: fine inside torch.inference_mode()

    def __init__(self, graph: OnnxSaliencyGraph, **kwargs: Any) -> None:
        super().__init__(graph, **kwargs)
        self.graph = graph
        self._guess = np.ones(graph.num_outputs, np.float32)

    def _compute(self, x: torch.Tensor, targets: Targets | TargetChooser) -> torch.Tensor:
        arr = to_numpy(x, name="batch")
        n = self.graph.num_outputs
        runs: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * len(arr)
        chosen = callable(targets)
        if chosen:
            for b in range(len(arr)):
                runs[b] = (self._guess, *self.graph.gradient(arr[b:b + 1], self._guess))
            index = self._target_index(torch.from_numpy(np.concatenate([r[1] for r in runs if r])), targets)
        else:
            index = target_matrix(cast(Targets, targets), len(arr), n)
        rows = index.numpy()
        if self.per_finding:
            weights = [[np.eye(n, dtype=np.float32)[i] for i in row] for row in rows]
        else:
            weights = [[np.bincount(row, minlength=n).astype(np.float32)] for row in rows]
        if chosen:  # the next report's guess (explaining other findings of a report does not change it)
            self._guess = weights[0][0]
        maps, logits = [], []
        for b, image_weights in enumerate(weights):
            run = runs[b]
            image_maps: list[np.ndarray] = []
            for w in image_weights:
                if run is None or not np.array_equal(run[0], w):
                    run = (w, *self.graph.gradient(arr[b:b + 1], w))
                if not image_maps:
                    logits.append(run[1][0])
                image_maps.append(run[2][0, 0])
            maps.append(np.stack(image_maps))
        if self._logits is None:
            self._logits = np.stack(logits).astype(np.float32)
        return torch.from_numpy(np.stack(maps))


class OnnxSegmenter(_OrtGraph):
    """``unet.onnx`` as the segmenter of a :class:`~cxrbench.inference.pipeline.Pipeline`: model input
    ``(B, 1, S, S)`` -> logits ``(B, 1, S, S)`` (the ``nn.Module`` interface that
    :func:`cxrbench.models.unet.predict_lung_mask` calls)."""

    name = "onnxruntime"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits as a tensor on ``x``'s device."""
        arr = np.ascontiguousarray(to_numpy(x, name="batch"), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"x": arr})[0]).to(x.device)


class OnnxOODModel(_OrtGraph):
    """``ood.onnx`` as a :class:`~cxrbench.inference.backend.GateBackend` (and a
    :class:`cxrbench.ood.scoring.OODModel`): ``(B, 1, 64, 64)`` in [0, 1] in."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        super().__init__(path, threads)
        self.image_size = int(self.session.get_inputs()[0].shape[-1])
        self.latent_dim = int(self.session.get_outputs()[1].shape[1])

    def latent_mean(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Z)`` latent mean."""
        return torch.from_numpy(self.outputs(x)["latent_mean"].copy()).to(x.device)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 64, 64)`` reconstruction in [0, 1]."""
        return torch.from_numpy(self.outputs(x)["reconstruction"].copy()).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction (the ``nn.Module`` interface)."""
        return self.reconstruct(x)

    def score(self, x: torch.Tensor) -> GateOutput:
        """The in-graph scores ``l1, l2, ssim, ssim_raw, latent``, each ``(B,)`` float64 (as ``score_batch``),
        and the reconstruction, from one run of the graph."""
        out = self.outputs(x)
        return GateOutput({k: out[k].astype(np.float64) for k in ("l1", "l2", "ssim", "ssim_raw", "latent")},
                          out["reconstruction"].copy())


class OnnxCAM:
    """CAM through ``cam.onnx``: call as ``cam(x, targets)`` -> ``(B, F, S, S)`` float32, like any explainer.

    Post-processing (targets, non-finite values, ReLU, smoothing, min-max) is
    :mod:`cxrbench.explain.base`'s, so maps equal :class:`cxrbench.explain.CAM`'s up to float rounding.
    """

    name = "cam"

    def __init__(self, classifier: OnnxClassifier, *, normalize: str | None = None, sigma: float | None = None,
                 relu: bool = False) -> None:
        self.classifier, self.normalize, self.sigma, self.relu = classifier, normalize, sigma, relu

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> np.ndarray:
        """``(B, F, H, W)`` CAM maps of ``targets`` from ``cam.onnx``, post-processed like the torch CAM."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"x must be a (B, C, H, W) torch.Tensor, got {getattr(x, 'shape', type(x).__name__)}")
        maps = self.classifier.cam(x)["cam"]
        index = target_matrix(targets, maps.shape[0], maps.shape[1]).numpy()
        maps = np.take_along_axis(maps, index[:, :, None, None], axis=1)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        maps = np.nan_to_num(resize_maps(maps, size), nan=0.0, posinf=0.0, neginf=0.0)
        return postprocess_maps(maps, relu=self.relu, sigma=self.sigma, normalize=self.normalize)  # type: ignore[arg-type]


@dataclass
class ExportedModels:
    """An export folder loaded as bundles whose models are the ONNX Runtime adapters."""

    classifier: Bundle
    ood: Bundle | None
    manifest: dict[str, Any]


def load_export(path: str | os.PathLike, *, threads: int | None = None) -> ExportedModels:
    """Load a folder written by :func:`cxrbench.export.onnx.export_models` (cards read from the graphs' metadata)."""
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / GRAPH_FILES["classifier"]).is_file():
        raise ValueError(f"{path}: not a cxrbench ONNX export (no {MANIFEST} / {GRAPH_FILES['classifier']}); "
                         "run 'cxrbench export' first")
    manifest = json.loads((path / MANIFEST).read_text())
    card, _ = read_onnx_card(path / GRAPH_FILES["classifier"])
    cam, saliency = path / GRAPH_FILES["cam"], path / GRAPH_FILES["saliency"]
    model = OnnxClassifier(path / GRAPH_FILES["classifier"], cam if cam.is_file() else None,
                           saliency_path=saliency if saliency.is_file() else None, threads=threads)
    classifier = Bundle(model, card, path)
    ood = None
    if (path / GRAPH_FILES["ood"]).is_file():
        ood_card, _ = read_onnx_card(path / GRAPH_FILES["ood"])
        ood = Bundle(OnnxOODModel(path / GRAPH_FILES["ood"], threads=threads), ood_card, path)
    return ExportedModels(classifier, ood, manifest)


def ensure_export(classifier: str | os.PathLike, ood: str | os.PathLike | None = None, *,
                  cache_dir: str | os.PathLike | None = None, progress: bool = False, saliency: bool = False
                  ) -> Path:
    """An export folder for ``classifier`` (+ ``ood``): the folder itself if it is one, else a cached export.

    Bundle folders are exported (with the parity check) once into ``cache_dir`` (default
    ``$CXRBENCH_CACHE/onnx``), keyed by the weights' SHA-256 and the cxrbench version; an entry that is
    incomplete or does not match its checksums is exported again (:func:`cxrbench.export.cache.cached_export`).
    With ``progress`` the export is announced on stderr; with ``saliency`` the entry must hold ``saliency.onnx``
    (a failure of the gradient export raises).
    """
    classifier = Path(classifier)
    if (classifier / MANIFEST).is_file():
        if ood is not None:
            raise ValueError(f"{classifier} is already an ONNX export; export the OOD bundle into it instead of "
                             "passing --ood")
        return classifier
    path = cached_export(classifier, ood, cache_dir=cache_dir, announce=_to_stderr if progress else None,
                         saliency=saliency)
    failed = json.loads((path / MANIFEST).read_text()).get("failed_graphs") or {}
    if saliency and "saliency" in failed:
        raise ValueError(f"{classifier}: the saliency graph did not export ({failed['saliency']}); use "
                         "--backend auto or torch for saliency")
    return path


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pipeline_from_export(path: str | os.PathLike, *, unet: str | os.PathLike | None = None,
                         threads: int | None = None) -> Pipeline:
    """A :class:`~cxrbench.inference.pipeline.Pipeline` on an export folder's graphs (ONNX Runtime, CPU).

    Explanations: ``"cam"`` and, where the export has ``saliency.onnx``, ``"saliency"``; other methods raise
    ``ValueError``. A lung U-Net bundle (``unet``) runs in PyTorch.
    """
    models = load_export(path, threads=threads)
    return Pipeline(models.classifier, models.ood, load_bundle(unet, kind="segmentation") if unet else None)


def load_gate_export(path: str | os.PathLike, *, threads: int | None = None, bundle: str | os.PathLike | None = None
                     ) -> Bundle:
    """The OOD bundle of an export folder (``ood.onnx``: a gate-only or a full export) on ONNX Runtime;
    ``bundle`` is the path its messages name (default the export folder)."""
    return _exported_bundle(path, "ood", "OOD", OnnxOODModel, threads, bundle)


def load_segmenter_export(path: str | os.PathLike, *, threads: int | None = None,
                          bundle: str | os.PathLike | None = None) -> Bundle:
    """The lung U-Net bundle of an export folder (``unet.onnx``) on ONNX Runtime; ``bundle`` is the path its
    messages name (default the export folder)."""
    return _exported_bundle(path, "unet", "U-Net", OnnxSegmenter, threads, bundle)


def _exported_bundle(path: str | os.PathLike, graph_name: str, what: str, adapter: Callable[..., _OrtGraph],
                     threads: int | None, bundle: str | os.PathLike | None) -> Bundle:
    path = Path(path)
    graph = path / GRAPH_FILES[graph_name]
    if not graph.is_file():
        raise ValueError(f"{path}: no {what} graph ({GRAPH_FILES[graph_name]}) in this export")
    card, _ = read_onnx_card(graph)
    return Bundle(adapter(graph, threads=threads), card, Path(bundle) if bundle else path)


#: the explanation methods the ONNX Runtime classifier computes without gradients (None: no explanation)
GRADIENT_FREE_METHODS: tuple[str | None, ...] = (None, "cam")
#: ... and with them, where the export has the gradient graph (``saliency.onnx``)
ONNX_METHODS: tuple[str | None, ...] = (*GRADIENT_FREE_METHODS, *SALIENCY_METHODS)
#: the names of :attr:`ClassifierBackend.name <cxrbench.inference.backend.ClassifierBackend.name>` in output text
BACKEND_NAMES = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime"}


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` runs a model in PyTorch because its ONNX export or ONNX Runtime failed (the reason)."""


def _warn_fallback(message: str) -> None:
    warnings.warn(message, BackendFallbackWarning, stacklevel=4)


def _ort_threads(threads: int | None) -> int | None:
    """ORT's intra-op threads: ``threads``, else the interactive choice of :mod:`cxrbench._threads` (None: ORT's)."""
    return threads if threads else (interactive_threads() or None)


def _check_kind(path: str | os.PathLike, kind: str) -> None:
    """The errors ``load_bundle(path, kind=kind)`` gives for a missing, broken or wrong-kind bundle, from the card
    alone (cheap), so that they are errors and not reasons to fall back to PyTorch."""
    card = read_card(path)
    if card.kind != kind:
        raise BundleError(f"{path}: this is a bundle of kind {card.kind!r}, but a {kind!r} bundle is needed here")


def _try_onnx(bundle: str | os.PathLike, load: Callable[[], Bundle], warn: Callable[[str], None]) -> Bundle | None:
    """``load()``, or None after one warning naming ``bundle`` and the reason when it fails (a broken bundle,
    :class:`~cxrbench.models.bundle.BundleError`, is raised: PyTorch would fail on it too)."""
    try:
        return load()
    except BundleError:
        raise
    except Exception as exc:  # ParityError, an unsupported model, a broken onnxruntime: torch is the reference
        reason = failure_reason(exc)
        warn(f"{bundle}: ONNX Runtime is not used ({reason}); running it in PyTorch instead")
        return None


def _onnxruntime_missing(bundles: Sequence[str | os.PathLike | None], warn: Callable[[str], None]) -> bool:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is not None:
        return False
    warn(f"{' and '.join(str(b) for b in bundles if b)}: onnxruntime is not installed; running PyTorch instead")
    return True


def _auto_pipeline(classifier: str | os.PathLike, ood: str | os.PathLike | None, unet: str | os.PathLike | None,
                   *, explain: str | None, threads: int | None, progress: bool,
                   warn: Callable[[str], None]) -> Pipeline:
    """ONNX Runtime for what has a graph (the classifier when ``explain`` is None, CAM or saliency; the gate; the
    lung U-Net), PyTorch for the rest and for anything whose export or session fails (one ``warn`` per bundle)."""
    announce = _to_stderr if progress else None
    threads = _ort_threads(threads)
    _check_kind(classifier, "classifier")
    if ood is not None:
        _check_kind(ood, "ood")
    if unet is not None:
        _check_kind(unet, "segmentation")
    no_ort = _onnxruntime_missing([classifier, ood, unet], warn)
    clf: Bundle | None = None
    if explain not in ONNX_METHODS:
        reason = f"{explain} needs gradients"
    elif no_ort:
        reason = "onnxruntime is not installed"
    else:
        saliency = explain in SALIENCY_METHODS
        clf = _try_onnx(classifier, lambda: replace(load_export(
            cached_export(classifier, announce=announce, saliency=saliency), threads=threads).classifier,
            path=Path(classifier)), warn)
        reason = "" if clf is not None else "its ONNX export failed"
        if clf is not None and explain is not None and explain not in clf.model.explain_methods:  # type: ignore[operator]
            why = _missing_graph_reason(clf, explain)
            warn(f"{classifier}: ONNX Runtime is not used for {explain} ({why}); running it in PyTorch instead")
            clf, reason = None, f"its {explain} graph did not export"
    gate: Bundle | None = None
    if ood is not None and not no_ort:
        gate = _try_onnx(ood, lambda: load_gate_export(cached_export(None, ood, announce=announce), threads=threads,
                                                       bundle=ood), warn)
    segmenter = None if unet is None else load_segmenter(unet, backend="torch" if no_ort else "auto",
                                                         threads=threads, progress=progress, warn=warn)
    on_ort = segmenter is not None and model_backend(segmenter.model) == "onnxruntime"
    pipe = Pipeline(clf or load_bundle(classifier, kind="classifier"),
                    gate or (load_bundle(ood, kind="ood") if ood is not None else None),
                    # the torch bundle (its preprocessing, its card) also when ORT segments; a fallback's is it
                    load_bundle(unet, kind="segmentation") if on_ort and unet is not None else segmenter)
    if on_ort:
        pipe.segmenter = cast(Bundle, segmenter).model
    pipe.backend_reason = reason
    return pipe


def _missing_graph_reason(classifier: Bundle, method: str | None) -> str:
    """Why an export folder has no graph for ``method``: the failure its manifest recorded, else "not exported"."""
    path = Path(str(getattr(classifier.model, "path", classifier.path))).parent
    try:
        failed = json.loads((path / MANIFEST).read_text()).get("failed_graphs") or {}
    except (OSError, ValueError):
        failed = {}
    return str(failed.get(method) or f"{path} has no {method} graph")


def load_pipeline(classifier: str | os.PathLike, ood: str | os.PathLike | None = None,
                  unet: str | os.PathLike | None = None, *, backend: str = "torch", device: str = "cpu",
                  threads: int | None = None, progress: bool = False, explain: str | None = "saliency",
                  warn: Callable[[str], None] | None = None) -> Pipeline:
    """The pipeline of bundle folders on ``backend``: ``"torch"``, ``"onnx"`` (ONNX Runtime) or ``"auto"``.

    - ``"onnx"``: ``classifier`` may also be an export folder; bundle folders are exported once into the cache
      (:func:`ensure_export`, parity-checked, with the saliency graph when ``explain`` is ``"saliency"``; a lung
      U-Net ``unet`` as ``unet.onnx``, :func:`~cxrbench.export.cache.cached_segmenter_export`); export failures
      raise. ``device`` must be ``"cpu"``.
    - ``"auto"``: ONNX Runtime where there is a graph -- the classifier when ``explain`` (the method the caller
      will ask :meth:`~cxrbench.inference.pipeline.Pipeline.analyze` for) is None, ``"cam"`` or ``"saliency"``
      (``saliency.onnx``: forward and input gradient in one graph), the OOD gate and the lung U-Net always --
      PyTorch otherwise, and PyTorch for a model whose export, parity check or session fails, after one
      ``warn`` (default: a :class:`BackendFallbackWarning`) naming the bundle and the reason; a saliency graph
      that failed to export or its parity check leaves the forward graphs in the cache and the classifier in
      PyTorch (one ``warn`` with the recorded reason). On a ``device`` other than the CPU everything runs in
      PyTorch.
      ``pipeline.backend_reason`` says why the classifier runs in PyTorch (``""`` when it does not);
      :func:`backend_note` puts it into words.

    ``threads``: ONNX Runtime's intra-op threads; default the interactive choice of :mod:`cxrbench._threads` (the
    free cores, ``$CXRBENCH_THREADS``). ``progress`` announces a first-use export on stderr.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto" and (Path(classifier) / MANIFEST).is_file():
        backend = "onnx"  # an export folder: only ONNX Runtime runs it
    if backend == "torch" or (backend == "auto" and str(device) != "cpu"):
        pipe = Pipeline.from_paths(classifier, ood=ood, unet=unet, device=device)
        pipe.backend_reason = f"device {device}" if backend == "auto" else ""
        return pipe
    if backend == "auto":
        return _auto_pipeline(classifier, ood, unet, explain=explain, threads=threads, progress=progress,
                              warn=warn or _warn_fallback)
    if str(device) != "cpu":
        raise ValueError(f"the ONNX Runtime backend runs on the CPU; got device={device!r}")
    pipe = pipeline_from_export(ensure_export(classifier, ood, progress=progress,
                                              saliency=explain in SALIENCY_METHODS),
                                unet=unet, threads=_ort_threads(threads))
    if unet is not None:
        pipe.segmenter = load_segmenter(unet, backend="onnx", threads=threads, progress=progress).model
    return pipe


def load_gate(ood: str | os.PathLike, *, backend: str = "torch", threads: int | None = None, progress: bool = False,
              warn: Callable[[str], None] | None = None) -> Bundle:
    """An OOD bundle (for :func:`cxrbench.ood.scoring.score_files`) on ``backend``: ``"torch"``, ``"onnx"`` (exported
    alone into the cache, parity-checked; failures raise) or ``"auto"`` (ONNX Runtime, else PyTorch after one
    ``warn``). An export folder holding ``ood.onnx`` runs on ONNX Runtime. :func:`model_backend` names the result's."""
    return _load_one(ood, "ood", load_gate_export, lambda path, announce: cached_export(None, path, announce=announce),
                     backend=backend, threads=threads, progress=progress, warn=warn)


def load_segmenter(unet: str | os.PathLike, *, backend: str = "torch", threads: int | None = None,
                   progress: bool = False, warn: Callable[[str], None] | None = None) -> Bundle:
    """A lung U-Net bundle (``cxrbench segment``, a pipeline's ``segmenter``) on ``backend``, as :func:`load_gate`
    loads a gate: ``"onnx"`` exports ``unet.onnx`` into the cache (parity-checked,
    :func:`~cxrbench.export.cache.cached_segmenter_export`; failures raise), ``"auto"`` falls back to PyTorch
    after one ``warn``; an export folder holding ``unet.onnx`` runs on ONNX Runtime."""
    return _load_one(unet, "segmentation", load_segmenter_export,
                     lambda path, announce: cached_segmenter_export(path, announce=announce),
                     backend=backend, threads=threads, progress=progress, warn=warn)


def _load_one(path: str | os.PathLike, kind: str, from_export: Callable[..., Bundle],
              cached: Callable[[str | os.PathLike, Callable[[str], None] | None], Path], *, backend: str,
              threads: int | None, progress: bool, warn: Callable[[str], None] | None) -> Bundle:
    """One bundle of ``kind`` on ``backend`` (see :func:`load_gate`): ``from_export(folder, threads=, bundle=)``
    loads its graph from an export folder, ``cached(path, announce)`` exports it into the cache."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if (Path(path) / MANIFEST).is_file() and backend != "torch":
        return from_export(path, threads=_ort_threads(threads))
    if backend == "torch":
        return load_bundle(path, kind=kind)
    _check_kind(path, kind)
    announce = _to_stderr if progress else None

    def onnx_model() -> Bundle:
        return from_export(cached(path, announce), threads=_ort_threads(threads), bundle=path)

    if backend == "onnx":
        return onnx_model()
    warn = warn or _warn_fallback
    model = None if _onnxruntime_missing([path], warn) else _try_onnx(path, onnx_model, warn)
    return model or load_bundle(path, kind=kind)


def model_backend(model: object) -> str:
    """``"onnxruntime"`` for the ONNX Runtime adapters, else ``"torch"`` (a bundle's ``model``)."""
    return "onnxruntime" if isinstance(model, _OrtGraph) else "torch"


def backend_note(pipeline: Pipeline) -> str:
    """What produced a pipeline's results, for a summary line: ``" (ONNX Runtime)"``, ``" (PyTorch)"``,
    ``" (PyTorch: gradcam needs gradients; gate on ONNX Runtime; lung U-Net on ONNX Runtime)"``."""
    names = pipeline.backends()
    classifier = str(names["classifier"])
    text = BACKEND_NAMES.get(classifier, classifier)
    if pipeline.backend_reason:
        text += f": {pipeline.backend_reason}"
    gate = names.get("gate")
    if gate and gate != classifier:
        text += f"; gate on {BACKEND_NAMES.get(gate, gate)}"
    segmenter = names.get("segmenter")
    if segmenter and segmenter != classifier:
        text += f"; lung U-Net on {BACKEND_NAMES.get(segmenter, segmenter)}"
    return f" ({text})"


# ------------------------------------------------------------------------------------------------
# comparisons (notebook 07, benchmarks/bench_onnx.py)


def backend_agreement(torch_pipeline: Pipeline, onnx_pipeline: Pipeline, sources: Sequence[Any], *,
                      explain: str | None = "cam"):
    """Per image, how far the ONNX Runtime report is from the torch one (gate overridden).

    Returns a DataFrame: ``source``, ``raw_max_abs_diff``, ``calibrated_max_abs_diff``, ``ood_score_abs_diff``
    (NaN without a gate), ``map_max_abs_diff`` (min-max normalised maps; NaN without ``explain``).
    """
    import pandas as pd

    rows = []
    for src in sources:
        a = torch_pipeline.analyze(src, explain=explain, allow_ood=True)
        b = onnx_pipeline.analyze(src, explain=explain, allow_ood=True)
        assert a.raw is not None and b.raw is not None and a.calibrated is not None and b.calibrated is not None
        rows.append({"source": Path(a.source).name,
                     "raw_max_abs_diff": float(np.max(np.abs(a.raw - b.raw))),
                     "calibrated_max_abs_diff": float(np.nanmax(np.abs(a.calibrated - b.calibrated))),
                     "ood_score_abs_diff": abs(a.ood.score - b.ood.score) if a.ood and b.ood else np.nan,
                     "map_max_abs_diff": float(np.abs(a.maps - b.maps).max())
                     if a.maps is not None and b.maps is not None else np.nan})
    return pd.DataFrame(rows)


def latency_table(classifier: Bundle, export_dir: str | os.PathLike, *, batches: Sequence[int] = (1, 16),
                  repeat: int = 3, threads: int | None = None):
    """PyTorch vs ONNX Runtime forward time of the classifier (``classifier.onnx``) on random inputs.

    Returns a DataFrame per batch size: median seconds over ``repeat`` runs (after one warm-up run) for
    each backend, ms per image and the speed-up. ``threads`` sets ONNX Runtime's threads (torch keeps its own).
    """
    import time

    import pandas as pd

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    pp = classifier.preprocess
    model = classifier.model.eval()
    session = make_session(Path(export_dir) / GRAPH_FILES["classifier"], threads)
    rows = []
    for batch in batches:
        x = torch.randn(batch, pp.channels, pp.size, pp.size)
        with torch.no_grad():
            t_torch = median_time(lambda: model(x))
        feed = {"x": x.numpy()}
        t_ort = median_time(lambda: session.run(None, feed))
        rows.append({"batch": batch, "image_size": pp.size, "torch_s": t_torch, "onnxruntime_s": t_ort,
                     "torch_ms_per_image": 1e3 * t_torch / batch, "ort_ms_per_image": 1e3 * t_ort / batch,
                     "speedup": t_torch / t_ort, "torch_threads": torch.get_num_threads()})
    return pd.DataFrame(rows)
