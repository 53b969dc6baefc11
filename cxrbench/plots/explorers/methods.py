"""Notebook 04's explorer: pick an explanation method and a finding over one image and see its map, with the
caption that says what the map is and a colour bar. Each map is computed the first time it is asked for (through
the one :class:`~cxrbench.inference.Pipeline`) and cached."""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ipywidgets as w
import numpy as np

from cxrbench.explain import EXPLAINERS
from cxrbench.explain.overlay import overlay
from cxrbench.explain.targets import ALL_FINDINGS, is_summed
from cxrbench.inference.pipeline import Pipeline, Report
from cxrbench.plots.explorers.base import Explorer

__all__ = ["METHOD_DESCRIPTIONS", "MethodPicker", "method_picker"]

#: one line per explanation method: what its map is
METHOD_DESCRIPTIONS = {
    "saliency": "Chester's saliency: |gradient| of the sum of all findings' logits w.r.t. the pixels, one map "
                "for every finding",
    "saliency_per_finding": "saliency of this finding alone: |gradient| of its logit w.r.t. the pixels",
    "cam": "CAM: the last feature map weighted by this finding's output weights (coarse: one cell per feature)",
    "gradcam": "Grad-CAM: the last feature map weighted by the mean gradient of this finding's logit, ReLU",
    "integrated_gradients": "Integrated Gradients (captum): gradients along a path from a black image, times "
                            "the input",
    "smoothgrad": "SmoothGrad (captum): saliency averaged over noisy copies of the image",
}


class MethodPicker(Explorer):
    """Method and finding pickers over one analysed image (see :func:`method_picker`).

    ``method`` and ``finding`` (Dropdowns) drive it; ``values`` holds method, finding (``"all findings"`` for a
    summed method), raw and calibrated probability of the finding, seconds (the computation, or of the cached
    map), cached (bool), flat (a constant map: nothing drawn) and peak (``(row, col)`` of the map's maximum).
    ``maps`` is the cache: ``(method, finding) -> (S, S)`` float32 map in [0, 1]."""

    def __init__(self, pipeline: Pipeline, report: Report, methods: Sequence[str], findings: Sequence[str], *,
                 method_options: Mapping[str, Mapping[str, Any]], finding: str, region: np.ndarray | None,
                 cmap: str) -> None:
        self._pipe, self._report, self._options = pipeline, report, method_options
        self._region, self._cmap = region, cmap
        self.maps: dict[tuple[str, str], np.ndarray] = {}
        self._seconds: dict[tuple[str, str], float] = {}
        self.method = w.Dropdown(options=list(methods), value=methods[0], description="method")
        self.finding = w.Dropdown(options=list(findings), value=finding, description="finding")
        super().__init__("Method x finding picker: one image, its explanations", [self.method, self.finding],
                         figsize=(7.6, 3.5), numbers_width="330px")
        self._marks: dict[str, Any] = {}
        self.method.observe(lambda _: self._update(), names="value")
        self.finding.observe(lambda _: self._update(), names="value")
        self._update()

    @property
    def key(self) -> tuple[str, str]:
        """The cache key of what is shown: (method, finding), finding ``"all findings"`` for a summed method."""
        method = str(self.method.value)
        return method, ALL_FINDINGS if is_summed(method) else str(self.finding.value)

    def map_for(self, method: str, finding: str) -> np.ndarray:
        """The ``(S, S)`` [0, 1] map of ``method`` for ``finding`` on this image, computed once and cached."""
        key = (method, ALL_FINDINGS if is_summed(method) else finding)
        if key not in self.maps:
            options = {**self._options.get(method, {}), "normalize": "minmax"}  # the colour bar's 0..1
            t = time.perf_counter()
            explained = self._pipe.explain(self._report, method, None if is_summed(method) else finding,
                                           options=options)
            self._seconds[key] = time.perf_counter() - t
            self.maps[key] = np.asarray(explained.maps[0], dtype=np.float32)  # type: ignore[index]
        return self.maps[key]

    def _update(self) -> None:
        method, label = self.key
        cached = (method, label) in self.maps
        heat = self.map_for(method, str(self.finding.value))
        j = self._report.findings.index(str(self.finding.value))
        flat = float(np.ptp(heat)) <= 1e-6
        raw, cal = self._report.raw, self._report.calibrated
        self.finding.disabled = is_summed(method)
        self.values = {"method": method, "finding": label, "seconds": self._seconds[(method, label)],
                       "cached": cached, "flat": flat,
                       "raw": float(raw[j]) if raw is not None else float("nan"),
                       "calibrated": float(cal[j]) if cal is not None else float("nan"),
                       "peak": tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))}
        if not self._marks:
            self._draw_fixed()
        shown = self._report.image if flat else overlay(self._report.image, heat, cmap=self._cmap, alpha=0.5)
        self._marks["overlay"].set_data(shown)
        self._marks["ax"].set_title(f"{method} · {label}", fontsize=9)
        self._show(self._caption())

    def _draw_fixed(self) -> None:
        """The image and the overlay panel with its colour bar (drawn once; the overlay's pixels change)."""
        import matplotlib
        from matplotlib.cm import ScalarMappable

        image = self._report.image
        self._new_layout()
        left, right = self.figure.subplots(1, 2)
        for ax in (left, right):
            ax.set_xlabel("x (pixel of the model input)", fontsize=8)
            ax.set_ylabel("y (pixel)", fontsize=8)
            ax.tick_params(labelsize=7)
        left.imshow(image, cmap="gray", vmin=0, vmax=1)
        left.set_title("the image at the model's input", fontsize=9)
        self._marks["overlay"] = right.imshow(np.zeros((*image.shape, 3), np.uint8))
        self._marks["ax"] = right
        if self._region is not None:
            for ax in (left, right):
                ax.contour(np.asarray(self._region, dtype=float), levels=[0.5], colors="red", linewidths=0.8)
        bar = self.figure.colorbar(ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap=self._cmap), ax=right,
                                   fraction=0.046, pad=0.04)
        bar.set_label("map value (1 = its maximum here)", fontsize=8)
        bar.ax.tick_params(labelsize=7)

    def _caption(self) -> str:
        v = self.values
        size = self._report.image.shape[-1]
        what = "all findings" if v["finding"] == ALL_FINDINGS else html.escape(v["finding"])
        rows = [f"<b>{html.escape(v['method'])} · {what} · {size} px model input</b>",
                html.escape(METHOD_DESCRIPTIONS.get(v["method"], v["method"]))]
        if v["flat"]:
            rows.append(f"<b>This method finds no evidence for {what} here: its map is constant, so none is "
                        "drawn.</b>")
        else:
            rows.append("colour: the map min-max scaled on this image (blue 0 = its lowest, red 1 = its highest); "
                        "it ranks pixels, it is not a probability")
        prob = f"raw {v['raw']:.3f}, calibrated {v['calibrated']:.3f} (0.5 = its operating point)"
        rows.append(f"the model's probability of {html.escape(str(self.finding.value))}: {prob}")
        if self._region is not None:
            rows.append("red outline: the expert box / lesion")
        rows.append(f"<small>computed in {v['seconds']:.2f} s{' (cached)' if v['cached'] else ''}; "
                    f"{len(self.maps)} map(s) cached</small>")
        return "<div style='font-size:12px;line-height:1.45'>" + "<br>".join(rows) + "</div>"

    def state_line(self) -> str:
        """The method and finding shown, for the static snapshot."""
        return f"method {self.method.value}, finding {self.values['finding']}"


