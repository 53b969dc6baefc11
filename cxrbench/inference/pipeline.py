"""The Chester chain for one image or a batch: OOD gate -> calibrated probabilities -> explanation.

>>> pipe = Pipeline.from_paths("bundles/classifier", ood="bundles/ood")     # doctest: +SKIP
>>> report = pipe.analyze("chest.png", explain="saliency")                   # doctest: +SKIP
>>> report.table()                                                            # doctest: +SKIP
>>> pipe.explain(report, "gradcam", "Effusion")   # only the explanation again  # doctest: +SKIP
>>> pipe.predict(["a.png", "b.dcm"])              # batched, the predict CSV    # doctest: +SKIP

The gate has two parts: the blank-image guard (:mod:`cxrbench.ood.guard`; always, also without an OOD
bundle) rejects an image that is "too small" or has "almost no image content" before any score is read;
then the OOD bundle's reconstruction score must not exceed its cutoff ("reconstruction error"). An image
the gate rejects gets no probabilities unless the caller overrides the gate (``allow_ood=True``), which a
"too small" image cannot be; ``report.ood.check`` / ``report.ood.reason`` say why, with the measured numbers
and cutoffs, and a scored image's report carries the reconstruction and its error map. Everything runs
locally, on the CPU by default; nothing is written to disk.

The models run behind the backends of :mod:`cxrbench.inference.backend` (PyTorch here; ONNX Runtime
through :func:`cxrbench.export.runtime.load_pipeline`), so every face -- ``cxrbench predict`` /
``analyze`` / ``explain``, the dashboard, the notebooks -- runs the same steps: :meth:`Pipeline.read`,
the gate, :meth:`Pipeline.model_inputs`, the backend's logits, calibration, :meth:`Pipeline.explain`
(targets from :mod:`cxrbench.explain.targets`) and :func:`cxrbench.models.unet.predict_lung_mask`.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from cxrbench._types import check_unit_range
from cxrbench.evaluation.calibration import OperatingPoints, calibrate
from cxrbench.explain import COUNTERFACTUAL_EXPLAINERS
from cxrbench.explain.latent_shift import NO_AUTOENCODER, Counterfactual, LatentShift, NoAutoencoderError, check_scales
from cxrbench.explain.targets import (
    DEFAULT_TOP,
    ExplanationTargets,
    explanation_targets,
    finding_indices,
    finding_ranking,
)
from cxrbench.inference.backend import (
    ClassifierBackend,
    GateBackend,
    OnePassBackend,
    classifier_backend,
    gate_backend,
)
from cxrbench.inference.predict import (
    Predictions,
    operating_points_of,
    predict_dataset,
    predict_files,
    predictions_table,
)
from cxrbench.io import Image, ImageMeta, ImageReadError, ImageSource, read_image
from cxrbench.models.bundle import Bundle, load_bundle
from cxrbench.models.unet import predict_lung_mask
from cxrbench.ood.guard import GuardVerdict, ImageGuard
from cxrbench.preprocess import GeometrySource

__all__ = ["UNTRAINED_NOTE", "OODResult", "Pipeline", "Report", "RejectedImageError"]


class RejectedImageError(RuntimeError):
    """Raised by :meth:`Report.require_in_distribution` for an image the OOD gate rejected."""


@dataclass
class OODResult:
    """The gate's verdict on one image: the blank-image guard first, then the OOD model's score.

    ``guard``: the :class:`~cxrbench.ood.guard.GuardVerdict` (size, then information); an image it rejects is
    not scored (``score`` NaN, no reconstruction). ``scores``: every scorer (``l1``, ``l2``, ``ssim`` = 1 - SSIM,
    ``ssim_raw``, ``latent``); ``score`` the bundle's scorer; ``cutoff`` its threshold (higher = more OOD);
    images at 64 px in [0, 1]: ``input``, ``reconstruction``, ``error`` (per-pixel |x - D(E(x))|). Without an
    OOD bundle only the guard runs (``scorer`` ``""``, ``score`` NaN).
    """

    scorer: str = ""
    score: float = float("nan")
    cutoff: float = float("nan")
    cutoff_method: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    input: np.ndarray | None = None
    reconstruction: np.ndarray | None = None
    error: np.ndarray | None = None
    guard: GuardVerdict = field(default_factory=lambda: GuardVerdict(True))

    @property
    def in_distribution(self) -> bool:
        """Whether the guard passed and the score is at or below the cutoff."""
        return self.guard.passed and not bool(self.score > self.cutoff)

    @property
    def check(self) -> str:
        """Which check rejected the image: ``"size"``, ``"information"``, ``"reconstruction"``; ``""`` if none."""
        if not self.guard.passed:
            return self.guard.check
        return "reconstruction" if bool(self.score > self.cutoff) else ""

    @property
    def reason(self) -> str:
        """Why the image was rejected, with the measured number(s) and the cutoff(s); ``""`` if it was not."""
        if not self.guard.passed:
            return self.guard.reason
        if self.check == "reconstruction":
            return (f"reconstruction error ({self.scorer} score {self.score:.3f} > cutoff {self.cutoff:.3f}: "
                    "unlike the chest X-rays the gate was trained on)")
        return ""

    @property
    def overridable(self) -> bool:
        """Whether ``allow_ood`` may analyse the image anyway: yes, except for a "too small" image."""
        return self.guard.overridable

@dataclass
class Report:
    """Everything the pipeline found out about one image.

    ``image``: the displayed crop, ``(S, S)`` float32 [0, 1] at the classifier's input size (maps align
    with it). ``raw``/``calibrated``: ``(F,)`` or None when the image was rejected. ``maps``: ``(K, S, S)``
    float32 explanation maps (in [0, 1] unless the caller asked for raw values) with ``map_labels`` naming
    each (``"all findings"`` for Chester's saliency) and ``explained_outputs`` the output indices they explain.
    ``timings``: seconds per stage. ``untrained``: findings the weights never trained, NaN in both arrays
    (:meth:`table` notes them "not trained by this model"). ``counterfactuals``: with ``method="latent_shift"``,
    the :class:`~cxrbench.explain.Counterfactual` behind each map (frames, probabilities), in ``map_labels`` order.
    """

    source: str
    meta: ImageMeta | None
    image: np.ndarray
    findings: list[str]
    operating_points: np.ndarray
    ood: OODResult | None = None
    rejected: bool = False
    overridden: bool = False
    raw: np.ndarray | None = None
    calibrated: np.ndarray | None = None
    method: str | None = None
    maps: np.ndarray | None = None
    map_labels: list[str] = field(default_factory=list)
    explained_outputs: list[int] = field(default_factory=list)
    lung_mask: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: findings the classifier's weights never trained (its card's ``untrained``): NaN in ``raw``/``calibrated``
    untrained: list[str] = field(default_factory=list)
    #: Latent Shift's frames and probabilities behind each map (``method="latent_shift"`` only)
    counterfactuals: list[Counterfactual] = field(default_factory=list)

    @property
    def in_distribution(self) -> bool | None:
        """Whether the gate accepted the image; None when no gate ran."""
        return None if self.ood is None else self.ood.in_distribution

    def require_in_distribution(self) -> None:
        """Raise :class:`RejectedImageError` (file, score, cutoff) if the gate rejected the image."""
        if self.rejected:
            assert self.ood is not None
            raise RejectedImageError(f"{self.source}: not recognised as a frontal chest X-ray: {self.ood.reason}; "
                                     "no prediction is made")

    @property
    def rejection(self) -> str:
        """Why the gate gave no prediction, in words that name the file (``""`` when it was not rejected):
        ``"hand.png: no prediction: it does not look like the frontal chest X-rays the OOD gate was trained on
        (ssim score 0.866 > cutoff 0.477); --allow-ood analyses it anyway"``; the blank-image guard's own reason
        for a tiny or blank image."""
        if not self.rejected or self.ood is None:
            return ""
        ood = self.ood
        why = (f"it does not look like the frontal chest X-rays the OOD gate was trained on ({ood.scorer} score "
               f"{ood.score:.3f} > cutoff {ood.cutoff:.3f})" if ood.check == "reconstruction" else ood.reason)
        hint = "; --allow-ood analyses it anyway" if ood.overridable else ""
        return f"{Path(str(self.source)).name}: no prediction: {why}{hint}"

    def table(self) -> pd.DataFrame:
        """One row per finding: calibrated and raw probability, operating point (and a ``note`` column "not trained
        by this model" when the weights never trained some outputs); most probable first
        (:func:`~cxrbench.explain.targets.finding_ranking`, the order explanations pick their top-k from)."""
        note = ["note"] if self.untrained else []
        if self.raw is None:
            return pd.DataFrame(columns=["finding", "calibrated", "raw", "operating_point", *note])
        df = pd.DataFrame({"finding": self.findings, "calibrated": self.calibrated, "raw": self.raw,
                           "operating_point": self.operating_points})
        if self.untrained:
            df["note"] = [UNTRAINED_NOTE if f in self.untrained else "" for f in self.findings]
        return df.iloc[finding_ranking(self.calibrated, self.raw)].reset_index(drop=True)

    def to_row(self) -> dict[str, Any]:
        """A row of the batch CSV: file, ``<Finding>``/``<Finding>_raw``, ``ood_score``, ``in_distribution``,
        ``check`` and ``reason`` (why the gate rejected it, also when overridden), ``error``; ``note`` naming the
        outputs the weights never trained, when there are any."""
        row: dict[str, Any] = {"file": self.source}
        for j, f in enumerate(self.findings):
            row[f] = float(self.calibrated[j]) if self.calibrated is not None else np.nan
            row[f"{f}_raw"] = float(self.raw[j]) if self.raw is not None else np.nan
        row["ood_score"] = self.ood.score if self.ood else np.nan
        row["in_distribution"] = self.in_distribution if self.ood else ""
        row["check"] = self.ood.check if self.ood else ""
        row["reason"] = self.ood.reason if self.ood else ""
        row["error"] = self.rejection
        if self.untrained:  # their columns are empty (NaN): say why
            row["note"] = f"{UNTRAINED_NOTE} (left empty): {', '.join(self.untrained)}"
        return row


#: what every face shows for an output the weights never trained, instead of a number
UNTRAINED_NOTE = "not trained by this model"

#: post-processing of the maps in a :class:`Report` unless the caller says otherwise (see :meth:`Pipeline.explain`)
DEFAULT_MAP_OPTIONS: dict[str, Any] = {"normalize": "minmax"}


class Pipeline:
    """A classifier bundle, optionally an OOD bundle and a lung U-Net bundle, ready to analyse images.

    Models are loaded once (at construction) and kept in eval mode on ``device``. A bundle whose model
    already is a backend (:mod:`cxrbench.inference.backend`; the ONNX Runtime adapters of
    :func:`cxrbench.export.runtime.load_export`) is run by it; a torch network by
    :class:`~cxrbench.inference.backend.TorchClassifier` / :class:`~cxrbench.inference.backend.TorchGate`.
    """

    def __init__(self, classifier: Bundle, ood: Bundle | None = None, unet: Bundle | None = None,
                 *, device: str | torch.device = "cpu", guard: ImageGuard | None = None, min_side: int | None = None,
                 autoencoder: Bundle | None = None):
        if classifier.card.kind != "classifier":
            raise ValueError(f"{classifier.path}: expected a classifier bundle, got {classifier.card.kind}")
        if ood is not None and ood.card.kind != "ood":
            raise ValueError(f"{ood.path}: expected an OOD bundle, got {ood.card.kind}")
        if unet is not None and unet.card.kind != "segmentation":
            raise ValueError(f"{unet.path}: expected a segmentation bundle, got {unet.card.kind}")
        self.device = torch.device(device)
        self.classifier, self.ood, self.unet = classifier, ood, unet
        #: the autoencoder at the classifier's resolution that Latent Shift needs (:meth:`counterfactual`)
        self.autoencoder = _checked_autoencoder(autoencoder, classifier)
        self.classifier_backend: ClassifierBackend = classifier_backend(classifier.model, self.device)
        self.gate_backend: GateBackend | None = gate_backend(ood.model, self.device) if ood is not None else None
        if unet is not None:
            unet.model.to(self.device).eval()
        self._segmenter: nn.Module | None = None  # made on first use (the dashboard never segments)
        #: the blank-image guard every image passes first: ``guard``, else the OOD card's fitted one, else the
        #: defaults (no OOD bundle, or an older card); ``min_side`` replaces its minimum short side
        self.guard = guard or ImageGuard.from_dict(ood.card.ood.get("guard") if ood is not None else None)
        if min_side is not None:
            self.guard = replace(self.guard, min_side=int(min_side))
        #: why the classifier runs on its backend when a chooser picked it (``backend="auto"`` of
        #: :func:`cxrbench.export.runtime.load_pipeline`: "gradcam needs gradients"); ``""`` otherwise
        self.backend_reason = ""
        self.findings = classifier.labels
        #: outputs the weights never trained (card ``untrained``): NaN probabilities, never explained
        self.untrained = [f for f in self.findings if f in classifier.card.untrained]
        self._trained = np.array([f not in self.untrained for f in self.findings])
        ops = classifier.card.operating_points
        self.operating_points = (OperatingPoints.from_dict(ops).as_array(self.findings) if ops
                                 else np.full(len(self.findings), np.nan))

    @property
    def segmenter(self) -> nn.Module | None:
        """The network :meth:`analyze` segments with (None without a U-Net): on the CPU a channels_last copy of
        the U-Net bundle's (the same masks on 258 real images, probabilities within 1.3e-6; 128 px: 9.9 -> 8.2 ms
        a report here), made on first use, so that the bundle's model keeps its layout (safetensors saves only
        contiguous tensors); ONNX Runtime's ``unet.onnx`` where :func:`cxrbench.export.runtime.load_pipeline`
        sets it."""
        if self._segmenter is None and self.unet is not None:
            model = self.unet.model
            self._segmenter = (copy.deepcopy(model).to(memory_format=torch.channels_last)
                               if self.device.type == "cpu" else model)
        return self._segmenter

    @segmenter.setter
    def segmenter(self, model: nn.Module) -> None:
        self._segmenter = model

    @classmethod
    def from_paths(cls, classifier: str | os.PathLike, ood: str | os.PathLike | None = None,
                   unet: str | os.PathLike | None = None, *, device: str = "cpu",
                   min_side: int | None = None, autoencoder: str | os.PathLike | None = None) -> "Pipeline":
        """Load bundle folders (PyTorch); :func:`cxrbench.export.runtime.load_pipeline` chooses a backend."""
        return cls(load_bundle(classifier, kind="classifier"),
                   load_bundle(ood, kind="ood") if ood else None,
                   load_bundle(unet, kind="segmentation") if unet else None, device=device, min_side=min_side,
                   autoencoder=load_bundle(autoencoder, kind="autoencoder") if autoencoder else None)

    def warm_up(self, explain: str | None = "saliency", *, segment: bool = True) -> float:
        """Run the whole chain once on a synthetic image so that the first real one does not pay for
        torch's first-call set-up (about 0.5 s on a 2-core CPU); returns the seconds it took. A method the
        backend cannot compute (gradients on ONNX Runtime) is left out of the warm-up; ``segment=False`` leaves
        out the U-Net too (for a caller whose reports skip it, as the dashboard's do)."""
        t0 = time.perf_counter()
        explain = explain if explain in self.classifier_backend.explain_methods else None
        ramp = np.linspace(0.1, 0.9, 256, dtype=np.float32)
        self.analyze(np.outer(ramp, ramp[::-1]), name="<warm-up>", explain=explain, allow_ood=True, segment=segment)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------
    # the steps
    def read(self, source: ImageSource | np.ndarray, name: str | None = None) -> Image:
        """An :class:`~cxrbench.io.Image` from a path, bytes, file object or a ``(H, W)`` [0, 1] array."""
        if isinstance(source, np.ndarray):
            check_unit_range(source, name or "array")
            if source.ndim != 2:
                raise ValueError(f"{name or 'array'}: expected a (H, W) grey image, got shape {source.shape}")
            meta = ImageMeta(source=name or "<array>", format="array", bit_depth=32,
                             original_size=source.shape, photometric="MONOCHROME2", mode=str(source.dtype))
            return Image(source.astype(np.float32), meta)
        return read_image(source, name=name)

    def model_inputs(self, displays: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """The classifier's input ``(B, C, S, S)`` float32 for displayed crops (``(S, S)`` or ``(B, S, S)`` [0, 1])."""
        stack = np.asarray(displays, dtype=np.float32)
        stack = stack[None] if stack.ndim == 2 else stack
        pp = self.classifier.preprocess
        return torch.from_numpy(np.stack([pp.intensity(d) for d in stack]))

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        """Chester Eq. 1 at the bundle's operating points: ``(..., F)`` raw -> calibrated, NaN without one."""
        return np.asarray(calibrate(np.asarray(raw, dtype=np.float64), self.operating_points), dtype=np.float64)

    def gate(self, pixels: np.ndarray | GeometrySource) -> OODResult:
        """The gate's verdict on an image's ``(H, W)`` [0, 1] pixels (or their
        :class:`~cxrbench.preprocess.GeometrySource`): the blank-image guard (:attr:`guard`) before any score
        is read; then, with an OOD bundle, its reconstruction score against its cutoff."""
        verdict = self.guard.check(pixels)
        if not verdict.passed or self.ood is None or self.gate_backend is None:
            return OODResult(guard=verdict)
        pp = self.ood.preprocess
        small = pp.geometry(pixels)
        out = self.gate_backend.score(torch.from_numpy(pp.intensity(small))[None])
        cutoff = self.ood.card.ood.get("cutoff", {})
        scorer = cutoff.get("scorer", "ssim")
        rec = np.asarray(out.reconstruction[0, 0], dtype=np.float32)
        return OODResult(scorer=scorer, score=float(out.scores[scorer][0]),
                         cutoff=float(cutoff.get("threshold", np.inf)), cutoff_method=str(cutoff.get("method", "")),
                         scores={k: float(v[0]) for k, v in out.scores.items()}, input=small, reconstruction=rec,
                         error=np.abs(small - rec), guard=verdict)

    # ------------------------------------------------------------------------------------------
    # one image
    def analyze(self, source: ImageSource | np.ndarray, *, name: str | None = None, explain: str | None = "saliency",
                targets: str | Sequence[str] | None = None, top: int = DEFAULT_TOP, allow_ood: bool = False,
                explain_options: Mapping[str, Any] | None = None, use_gate: bool = True,
                segment: bool = True) -> Report:
        """Run the chain on one image; see the module doc.

        Parameters
        ----------
        explain : explanation method (``"saliency"``, ``"gradcam"``, ``"cam"`` ...; see
            :data:`cxrbench.explain.EXPLAINERS`) or None for none.
        targets, top : what to explain (:func:`cxrbench.explain.targets.explanation_targets`): a finding, a list
            of findings, or by default all findings summed (saliency) / the ``top`` most probable.
        allow_ood : give probabilities even when the gate rejects the image (the report says so), except for a
            "too small" image: the model would see nothing but interpolation (:attr:`OODResult.overridable`).
        use_gate : False for the faces without a gate (``cxrbench explain``): the verdict is still in
            ``report.ood`` (to warn with), but nothing is rejected.
        segment : False to leave ``report.lung_mask`` unset even with a U-Net (a face that shows no mask).
        explain_options : post-processing of the maps (default :data:`DEFAULT_MAP_OPTIONS`, min-max to [0, 1]).

        Raises :class:`~cxrbench.io.ImageReadError` for unreadable input (nothing else is lost).
        """
        t0 = time.perf_counter()
        img = self.read(source, name)
        pixels = GeometrySource(img.pixels)  # checked and converted once for the three resizes
        report = Report(source=img.meta.source, meta=img.meta, image=self.classifier.preprocess.geometry(pixels),
                        findings=list(self.findings), operating_points=self.operating_points,
                        timings={"read": time.perf_counter() - t0}, untrained=list(self.untrained))
        t = time.perf_counter()
        report.ood = self.gate(pixels)
        report.timings["ood"] = time.perf_counter() - t
        failed = not report.ood.in_distribution
        report.rejected = use_gate and failed and not (allow_ood and report.ood.overridable)
        report.overridden = failed and not report.rejected
        if not report.rejected:
            report = self._classify_and_explain(report, explain, targets, top, explain_options)
            if self.unet is not None and segment:
                t = time.perf_counter()
                assert self.segmenter is not None
                report.lung_mask = predict_lung_mask(self.segmenter, self.unet.preprocess, report.image,
                                                     device=self.device)[0]
                report.timings["segment"] = time.perf_counter() - t
        report.timings["total"] = time.perf_counter() - t0
        return report

    def _classify_and_explain(self, report: Report, method: str | None, targets: str | Sequence[str] | None,
                              top: int, options: Mapping[str, Any] | None) -> Report:
        """The probabilities and, with ``method``, the maps. A backend that explains ``method`` in one pass
        (:class:`~cxrbench.inference.backend.OnePassBackend`: saliency, Grad-CAM, CAM on torch; CAM on ONNX
        Runtime) gives both from one forward, the targets chosen from its logits; ``timings["classify"]`` is
        then the time to the logits (the forward) and ``timings["explain"]`` the rest (backward, maps)."""
        t = time.perf_counter()
        x = self.model_inputs(report.image)
        backend = self.classifier_backend
        if not method or not isinstance(backend, OnePassBackend) or method not in backend.explain_methods:
            report.raw, report.calibrated = self._probabilities(backend.logits(x))
            report.timings["classify"] = time.perf_counter() - t
            return self.explain(report, method, targets, top=top, options=options) if method else report
        chosen: list[tuple[ExplanationTargets, float]] = []

        def choose(logits: np.ndarray) -> list[int] | None:
            raw, calibrated = self._probabilities(logits)
            chosen.append((explanation_targets(method, self.findings, targets, top=top, untrained=self.untrained,
                                               ranking=finding_ranking(calibrated, raw)), time.perf_counter()))
            return chosen[0][0].index

        logits, maps = backend.explain_with_logits(x, method, choose, **{**DEFAULT_MAP_OPTIONS, **(options or {})})
        report.raw, report.calibrated = self._probabilities(logits)
        report.timings["classify"] = chosen[0][1] - t
        return self._with_maps(report, method, chosen[0][0], maps, time.perf_counter() - chosen[0][1])

    def _probabilities(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (sigmoid) and calibrated probabilities ``(F,)`` float64 of the first image's logits; NaN for the
        outputs the weights never trained."""
        raw = 1.0 / (1.0 + np.exp(-np.asarray(logits[0], dtype=np.float64)))
        raw = np.where(self._trained, raw, np.nan)
        return raw, np.where(self._trained, self.calibrate(np.nan_to_num(raw, nan=0.5)), np.nan)

    def _with_maps(self, report: Report, method: str, chosen: ExplanationTargets, maps: np.ndarray,
                   seconds: float, counterfactuals: Sequence[Counterfactual] = ()) -> Report:
        return replace(report, method=method, maps=np.asarray(maps[0], dtype=np.float32), map_labels=chosen.labels,
                       explained_outputs=chosen.outputs(len(self.findings)),
                       timings={**report.timings, "explain": seconds}, counterfactuals=list(counterfactuals))

    def explain(self, report: Report, method: str, targets: str | Sequence[str] | None = None, *,
                top: int = DEFAULT_TOP, options: Mapping[str, Any] | None = None) -> Report:
        """A copy of ``report`` with the maps of ``method`` (only the explanation is computed: the image, the
        gate and the probabilities are the report's). ``targets``/``top``/``options`` as in :meth:`analyze`."""
        if report.raw is None:
            reason = report.ood.reason if report.ood is not None else "rejected"
            raise ValueError(f"{report.source}: rejected by the OOD gate ({reason}), so there is nothing to explain"
                             + (" (analyse with allow_ood=True to override the gate)"
                                if report.ood is None or report.ood.overridable else ""))
        t = time.perf_counter()
        ranking = finding_ranking(report.calibrated, report.raw)
        chosen = explanation_targets(method, self.findings, targets, ranking=ranking, top=top,
                                     untrained=self.untrained)
        if method in COUNTERFACTUAL_EXPLAINERS:  # needs the autoencoder too: not a backend's method
            explainer = self._latent_shift(**{**DEFAULT_MAP_OPTIONS, **(options or {})})
            maps = explainer(self.model_inputs(report.image).to(self.device), targets=chosen.index)
            return self._with_maps(report, method, chosen, maps, time.perf_counter() - t, explainer.counterfactuals)
        maps = self.classifier_backend.explain(self.model_inputs(report.image), method, chosen.index,
                                               **{**DEFAULT_MAP_OPTIONS, **(options or {})})
        return self._with_maps(report, method, chosen, maps, time.perf_counter() - t)

    def _latent_shift(self, **options: Any) -> LatentShift:
        """The Latent Shift explainer of this classifier and :attr:`autoencoder` (refused without one)."""
        if self.autoencoder is None:
            raise NoAutoencoderError(NO_AUTOENCODER)
        model = self.classifier.model
        # an ONNX Runtime adapter is an nn.Module too (it runs inside torch code), but gives no gradients
        if not isinstance(model, torch.nn.Module) or isinstance(model, ClassifierBackend):
            raise ValueError(f"{self.classifier.path}: Latent Shift needs the classifier's gradients, which the "
                             f"{type(model).__name__} backend does not give; load the PyTorch bundle")
        self.autoencoder.model.to(self.device).eval()
        return LatentShift(model, autoencoder=self.autoencoder.model, preprocess=self.classifier.preprocess,
                           autoencoder_preprocess=self.autoencoder.preprocess, **options)

    def counterfactual(self, report: Report, finding: str | None = None, **options: Any) -> Counterfactual:
        """Latent Shift of ``report``'s image for ``finding`` (default: the most probable one): the frames, the
        probability of the finding along them and the difference map (:class:`~cxrbench.explain.Counterfactual`).
        ``options``: those of :class:`~cxrbench.explain.LatentShift` (``n_frames``, ``max_shift``, ...)."""
        if report.raw is None:
            raise ValueError(f"{report.source}: rejected by the OOD gate, so there is no prediction to explain")
        ranking = [int(i) for i in finding_ranking(report.calibrated, report.raw) if self._trained[int(i)]]
        index = finding_indices(finding, self.findings)[0] if finding else ranking[0]
        if not self._trained[index]:
            raise ValueError(f"{self.findings[index]}: {UNTRAINED_NOTE}, so it has no counterfactual")
        explainer = self._latent_shift(**options)
        return explainer.counterfactual(self.model_inputs(report.image).to(self.device), index)

    # ------------------------------------------------------------------------------------------
    # many images
    def analyze_batch(self, sources: Sequence[str | os.PathLike], *, explain: str | None = None,
                      allow_ood: bool = False, progress: bool = True) -> tuple[list[Report | None], dict[int, str]]:
        """:meth:`analyze` over files; unreadable ones give ``None`` and an entry in the error dict."""
        reports: list[Report | None] = []
        errors: dict[int, str] = {}
        items = list(enumerate(sources))
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(items, desc="analysing", unit="img")
        for i, src in items:
            try:
                reports.append(self.analyze(src, explain=explain, allow_ood=allow_ood))
            except (ImageReadError, ValueError) as exc:
                reports.append(None)
                errors[i] = exc.reason if isinstance(exc, ImageReadError) else str(exc)
        return reports, errors

    def predict(self, files: Sequence[str | os.PathLike], *, batch_size: int = 16, progress: bool = False
                ) -> pd.DataFrame:
        """The ``predict`` CSV for image files (no gate, no explanation), ``batch_size`` images per forward pass:
        :func:`~cxrbench.inference.predict.predictions_table` with an ``error`` for each unreadable file and a
        ``warning`` for each low-dynamic-range one (:func:`~cxrbench.inference.predict.input_warning`) or one the
        blank-image guard would reject (its reason: "too small", "almost no image content")."""
        warnings: dict[int, str] = {}
        logits, errors = predict_files(self.classifier_backend, self.classifier.preprocess, files,
                                       batch_size=batch_size, progress=progress, warnings=warnings,
                                       guard=self.guard)
        return predictions_table(files, logits, self.findings, operating_points_of(self.classifier), errors,
                                 warnings, untrained=self.untrained)

    def predict_dataset(self, dataset, *, batch_size: int = 32, num_workers: int = 0, progress: bool = False
                        ) -> Predictions:
        """Logits of every item of a :class:`~cxrbench.data.CXRDataset` built with this classifier's preprocessing."""
        return predict_dataset(self.classifier_backend, dataset, batch_size=batch_size, num_workers=num_workers,
                               progress=progress)

    def backends(self) -> dict[str, str | None]:
        """Which backend runs what: ``{"classifier": "torch" | "onnxruntime" | ..., "gate": ... or None}``, and
        ``"segmenter"`` with a lung U-Net."""
        names = {"classifier": self.classifier_backend.name,
                 "gate": self.gate_backend.name if self.gate_backend is not None else None}
        if self.unet is not None:
            names["segmenter"] = str(getattr(self._segmenter, "name", "torch"))
        return names

    def describe(self) -> dict[str, Any]:
        """What is loaded (for the dashboard's footer and logs)."""
        d: dict[str, Any] = {"classifier": str(self.classifier.path), "arch": self.classifier.card.builder_kwargs,
                             "findings": len(self.findings), "untrained": list(self.untrained),
                             "device": str(self.device),
                             "backend": self.classifier_backend.name}
        if self.backend_reason:
            d["backend_reason"] = self.backend_reason
        if self.ood is not None:
            d["ood"] = str(self.ood.path)
            d["gate_backend"] = self.backends()["gate"]
            d["ood_cutoff"] = self.ood.card.ood.get("cutoff")
        d["guard"] = self.guard.to_dict()
        if self.unet is not None:
            d["unet"] = str(self.unet.path)
        return d


def _checked_autoencoder(autoencoder: Bundle | None, classifier: Bundle) -> Bundle | None:
    """``autoencoder`` when it is a Latent Shift autoencoder for ``classifier``'s input; a clear error otherwise."""
    if autoencoder is None:
        return None
    if autoencoder.card.kind != "autoencoder":
        raise ValueError(f"{autoencoder.path}: expected an autoencoder bundle (cxrbench train autoencoder), got "
                         f"{autoencoder.card.kind}")
    check_scales(classifier.preprocess, autoencoder.preprocess, classifier_name=str(classifier.path or "CLASSIFIER"),
                 autoencoder_name=str(autoencoder.path or "the autoencoder"))
    return autoencoder

