"""ONNX Runtime backend: the exported graphs as backends of the same :class:`~cxrbench.inference.pipeline.Pipeline`.

The exported graphs (:mod:`cxrbench.export.onnx`) are wrapped in small parameter-free adapters that follow
the protocols of :mod:`cxrbench.inference.backend`, so the pipeline runs them exactly as it runs PyTorch:
the same reading, preprocessing, gate, calibration, targets and :class:`~cxrbench.inference.pipeline.Report`.

- :class:`OnnxClassifier`: ``logits(x)`` from ``classifier.onnx``; ``explain(x, "cam", ...)`` through
  ``cam.onnx`` (:class:`OnnxCAM`). Gradient methods (saliency, Grad-CAM, IG) need the torch backend.
- :class:`OnnxOODModel`: ``score(x)`` (every OOD score and the reconstruction) from ``ood.onnx``; also
  ``latent_mean`` / ``reconstruct`` of :class:`cxrbench.ood.scoring.OODModel`.

>>> pipe = load_pipeline("bundles/classifier", ood="bundles/ood", backend="onnx")   # doctest: +SKIP
>>> pipe.analyze("chest.png", explain="cam").table()                               # doctest: +SKIP

:func:`load_pipeline` accepts bundle folders (exported once to ``$CXRBENCH_CACHE/onnx/<hash>``, parity
checked) or a folder written by ``cxrbench export``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from cxrbench import __version__
from cxrbench._types import to_numpy
from cxrbench.data import default_cache_dir
from cxrbench.explain.base import TargetChooser, Targets, postprocess_maps, resize_maps, target_matrix
from cxrbench.export.onnx import GRAPH_FILES, MANIFEST, export_models, make_session, read_onnx_card
from cxrbench.inference.backend import GateOutput
from cxrbench.inference.pipeline import Pipeline
from cxrbench.models.bundle import Bundle, load_bundle, read_card

__all__ = ["BACKENDS", "ExportedModels", "OnnxCAM", "OnnxClassifier", "OnnxOODModel", "backend_agreement",
           "ensure_export", "latency_table", "load_export", "load_pipeline", "make_session", "pipeline_from_export"]

#: ``--backend`` choices of the CLI: PyTorch, or ONNX Runtime on the exported graphs
BACKENDS = ("torch", "onnx")


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
    input -> logits ``(B, F)``; CAM maps through ``cam.onnx`` when the export has it."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, cam_path: str | os.PathLike | None = None, *,
                 threads: int | None = None) -> None:
        super().__init__(path, threads)
        shape = self.session.get_inputs()[0].shape
        self.in_channels, self.image_size = int(shape[1]), int(shape[-1])
        self.num_outputs = int(self.session.get_outputs()[0].shape[1])
        self.arch = "onnx"
        self.cam_path = Path(cam_path) if cam_path else None
        self.explain_methods: tuple[str, ...] = ("cam",) if self.cam_path else ()
        self.threads = threads
        self._cam: _OrtGraph | None = None

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

    def explain(self, x: torch.Tensor, method: str, targets: Targets = None, **options: Any) -> np.ndarray:
        """CAM maps ``(B, K, S, S)`` (:class:`OnnxCAM` with ``options``); other methods raise ``ValueError``."""
        _check_cam_only(method)
        return OnnxCAM(self, **options)(x, targets)

    def explain_with_logits(self, x: torch.Tensor, method: str, targets: Targets | TargetChooser = None,
                            **options: Any) -> tuple[np.ndarray, np.ndarray]:
        """Logits and CAM maps from one run of ``cam.onnx`` (``targets`` may be a function of the logits)."""
        _check_cam_only(method)
        logits = self.cam(x)["logits"].copy()
        return logits, OnnxCAM(self, **options)(x, targets(logits.copy()) if callable(targets) else targets)


def _check_cam_only(method: str) -> None:
    if method != "cam":
        raise ValueError(f"the ONNX backend explains with 'cam' only (an exported forward graph); {method!r} "
                         "needs gradients: use the torch backend")


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
    cam = path / GRAPH_FILES["cam"]
    model = OnnxClassifier(path / GRAPH_FILES["classifier"], cam if cam.is_file() else None, threads=threads)
    classifier = Bundle(model, card, path)
    ood = None
    if (path / GRAPH_FILES["ood"]).is_file():
        ood_card, _ = read_onnx_card(path / GRAPH_FILES["ood"])
        ood = Bundle(OnnxOODModel(path / GRAPH_FILES["ood"], threads=threads), ood_card, path)
    return ExportedModels(classifier, ood, manifest)


def ensure_export(classifier: str | os.PathLike, ood: str | os.PathLike | None = None, *,
                  cache_dir: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """An export folder for ``classifier`` (+ ``ood``): the folder itself if it is one, else a cached export.

    Bundle folders are exported (with the parity check) once into ``cache_dir`` (default
    ``$CXRBENCH_CACHE/onnx``), keyed by the weights' SHA-256 and the cxrbench version.
    """
    classifier = Path(classifier)
    if (classifier / MANIFEST).is_file():
        if ood is not None:
            raise ValueError(f"{classifier} is already an ONNX export; export the OOD bundle into it instead of "
                             "passing --ood")
        return classifier
    cards = [read_card(classifier)] + ([read_card(ood)] if ood else [])
    identity = json.dumps([__version__] + [c.weights_sha256 or c.created for c in cards])
    key = hashlib.sha256(identity.encode()).hexdigest()[:20]
    if cache_dir is None:
        cache_dir = default_cache_dir() / "onnx"
    out = Path(cache_dir) / key
    if not (out / MANIFEST).is_file():
        if progress:
            print(f"exporting {classifier} to ONNX in {out} (once; parity-checked) ...", flush=True)
        export_models(load_bundle(classifier, kind="classifier"), out,
                      load_bundle(ood, kind="ood") if ood else None, saliency=False)  # the backend uses CAM only
    return out


def pipeline_from_export(path: str | os.PathLike, *, unet: str | os.PathLike | None = None,
                         threads: int | None = None) -> Pipeline:
    """A :class:`~cxrbench.inference.pipeline.Pipeline` on an export folder's graphs (ONNX Runtime, CPU).

    Explanations: ``"cam"`` only (the exported forward graph); other methods raise ``ValueError``. A lung
    U-Net bundle (``unet``) runs in PyTorch.
    """
    models = load_export(path, threads=threads)
    return Pipeline(models.classifier, models.ood, load_bundle(unet, kind="segmentation") if unet else None)


def load_pipeline(classifier: str | os.PathLike, ood: str | os.PathLike | None = None,
                  unet: str | os.PathLike | None = None, *, backend: str = "torch", device: str = "cpu",
                  threads: int | None = None, progress: bool = False) -> Pipeline:
    """The pipeline of bundle folders on ``backend``: ``"torch"`` or ``"onnx"`` (ONNX Runtime).

    For ``"onnx"``, ``classifier`` may also be an export folder; bundle folders are exported once into the cache
    (:func:`ensure_export`, parity-checked); ``device`` must then be ``"cpu"`` and ``threads`` sets ORT's threads.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "torch":
        return Pipeline.from_paths(classifier, ood=ood, unet=unet, device=device)
    if str(device) != "cpu":
        raise ValueError(f"the ONNX Runtime backend runs on the CPU; got device={device!r}")
    return pipeline_from_export(ensure_export(classifier, ood, progress=progress), unet=unet, threads=threads)


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
