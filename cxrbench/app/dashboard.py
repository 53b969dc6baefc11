"""The upload-and-explain app: ipywidgets around a :class:`~cxrbench.inference.pipeline.Pipeline`.

``notebooks/05_dashboard.ipynb`` builds a :class:`Dashboard` and displays it; Voila serves that
notebook as a local web app. All logic is here so it can be driven without a browser: set
``dashboard.upload.value`` (or call :meth:`Dashboard.analyze_bytes`) and read the widgets.

Privacy: uploads are decoded in memory (never written to disk), the models run in this kernel, and
the page loads nothing from outside (plotly.js comes from the local Jupyter extension).
"""

from __future__ import annotations

import html
import io
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cxrbench._threads import use_interactive_threads
from cxrbench.explain.targets import is_summed
from cxrbench.inference.pipeline import Pipeline, Report
from cxrbench.io import ImageReadError
from cxrbench.models.bundle import format_metric
from cxrbench.plots.app import probability_figure

__all__ = ["CALIBRATION_NOTE", "Dashboard", "dashboard_from_environment", "model_summary", "png_bytes",
           "probability_figure"]

CALIBRATION_NOTE = ("Calibrated probabilities: 0.5 marks each finding's operating point (the threshold that "
                    "best separated positives from negatives on the validation split, Chester Eq. 1). "
                    "Hover a bar for the raw model output. Not a diagnosis.")
