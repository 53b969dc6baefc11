"""The Chester chain for one image or a batch: OOD gate -> calibrated probabilities -> explanation.

>>> pipe = Pipeline.from_paths("bundles/classifier", ood="bundles/ood")     # doctest: +SKIP
>>> report = pipe.analyze("chest.png", explain="saliency")                   # doctest: +SKIP
>>> report.table()                                                            # doctest: +SKIP

An image the OOD gate rejects gets no probabilities unless the caller overrides the gate
(``allow_ood=True``); the report still carries the reconstruction and its error map, so a user can
see *why* it was rejected. Everything runs locally, on the CPU by default; nothing is written to disk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from cxrbench.evaluation.calibration import OperatingPoints, calibrate
from cxrbench.io import Image, ImageMeta, ImageReadError, ImageSource, read_image
from cxrbench.models.bundle import Bundle, load_bundle

__all__ = ["OODResult", "Pipeline", "Report", "RejectedImageError"]


class RejectedImageError(RuntimeError):
    """Raised by :meth:`Report.require_in_distribution` for an image the OOD gate rejected."""


@dataclass
class OODResult:
    """The gate's verdict on one image.

    ``scores``: every scorer (``l1``, ``l2``, ``ssim`` = 1 - SSIM, ``ssim_raw``, ``latent``); ``score``
    the bundle's scorer; ``cutoff`` its threshold (higher = more OOD); images at 64 px in [0, 1]:
    ``input``, ``reconstruction``, ``error`` (per-pixel |x - D(E(x))|).
    """

    scorer: str
    score: float
    cutoff: float
    cutoff_method: str
    scores: dict[str, float]
    input: np.ndarray
    reconstruction: np.ndarray
    error: np.ndarray

    @property
    def in_distribution(self) -> bool:
        return bool(self.score <= self.cutoff)


@dataclass
class Report:
    """Everything the pipeline found out about one image.

    ``image``: the displayed crop, ``(S, S)`` float32 [0, 1] at the classifier's input size (maps align
    with it). ``raw``/``calibrated``: ``(F,)`` or None when the image was rejected. ``maps``: ``(K, S, S)``
    explanation maps in [0, 1] with ``map_labels`` naming each (``"all findings"`` for Chester's saliency).
    ``timings``: seconds per stage.
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
    lung_mask: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def in_distribution(self) -> bool | None:
        return None if self.ood is None else self.ood.in_distribution

    def require_in_distribution(self) -> None:
        if self.rejected:
            assert self.ood is not None
            raise RejectedImageError(
                f"{self.source}: not recognised as a frontal chest X-ray ({self.ood.scorer} score "
                f"{self.ood.score:.3f} > cutoff {self.ood.cutoff:.3f}); no prediction is made")

    def table(self) -> pd.DataFrame:
        """One row per finding: calibrated and raw probability, operating point; highest first."""
        if self.raw is None:
            return pd.DataFrame(columns=["finding", "calibrated", "raw", "operating_point"])
        df = pd.DataFrame({"finding": self.findings, "calibrated": self.calibrated, "raw": self.raw,
                           "operating_point": self.operating_points})
        return df.sort_values("calibrated", ascending=False, na_position="last").reset_index(drop=True)

    def to_row(self) -> dict[str, Any]:
        """A row of the batch CSV: file, ``<Finding>``/``<Finding>_raw``, ``ood_score``, ``in_distribution``, ``error``."""
        row: dict[str, Any] = {"file": self.source}
        for j, f in enumerate(self.findings):
            row[f] = float(self.calibrated[j]) if self.calibrated is not None else np.nan
            row[f"{f}_raw"] = float(self.raw[j]) if self.raw is not None else np.nan
        row["ood_score"] = self.ood.score if self.ood else np.nan
        row["in_distribution"] = self.in_distribution if self.ood else ""
        row["error"] = "rejected by the OOD gate" if self.rejected else ""
        return row


class Pipeline:
    """A classifier bundle, optionally an OOD bundle and a lung U-Net bundle, ready to analyse images.

    Models are loaded once (at construction) and kept in eval mode on ``device``.
    """

    def __init__(self, classifier: Bundle, ood: Bundle | None = None, unet: Bundle | None = None,
                 *, device: str | torch.device = "cpu"):
        if classifier.card.kind != "classifier":
            raise ValueError(f"{classifier.path}: expected a classifier bundle, got {classifier.card.kind}")
        if ood is not None and ood.card.kind != "ood":
            raise ValueError(f"{ood.path}: expected an OOD bundle, got {ood.card.kind}")
        self.device = torch.device(device)
        self.classifier, self.ood, self.unet = classifier, ood, unet
        for b in (classifier, ood, unet):
            if b is not None:
                b.model.to(self.device).eval()
        self.findings = classifier.labels
        ops = classifier.card.operating_points
        self.operating_points = (OperatingPoints.from_dict(ops).as_array(self.findings) if ops
                                 else np.full(len(self.findings), np.nan))
        self._explainers: dict[str, Any] = {}

    @classmethod
    def from_paths(cls, classifier: str | os.PathLike, ood: str | os.PathLike | None = None,
                   unet: str | os.PathLike | None = None, *, device: str = "cpu") -> "Pipeline":
        return cls(load_bundle(classifier, kind="classifier"),
                   load_bundle(ood, kind="ood") if ood else None,
                   load_bundle(unet, kind="segmentation") if unet else None, device=device)

    def warm_up(self, explain: str | None = "saliency") -> float:
        """Run the whole chain once on a synthetic image so that the first real one does not pay for
        torch's first-call set-up (about 0.5 s on a 2-core CPU); returns the seconds it took."""
        t0 = time.perf_counter()
        ramp = np.linspace(0.1, 0.9, 256, dtype=np.float32)
        self.analyze(np.outer(ramp, ramp[::-1]), name="<warm-up>", explain=explain, allow_ood=True)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------
    def read(self, source: ImageSource | np.ndarray, name: str | None = None) -> Image:
        """An :class:`~cxrbench.io.Image` from a path, bytes, file object or a ``(H, W)`` [0, 1] array."""
        if isinstance(source, np.ndarray):
            from cxrbench.preprocess import check_unit_range

            check_unit_range(source, name or "array")
            if source.ndim != 2:
                raise ValueError(f"{name or 'array'}: expected a (H, W) grey image, got shape {source.shape}")
            meta = ImageMeta(source=name or "<array>", format="array", bit_depth=32,
                             original_size=source.shape, photometric="MONOCHROME2", mode=str(source.dtype))
            return Image(source.astype(np.float32), meta)
        return read_image(source, name=name)

    def analyze(self, source: ImageSource | np.ndarray, *, name: str | None = None, explain: str | None = "saliency",
                targets: Sequence[str] | None = None, allow_ood: bool = False) -> Report:
        """Run the chain on one image; see the module doc.

        Parameters
        ----------
        explain : explanation method (``"saliency"``, ``"gradcam"``, ``"cam"`` ...; see
            :data:`cxrbench.explain.EXPLAINERS`) or None for none.
        targets : findings to explain (per-finding methods); default: the three most probable.
        allow_ood : give probabilities even when the gate rejects the image (the report says so).

        Raises :class:`~cxrbench.io.ImageReadError` for unreadable input (nothing else is lost).
        """
        t0 = time.perf_counter()
        img = self.read(source, name)
        timings = {"read": time.perf_counter() - t0}
        pp = self.classifier.preprocess
        display = pp.geometry(img.pixels)
        report = Report(source=img.meta.source, meta=img.meta, image=display, findings=list(self.findings),
                        operating_points=self.operating_points, timings=timings)
        if self.ood is not None:
            t = time.perf_counter()
            report.ood = self._gate(img.pixels)
            timings["ood"] = time.perf_counter() - t
            report.rejected = not report.ood.in_distribution and not allow_ood
            report.overridden = not report.ood.in_distribution and allow_ood
        if report.rejected:
            timings["total"] = time.perf_counter() - t0
            return report
        t = time.perf_counter()
        x = torch.from_numpy(pp.intensity(display))[None].to(self.device)
        with torch.no_grad():
            logits = self.classifier.model(x)[0].float().cpu().numpy()
        report.raw = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        report.calibrated = self._calibrate(report.raw)
        timings["classify"] = time.perf_counter() - t
        if explain:
            t = time.perf_counter()
            self._explain(report, x, explain, targets)
            timings["explain"] = time.perf_counter() - t
        if self.unet is not None:
            t = time.perf_counter()
            report.lung_mask = self.segment(display)
            timings["segment"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return report

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

    # ------------------------------------------------------------------------------------------
    def _calibrate(self, raw: np.ndarray) -> np.ndarray:
        ok = np.isfinite(self.operating_points)
        out = np.full_like(raw, np.nan)
        if ok.any():
            out[ok] = calibrate(raw[ok][None], self.operating_points[ok])[0]
        return out

    def _gate(self, pixels: np.ndarray) -> OODResult:
        from cxrbench.ood.scoring import score_batch

        assert self.ood is not None
        card = self.ood.card
        pp = self.ood.preprocess
        small = pp.geometry(pixels)
        x = torch.from_numpy(pp.intensity(small))[None].to(self.device)
        with torch.no_grad():
            scores = score_batch(self.ood.model, x)
            recon = self.ood.model.reconstruct(x)
        cutoff = card.ood.get("cutoff", {})
        scorer = cutoff.get("scorer", "ssim")
        rec = recon[0, 0].float().cpu().numpy()
        return OODResult(scorer=scorer, score=float(scores[scorer][0]), cutoff=float(cutoff.get("threshold", np.inf)),
                         cutoff_method=str(cutoff.get("method", "")),
                         scores={k: float(v[0]) for k, v in scores.items()}, input=small, reconstruction=rec,
                         error=np.abs(small - rec))

    def explainer(self, method: str):
        """The (cached) explainer of the classifier for ``method``."""
        if method not in self._explainers:
            from cxrbench.explain import get_explainer

            self._explainers[method] = get_explainer(method, self.classifier.model, normalize="minmax")
        return self._explainers[method]

    def _explain(self, report: Report, x: torch.Tensor, method: str, targets: Sequence[str] | None) -> None:
        if method == "saliency":
            idx, labels = None, ["all findings"]
        else:
            if targets:
                unknown = [t for t in targets if t not in self.findings]
                if unknown:
                    raise ValueError(f"unknown findings {unknown}; expected some of {self.findings}")
                idx = [self.findings.index(t) for t in targets]
            else:
                idx = list(np.argsort(-np.nan_to_num(report.calibrated, nan=-1.0))[:3])
            labels = [self.findings[i] for i in idx]
        maps = self.explainer(method)(x, targets=idx)
        report.method, report.maps, report.map_labels = method, np.asarray(maps[0], dtype=np.float32), labels

    def segment(self, display: np.ndarray) -> np.ndarray:
        """Lung mask ``(S, S)`` bool of the displayed crop (needs a U-Net bundle)."""
        if self.unet is None:
            raise ValueError("no U-Net bundle loaded")
        pp = self.unet.preprocess
        small = pp.geometry(display)
        x = torch.from_numpy(pp.intensity(small))[None].to(self.device)
        with torch.no_grad():
            prob = torch.sigmoid(self.unet.model(x))[0, 0]
        prob = torch.nn.functional.interpolate(prob[None, None], size=display.shape, mode="bilinear", align_corners=False)
        return (prob[0, 0] > 0.5).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """What is loaded (for the dashboard's footer and logs)."""
        d: dict[str, Any] = {"classifier": str(self.classifier.path), "arch": self.classifier.card.builder_kwargs,
                             "findings": len(self.findings), "device": str(self.device)}
        if self.ood is not None:
            d["ood"] = str(self.ood.path)
            d["ood_cutoff"] = self.ood.card.ood.get("cutoff")
        if self.unet is not None:
            d["unet"] = str(self.unet.path)
        return d