def method_picker(pipeline: Pipeline, image: Any, methods: Sequence[str] | None = None,
                  findings: Sequence[str] | None = None, *,
                  method_options: Mapping[str, Mapping[str, Any]] | None = None, finding: str | None = None,
                  region: np.ndarray | None = None, cmap: str = "jet") -> MethodPicker:
    """A method x finding picker over one image (notebook 04): the map of each choice overlaid on the image, with
    its caption and colour bar. Only the first choice is computed here; the others when first picked, then cached.

    Parameters
    ----------
    pipeline
        The :class:`~cxrbench.inference.Pipeline` whose classifier is explained.
    image
        A :class:`~cxrbench.inference.pipeline.Report` of ``pipeline`` (e.g. ``pipeline.analyze(path,
        explain=None)``) or anything :meth:`Pipeline.analyze` reads (path, bytes, ``(H, W)`` [0, 1] array).
    methods, findings
        The choices (default: every method of :data:`cxrbench.explain.EXPLAINERS`, every finding of the model).
    method_options
        Per-method explainer options, e.g. ``{"integrated_gradients": {"n_steps": 32}}``; maps are always
        min-max scaled to [0, 1] (the colour bar's range).
    finding
        The finding shown first (default: the model's most probable one).
    region
        An ``(S, S)`` mask at the model input's size (an expert box, a lesion) outlined in red.
    """
    report = image if isinstance(image, Report) else pipeline.analyze(image, explain=None)
    if report.raw is None:
        reason = report.ood.reason if report.ood is not None else "rejected"
        raise ValueError(f"{report.source}: rejected by the OOD gate ({reason}), so there is nothing to explain")
    methods = list(methods or EXPLAINERS)
    unknown = [m for m in methods if m not in EXPLAINERS]
    if unknown or not methods:
        raise ValueError(f"unknown explanation method(s) {unknown}; choose from {EXPLAINERS}")
    findings = list(findings or report.findings)
    missing = [f for f in findings if f not in report.findings]
    if missing:
        raise ValueError(f"findings {missing} are not outputs of this classifier ({report.findings})")
    if finding is None:
        finding = max(findings, key=lambda f: float(report.raw[report.findings.index(f)]))  # type: ignore[index]
    elif finding not in findings:
        raise ValueError(f"finding {finding!r} is not one of {findings}")
    if region is not None and np.shape(region) != report.image.shape:
        raise ValueError(f"region has shape {np.shape(region)}, the model input is {report.image.shape}")
    return MethodPicker(pipeline, report, methods, findings, method_options=method_options or {}, finding=finding,
                        region=region, cmap=cmap)