UPLOAD_ACCEPT = ".png,.jpg,.jpeg,.dcm,.dicom,.tif,.tiff,.bmp"
#: below this test macro AUC the app says plainly that the model is a demonstration, not a reader
WEAK_MACRO_AUC = 0.75


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an ``(H, W)`` [0, 1] grey or ``(H, W, 3)`` uint8 RGB image (in memory)."""
    from PIL import Image as PILImage

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def model_summary(pipeline: Pipeline) -> str:
    """HTML ``<details>``: what the loaded models are and how well they did, from their cards.

    The classifier's architecture, input size, training data and test macro AUC with a per-finding
    table (AUC, 95 % CI, positives), where its card has them; a plain warning when the macro AUC is
    below :data:`WEAK_MACRO_AUC`; the OOD gate's scorer and cutoff. Nothing is computed here.
    """
    card = pipeline.classifier.card
    esc = html.escape
    arch = card.builder_kwargs.get("arch", card.builder)
    label = card.name if card.name and str(arch) in card.name else f"{card.name} ({arch})".strip()
    n = len(card.labels)
    lines = [f"<b>Classifier</b> {esc(label)}: {card.preprocessing.size} px, {n} finding{'s' * (n != 1)}"]
    if card.training.get("data"):
        n_train = (card.training.get("split_counts") or {}).get("train")
        n_all = card.training.get("n_images", "?")
        lines[-1] += (f"; trained on {n_train} of {n_all}" if n_train else f"; trained on {n_all}") + \
            f" images from {esc(str(card.training['data']))}"
    ops = card.operating_points
    if ops.get("thresholds"):
        method = f" ({esc(str(ops['method']))})" if ops.get("method") else ""
        lines.append(f"Operating points fitted on the {esc(str(ops.get('fitted_on', '?')))} split{method}.")
    test = card.test_metrics
    macro = (test.get("summary") or {}).get("macro_auc")
    if macro is None:
        lines.append("<i>Its card holds no test-set metrics: how well it works is unknown.</i>")
    else:
        lines.append(f"Test macro AUC <b>{macro:.3f}</b> on {test.get('n_images', '?')} held-out images.")
        if macro < WEAK_MACRO_AUC:
            lines.append(f"<b style='color:#b00020'>A weak model (macro AUC below {WEAK_MACRO_AUC}): it shows how "
                         "the workflow runs, not what the X-ray shows.</b>")
        num = format_metric
        rows = "".join(
            f"<tr><td>{esc(f)}</td><td>{num(m.get('auc'), 3)}</td>"
            f"<td>[{num(m.get('auc_ci_low'), 2)}, {num(m.get('auc_ci_high'), 2)}]</td>"
            f"<td>{int(m.get('n_pos') or 0)}</td></tr>"
            for f, m in (test.get("per_finding") or {}).items()).replace("<td>", "<td style='padding:0 8px 0 0'>")
        if rows:
            lines.append("<table class='cxr-model-table' style='border-collapse:collapse;line-height:1.25'>"
                         "<tr><th>finding</th><th>AUC</th><th>95 % CI</th>"
                         f"<th>positives</th></tr>{rows}</table>")
    if pipeline.ood is not None:
        cut = pipeline.ood.card.ood.get("cutoff", {})
        lines.append(f"<b>OOD gate</b> {esc(pipeline.ood.card.builder)}: an image is rejected when its "
                     f"{esc(str(cut.get('scorer', '?')))} score exceeds "
                     f"{float(cut.get('threshold', float('nan'))):.3f} "
                     f"({esc(str(cut.get('method', '?')))}).")
    else:
        lines.append("<b>No OOD gate model</b>: only the blank-image guard checks the images.")
    g = pipeline.guard
    lines.append(f"<b>Blank-image guard</b> ({esc(g.method)}): an image needs at least {g.min_side} px on its short "
                 f"side, {g.min_bits_per_pixel:.2f} bits/pixel and an intensity spread of {g.min_spread:.3f}.")
    body = "".join(f"<p style='margin:2px 0'>{line}</p>" if not line.startswith("<table") else line for line in lines)
    return f"<details class='cxr-about'><summary>About these models</summary><small>{body}</small></details>"


class Dashboard:
    """The widgets and their callbacks. ``dashboard.widget`` is what a notebook displays.

    Parameters
    ----------
    pipeline : the models (loaded once, before the first upload).
    examples : display name -> image path, offered in the example picker.
    """

    METHODS = ("saliency", "gradcam", "cam", "saliency_per_finding")
    #: default display smoothing: gradient saliency is pixel-level speckle; σ = 2 px shows where it gathers
    SMOOTHING = 2.0

    def __init__(self, pipeline: Pipeline, examples: Mapping[str, str | Path] | None = None):
        self.pipeline = pipeline
        self.examples = {k: str(v) for k, v in (examples or {}).items()}
        self.report: Report | None = None
        self.figure: Any = None  # the plotly Figure of the last report (plotly is imported by plots.app)
        self._source: tuple[str, bytes] | None = None
        self._quiet = False
        per_finding = pipeline.classifier.card.test_metrics.get("per_finding") or {}
        self._test_auc = {f: m.get("auc") for f, m in per_finding.items()} or None  # shown on hover
        self._build_inputs()
        self._build_outputs()
        self._observe()
        self.widget = self._layout()

    def _build_inputs(self) -> None:
        import ipywidgets as w

        self.upload = w.FileUpload(accept=UPLOAD_ACCEPT, multiple=False, description="Upload X-ray")
        self.upload.add_class("cxr-upload")
        self.example = w.Dropdown(options=["(choose an example)", *self.examples], description="or example")
        self.example.add_class("cxr-example")
        self.override = w.Checkbox(value=False, description="analyse even if not recognised as a chest X-ray",
                                   indent=False, layout=w.Layout(width="auto"))
        self.method = w.Dropdown(options=list(self.METHODS), value="saliency", description="explain with")
        self.finding = w.Dropdown(options=list(self.pipeline.findings), description="finding", disabled=True)
        self.opacity = w.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="opacity")
        self.hide_below = w.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.05, description="hide below",
                                        tooltip="map values under this fraction of the maximum are not drawn, "
                                                "so the anatomy shows through")
        self.smoothing = w.FloatSlider(value=self.SMOOTHING, min=0.0, max=8.0, step=0.5, description="smoothing",
                                       tooltip="Gaussian σ in model-input pixels (display only; 0 = the raw map)")

    def _build_outputs(self) -> None:
        import ipywidgets as w

        self.busy = w.HTML("")
        self.busy.add_class("cxr-busy")
        self.message = w.HTML("")
        self.message.add_class("cxr-message")
        self.verdict = w.HTML("")
        self.verdict.add_class("cxr-verdict")
        self.ood_images = w.HBox([])
        self.ood_images.add_class("cxr-ood-images")
        self.bars = w.Output()
        self.bars.add_class("cxr-bars")
        self.note = w.HTML(f"<small>{html.escape(CALIBRATION_NOTE)}</small>",
                           layout=w.Layout(width="540px", display="none"))  # shown with the bars
        self.overlay = w.Image(format="png", layout=w.Layout(width="384px", height="384px", object_fit="contain",
                                                             visibility="hidden"))
        self.overlay.add_class("cxr-overlay")
        self.timing = w.HTML("")
        self.timing.add_class("cxr-timing")

    def _observe(self) -> None:
        self.upload.observe(self._on_upload, names="value")
        self.example.observe(self._on_example, names="value")
        self.override.observe(lambda _: self._rerun(), names="value")
        self.method.observe(self._on_method, names="value")
        self.finding.observe(lambda _: self._reexplain(), names="value")
        self.opacity.observe(lambda _: self._draw_overlay(), names="value")
        self.smoothing.observe(lambda _: self._draw_overlay(), names="value")
        self.hide_below.observe(lambda _: self._draw_overlay(), names="value")

    def _layout(self):
        import ipywidgets as w

        header = w.HTML("<h2>cxrbench · chest X-ray check</h2><p>Images are analysed in this Python kernel on "
                        "this machine; nothing is uploaded anywhere else.</p>")
        self.about = w.HTML(model_summary(self.pipeline))
        self.about.add_class("cxr-about")
        left = w.VBox([self.upload, self.example, self.override, self.busy, self.message, self.verdict,
                       self.ood_images, w.HTML("<h4>Explanation</h4>"), self.method, self.finding, self.opacity,
                       self.smoothing, self.hide_below],
                      layout=w.Layout(width="430px", min_width="430px", overflow="hidden"))
        right = w.VBox([self.bars, self.note, self.overlay], layout=w.Layout(width="560px", min_width="560px"))
        body = w.HBox([left, right], layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        return w.VBox([header, self.about, body, self.timing])

    # ------------------------------------------------------------------ entry points
    def analyze_bytes(self, name: str, content: bytes) -> Report | None:
        """Analyse an uploaded file's bytes (never written to disk). Errors become a message."""
        return self._run((name, bytes(content)))

    def analyze_path(self, path: str | Path) -> Report | None:
        """Analyse an image file on disk exactly as if its bytes were uploaded."""
        p = Path(path)
        return self.analyze_bytes(p.name, p.read_bytes())

    # ------------------------------------------------------------------ callbacks
    def _on_upload(self, change: dict[str, Any]) -> None:
        files = change["new"]
        if not files:
            return
        item = files[0]
        content = item["content"]
        self.analyze_bytes(item["name"], content.tobytes() if hasattr(content, "tobytes") else content)

    def _on_example(self, change: dict[str, Any]) -> None:
        name = change["new"]
        if name in self.examples:
            self.analyze_path(self.examples[name])

    def _on_method(self, change: dict[str, Any]) -> None:
        self.finding.disabled = is_summed(change["new"])  # one map of all findings: no finding to choose
        self._reexplain()

    def _rerun(self) -> None:
        if self._source is not None:
            self._run()

    def _reexplain(self) -> None:
        if self._quiet or self.report is None or self.report.raw is None or self._source is None:
            return
        self._run()

    # ------------------------------------------------------------------ work
    def _run(self, source: tuple[str, bytes] | None = None) -> Report | None:
        """Analyse ``source`` (or the current image again); it becomes current only if it succeeds."""
        source = source or self._source
        assert source is not None
        name, content = source
        self.busy.value = "<span class='cxr-spinner'>⏳ analysing…</span>"
        t0 = time.perf_counter()
        try:
            targets = None if is_summed(self.method.value) else self.finding.value
            use_interactive_threads()  # 1 thread while other processes hold the cores (cxrbench/_threads.py)
            report = self.pipeline.analyze(content, name=name, explain=self.method.value, targets=targets,
                                           allow_ood=self.override.value)
        except ImageReadError as exc:
            self._error(f"Cannot read <b>{html.escape(exc.source)}</b>: {html.escape(exc.reason)}. "
                        "The previous result is kept.")
            return None
        except Exception as exc:  # a message instead of a traceback, and nothing lost
            self._error(f"Could not analyse <b>{html.escape(name)}</b>: {html.escape(str(exc))}. "
                        "The previous result is kept.")
            self._last_traceback = traceback.format_exc()
            return None
        finally:
            self.busy.value = ""
        self.message.value = ""
        self.report, self._source = report, source
        self._render(report, time.perf_counter() - t0)
        return report

    def _error(self, text: str) -> None:
        self.message.value = f"<div style='color:#b00020'>{text}</div>"

    def _render(self, report: Report, seconds: float) -> None:
        import ipywidgets as w

        self._render_verdict(report)
        # outputs are set, never cleared with clear_output(wait=True): a deferred clear that no new output
        # follows (a rejected image) would leave the previous image's bars on the page
        self.bars.outputs = ()
        self.note.layout.display = "none" if report.raw is None else ""
        if report.raw is not None:
            if is_summed(self.method.value):  # preselect the most probable finding for per-finding methods
                self._quiet = True
                self.finding.value = report.table()["finding"].iloc[0]
                self._quiet = False
            self.figure = probability_figure(report, self._test_auc)
            # set the output directly (works with or without a kernel capturing display calls)
            spec = json.loads(self.figure.to_json())
            spec["config"] = {"displaylogo": False, "responsive": False}
            self.bars.outputs = ({"output_type": "display_data", "metadata": {},
                                  "data": {"application/vnd.plotly.v1+json": spec,
                                           "text/plain": "calibrated probabilities (plotly)"}},)
        self._draw_overlay()
        stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in report.timings.items() if k != "total")
        self.timing.value = (f"<small>{html.escape(report.source)}: {seconds:.2f} s ({stages}) · "
                             f"models: {html.escape(Path(str(self.pipeline.classifier.path)).name)}</small>")
        o = report.ood
        if o is not None and o.input is not None and o.reconstruction is not None and o.error is not None:
            from cxrbench.explain.overlay import error_overlay

            imgs = [("input (64 px)", o.input), ("reconstruction", o.reconstruction),
                    ("error", error_overlay(o.input, o.error))]
            self.ood_images.children = [w.VBox([w.HTML(f"<small>{t}</small>"),
                                                w.Image(value=png_bytes(im), format="png",
                                                        layout=w.Layout(width="128px", height="128px"))])
                                        for t, im in imgs]
        else:
            self.ood_images.children = []

    def _render_verdict(self, report: Report) -> None:
        o = report.ood
        if o is None:  # (every report of the pipeline has a verdict; kept for reports made elsewhere)
            self.verdict.value = "<p><i>No OOD gate loaded: every image is analysed.</i></p>"
            return
        reason = html.escape(o.reason)
        if o.in_distribution:
            detail = (f"{o.scorer} score {o.score:.3f} vs cutoff {o.cutoff:.3f}" if o.scorer
                      else "passed the blank-image guard; no OOD model loaded")
            self.verdict.value = f"<p style='color:#1e7b34'>✔ Looks like a frontal chest X-ray ({detail}).</p>"
        elif report.rejected:
            why = ("Red marks where the reconstruction fails." if o.check == "reconstruction" else
                   "It cannot be analysed anyway: the model would see nothing." if not o.overridable else "")
            self.verdict.value = (f"<p class='cxr-rejected' style='color:#b00020'><b>✘ Rejected: this does not look "
                                  f"like a frontal chest X-ray</b>: <span class='cxr-reason'>{reason}</span>. No "
                                  f"prediction is shown. {why}</p>")
        else:
            self.verdict.value = (f"<p style='color:#b36b00'>⚠ Not recognised as a chest X-ray "
                                  f"(<span class='cxr-reason'>{reason}</span>); analysed anyway because you asked. "
                                  "Treat the numbers with suspicion.</p>")

    def _draw_overlay(self) -> None:
        from cxrbench.explain.base import gaussian_smooth
        from cxrbench.explain.overlay import overlay

        r = self.report
        self.overlay.layout.visibility = "hidden" if r is None else "visible"
        if r is None or r.maps is None:
            self.overlay.value = png_bytes(r.image) if r is not None else b""
            return
        k = 0
        if not is_summed(r.method or "") and self.finding.value in r.map_labels:
            k = r.map_labels.index(self.finding.value)
        heat = gaussian_smooth(r.maps[k], float(self.smoothing.value))
        threshold = float(self.hide_below.value) or None
        self.overlay.value = png_bytes(overlay(r.image, heat, alpha=float(self.opacity.value), threshold=threshold))


def dashboard_from_environment(classifier: str = "", ood: str = "", unet: str = "",
                               demo_info: str | Path = "") -> Any:
    """The dashboard for the bundles named here, else in ``$CXRBENCH_DEMO`` (JSON), else ``build/demo/demo.json``.

    Returns the :class:`Dashboard`'s widget, or an HTML message that says how to get bundles.
    """
    import ipywidgets as w

    from cxrbench.app.demo import default_demo_info

    info: dict[str, Any] = {}
    if os.environ.get("CXRBENCH_DEMO"):
        info = json.loads(os.environ["CXRBENCH_DEMO"])
    else:
        path = Path(demo_info) if demo_info else default_demo_info()
        if path.is_file():
            info = json.loads(path.read_text())
    classifier = classifier or info.get("classifier") or ""
    if not classifier:
        return w.HTML("<h3>No model bundles yet</h3><p>Run <code>make demo</code> or "
                      "<code>cxrbench demo prepare</code> first, or pass a classifier bundle.</p>")
    pipeline = Pipeline.from_paths(classifier, ood=ood or info.get("ood") or None,
                                   unet=unet or info.get("unet") or None)
    pipeline.warm_up()  # before the page shows: the first upload then costs what every later one does
    return Dashboard(pipeline, examples=info.get("examples") or {})
