"""The upload-and-explain app: ipywidgets around a :class:`~cxrbench.inference.pipeline.Pipeline`.

``notebooks/05_dashboard.ipynb`` builds a :class:`Dashboard` and displays it; Voila serves that
notebook as a local web app. All logic is here so it can be driven without a browser: set
``dashboard.upload.value`` (or call :meth:`Dashboard.analyze_bytes`) and read the widgets.

Privacy: uploads are decoded in memory (never written to disk), the models run in this kernel, and
the page loads nothing from outside (plotly.js comes from the local Jupyter extension).
"""

from __future__ import annotations

import html
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cxrbench._threads import other_demand, use_interactive_threads
from cxrbench.app.counterfactual import CounterfactualPanel
from cxrbench.app.pictures import png_bytes
from cxrbench.app.snapshot import dashboard_html, served_by_voila
from cxrbench.app.verdict import (
    error_verdict,
    explanation_caption,
    gate_verdict,
    is_flat_map,
    model_line,
    no_evidence_text,
)
from cxrbench.evaluation.reliability import WEAK_MACRO_AUC, finding_reliability, model_warning
from cxrbench.explain.targets import ALL_FINDINGS, is_summed
from cxrbench.inference.pipeline import Pipeline, Report
from cxrbench.io import ImageReadError
from cxrbench.models.bundle import format_metric
from cxrbench.models.card import operating_points_sentence
from cxrbench.plots.app import probability_figure

__all__ = ["CALIBRATION_NOTE", "WEAK_MACRO_AUC", "Dashboard", "colour_bar_html", "dashboard_from_environment",
           "model_summary", "plotly_output", "png_bytes", "probability_figure", "shared_demo_info",
           "show_dashboard"]

CALIBRATION_NOTE = ("Calibrated probabilities: 0.5 marks each finding's operating point (the threshold that "
                    "best separated positives from negatives on the validation split, Chester Eq. 1). "
                    "Hover a bar for the raw model output. Not a diagnosis.")
UPLOAD_ACCEPT = ".png,.jpg,.jpeg,.dcm,.dicom,.tif,.tiff,.bmp"


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
    if sentence := operating_points_sentence(card):
        lines.append(esc(sentence))
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
        far = pipeline.ood.card.ood.get("far_cutoff") or {}
        if far.get("threshold") is not None:
            lines.append(f"Beyond {float(far['threshold']):.3f} it is called not a chest radiograph "
                         f"({esc(str(far.get('method', '?')))}); in between, a chest radiograph unlike the training "
                         "images.")
    else:
        lines.append("<b>No OOD gate model</b>: only the blank-image guard checks the images.")
    lines[1:1] = _published_lines(card)
    g = pipeline.guard
    lines.append(f"<b>Blank-image guard</b> ({esc(g.method)}): an image needs at least {g.min_side} px on its short "
                 f"side, {g.min_bits_per_pixel:.2f} bits/pixel and an intensity spread of {g.min_spread:.3f}.")
    body = "".join(f"<p style='margin:2px 0'>{line}</p>" if not line.startswith("<table") else line for line in lines)
    return f"<details class='cxr-about'><summary>About these models</summary><small>{body}</small></details>"


def _published_lines(card: Any) -> list[str]:
    """``model_summary``'s lines for imported weights: what they never trained, where they come from."""
    esc, lines = html.escape, []
    if card.untrained:
        lines.append(f"<b>Not trained by this model</b> (no probability, metric or explanation): "
                     f"{esc(', '.join(card.untrained))}.")
    if card.source:
        src = card.source
        lines.append(f"Published weights: {esc(str(src.get('origin', '?')))} {esc(str(src.get('weights', '')))}; "
                     f"licence: {esc(str(src.get('licence', '?')))}; cite: {esc(str(src.get('citation', '?')))}")
    if card.operating_points.get("published"):
        lines.append("Operating points re-fitted with <code>cxrbench calibrate</code>; the published ones are kept "
                     "in the card.")
    return lines


class Dashboard:
    """The widgets and their callbacks. ``dashboard.widget`` is what a notebook displays.

    Parameters
    ----------
    pipeline : the models (loaded once, before the first upload).
    examples : display name -> image path, offered in the example picker.

    A new image (upload or example) first clears everything shown for the previous one; an unreadable file
    leaves only its verdict. Changing the method or the finding recomputes only the explanation, from the
    cached report (:meth:`Pipeline.explain <cxrbench.inference.pipeline.Pipeline.explain>`).
    """

    METHODS = ("saliency", "gradcam", "cam", "saliency_per_finding")
    #: default display smoothing: gradient saliency is pixel-level speckle; σ = 2 px shows where it gathers
    SMOOTHING = 2.0
    #: colormap of the overlays (:func:`cxrbench.explain.overlay.overlay`)
    CMAP = "jet"
    #: the captions of the gate's thumbnails: its input, its reconstruction, the error
    GATE_IMAGES = ("gate input, 64 px", "its reconstruction", "error: red = poorly rebuilt")

    def __init__(self, pipeline: Pipeline, examples: Mapping[str, str | Path] | None = None):
        self.pipeline = pipeline
        self.examples = {k: str(v) for k, v in (examples or {}).items()}
        self.report: Report | None = None
        self.figure: Any = None  # the plotly Figure of the last report (plotly is imported by plots.app)
        self._source: tuple[str, bytes] | None = None
        self._quiet = False
        test = pipeline.classifier.card.test_metrics
        per_finding = test.get("per_finding") or {}
        self.reliability = finding_reliability(per_finding, pipeline.findings) if per_finding else None
        self.model_warning = model_warning(test)
        self._build_inputs()
        self._build_outputs()
        other_demand()  # the thread rule's first, 0.1 s sample is taken here, not in the first upload
        self.counterfactual = CounterfactualPanel(pipeline, lambda: self.report, lambda: self.finding.value)
        self._observe()
        self.widget = self._layout()

    def _build_inputs(self) -> None:
        import ipywidgets as w

        self.upload = w.FileUpload(accept=UPLOAD_ACCEPT, multiple=False, description="Upload X-ray")
        self.upload.add_class("cxr-upload")
        longest = max((len(k) for k in self.examples), default=20)
        self.example = w.Dropdown(options=["(choose an example)", *self.examples], description="or example",
                                  layout=w.Layout(width=f"{min(longest, 110) + 14}ch", max_width="100%"))
        self.example.add_class("cxr-example")
        self.override = w.Checkbox(value=False, description="analyse anyway, even if not recognised as a chest "
                                   "X-ray like the training images", indent=False,
                                   layout=w.Layout(width="auto", display="none"))
        self.override.add_class("cxr-override")
        self.method = w.Dropdown(options=list(self.METHODS), value="saliency", description="explain with")
        self.method.add_class("cxr-method")
        self.finding = w.Dropdown(options=[f for f in self.pipeline.findings if f not in self.pipeline.untrained],
                                  description="finding", disabled=True)
        self.finding.add_class("cxr-finding")
        self.opacity = w.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="opacity")
        self.hide_below = w.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.05, description="hide below",
                                        tooltip="map values under this fraction of the maximum are not drawn, "
                                                "so the anatomy shows through")
        self.smoothing = w.FloatSlider(value=self.SMOOTHING, min=0.0, max=8.0, step=0.5, description="smoothing",
                                       tooltip="Gaussian σ in model-input pixels (display only; 0 = the raw map)")

    def _build_outputs(self) -> None:
        import ipywidgets as w

        def html_widget(css: str, value: str = "", **layout: Any) -> Any:
            widget = w.HTML(value, layout=w.Layout(**layout))
            widget.add_class(css)
            return widget

        self.busy = html_widget("cxr-busy")
        self.message = html_widget("cxr-message")
        self.verdict = html_widget("cxr-verdict")
        self.banner = html_widget("cxr-banner", display="none")  # the weak-model warning, above the bars
        self.ood_images = w.HBox([])
        self.ood_images.add_class("cxr-ood-images")
        self.bars = w.Output()
        self.bars.add_class("cxr-bars")
        self.note = html_widget("cxr-note", f"<div style='line-height:1.3'><small>{html.escape(CALIBRATION_NOTE)}"
                                "</small></div>", width="650px",
                                display="none")  # shown with the bars
        self.overlay = w.Image(format="png", layout=w.Layout(width="384px", height="384px", object_fit="contain",
                                                             visibility="hidden"))
        self.overlay.add_class("cxr-overlay")
        self.caption = html_widget("cxr-caption", width="384px")
        self.caption.add_class("cxr-tight")
        self.colour_bar = html_widget("cxr-colour-bar", colour_bar_html(self.CMAP), width="384px", display="none")
        self.timing = html_widget("cxr-timing")
        # the gate's three thumbnails, made once: each upload changes only their pictures (a new widget per
        # upload costs the page a model and a view each)
        self._tile_images = [w.Image(format="png", layout=w.Layout(width="64px", height="64px"))
                             for _ in self.GATE_IMAGES]
        self._gate_tiles = [w.HBox([im, w.HTML(f"<div style='line-height:1.2;width:80px'><small>{t}</small></div>")],
                                   layout=w.Layout(width="210px", align_items="center"))
                            for im, t in zip(self._tile_images, self.GATE_IMAGES)]

    def _observe(self) -> None:
        self.upload.observe(self._on_upload, names="value")
        self.example.observe(self._on_example, names="value")
        self.override.observe(lambda _: self._rerun(), names="value")
        self.method.observe(self._on_method, names="value")
        self.finding.observe(self._on_finding, names="value")
        self.opacity.observe(lambda _: self._draw_overlay(), names="value")
        self.smoothing.observe(lambda _: self._draw_overlay(), names="value")
        self.hide_below.observe(lambda _: self._draw_overlay(), names="value")

    def _layout(self):
        import ipywidgets as w

        header = w.HTML("<style>.cxr-tight .widget-html-content, .cxr-timing .widget-html-content "
                        "{line-height: 1.3}</style><div class='cxr-header'>"
                        "<b style='font-size:20px'>cxrbench · chest X-ray check</b> "
                        "<span style='color:#555'>· analysed in this Python kernel on this machine; nothing is "
                        "uploaded anywhere else. Not a diagnosis.</span></div>")
        self.about = w.HTML(model_summary(self.pipeline))
        self.about.add_class("cxr-about")
        inputs = w.HBox([self.upload, self.example],
                        layout=w.Layout(flex_flow="row wrap", align_items="center", grid_gap="4px 16px"))
        inputs.add_class("cxr-inputs")
        left = w.VBox([self.busy, self.verdict, self.override, self.ood_images, self.banner, self.bars, self.note,
                       self.counterfactual.widget],
                      layout=w.Layout(width="660px", min_width="660px"))
        left.add_class("cxr-left")
        self.controls = w.GridBox([self.method, self.finding, self.opacity, self.smoothing, self.hide_below],
                                  layout=w.Layout(grid_template_columns="1fr", width="384px", display="none"))
        right = w.VBox([self.overlay, self.caption, self.colour_bar, self.controls],
                       layout=w.Layout(width="400px", min_width="400px"))
        right.add_class("cxr-right")
        body = w.HBox([left, right], layout=w.Layout(align_items="flex-start", grid_gap="24px"))
        body.add_class("cxr-result")
        return w.VBox([header, inputs, self.message, body, self.timing, self.about])

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live widget for Jupyter and Voila, and ``text/html``, its static snapshot
        (:func:`cxrbench.app.snapshot.dashboard_html`), for pages without a kernel (the exported HTML)."""
        data = self.widget._repr_mimebundle_(**kwargs) or {}
        data["text/html"] = dashboard_html(self)
        return data

    # ------------------------------------------------------------------ entry points
    def analyze_bytes(self, name: str, content: bytes) -> Report | None:
        """Analyse an uploaded file's bytes (never written to disk). Errors become the verdict."""
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
        self.example.value = self.example.options[0]  # the picker no longer names the previous image
        content = item["content"]
        self.analyze_bytes(item["name"], content.tobytes() if hasattr(content, "tobytes") else content)

    def _on_example(self, change: dict[str, Any]) -> None:
        name = change["new"]
        if name in self.examples:
            self.analyze_path(self.examples[name])

    def _on_method(self, change: dict[str, Any]) -> None:
        self.finding.disabled = is_summed(change["new"])  # one map of all findings: no finding to choose
        self._reexplain()

    def _on_finding(self, change: dict[str, Any]) -> None:
        self.counterfactual.clear()  # it was of the previous finding
        self._reexplain()

    def _rerun(self) -> None:
        if self._source is not None:
            self._run()

    def _reexplain(self) -> None:
        """The explanation of the cached report again, for the chosen method and finding (no classifier run)."""
        r = self.report
        if self._quiet or r is None or r.raw is None:
            return
        method = self.method.value
        targets = None if is_summed(method) else self.finding.value
        if r.method == method and (targets is None or r.map_labels == [targets]):
            return self._draw_overlay()  # that map is already there
        t0 = time.perf_counter()
        try:
            use_interactive_threads()  # the load may have changed since the upload
            self.report = self.pipeline.explain(r, method, targets)
        except Exception as exc:  # a message instead of a traceback; the probabilities stay
            self.message.value = (f"<div style='color:#b00020'>Could not explain with {html.escape(method)}: "
                                  f"{html.escape(str(exc))}</div>")
            self._last_traceback = traceback.format_exc()
            return
        self.message.value = ""
        self._draw_overlay()
        self._show_timing(self.report, time.perf_counter() - t0, "explanation only")

    # ------------------------------------------------------------------ work
    def _run(self, source: tuple[str, bytes] | None = None) -> Report | None:
        """Analyse ``source`` (a new image: the previous one's results go first) or the current image again."""
        if source is not None:
            self.clear()
        source = source or self._source
        assert source is not None
        name, content = source
        self.busy.value = f"<span class='cxr-spinner'>⏳ analysing {html.escape(name)}…</span>"
        t0 = time.perf_counter()
        try:
            targets = None if is_summed(self.method.value) else self.finding.value
            use_interactive_threads()  # 1 thread while other processes hold the cores (cxrbench/_threads.py)
            # no lung mask: nothing here shows one, and the U-Net took as long as the classifier
            report = self.pipeline.analyze(content, name=name, explain=self.method.value, targets=targets,
                                           allow_ood=self.override.value, segment=False)
        except ImageReadError as exc:
            self._failed(exc.source, exc.reason)
            return None
        except Exception as exc:  # a verdict instead of a traceback
            self._last_traceback = traceback.format_exc()
            self._failed(name, f"could not be analysed ({exc})")
            return None
        finally:
            self.busy.value = ""
        self.message.value = ""
        self.report, self._source = report, source
        self._render(report, time.perf_counter() - t0)
        return report

    def clear(self) -> None:
        """Remove everything shown for the current image: verdict, thumbnails, bars, overlay, caption, timing."""
        self.report, self._source, self.figure = None, None, None
        self.verdict.value = self.message.value = self.caption.value = self.timing.value = ""
        self.ood_images.children = []
        self.bars.outputs = ()
        self.note.layout.display = self.banner.layout.display = self.colour_bar.layout.display = "none"
        self.overlay.layout.visibility = "hidden"
        self.overlay.value = b""
        self.controls.layout.display = "none"
        self.override.layout.display = "none"
        self.counterfactual.clear()
        self.counterfactual.widget.layout.display = "none"

    def _failed(self, name: str, reason: str) -> None:
        self.clear()
        self.example.value = self.example.options[0]
        self.verdict.value = error_verdict(name, reason).html()

    def _render(self, report: Report, seconds: float) -> None:
        self._render_verdict(report)
        # "analyse anyway" only where the gate turned the image away; the explanation controls with a prediction
        self.override.layout.display = "" if report.rejected or report.overridden else "none"
        self.controls.layout.display = "" if report.raw is not None else "none"
        self.counterfactual.widget.layout.display = self.controls.layout.display  # on request only, never here
        # outputs are set, never cleared with clear_output(wait=True): a deferred clear that no new output
        # follows (a rejected image) would leave the previous image's bars on the page
        self.bars.outputs = ()
        shown = report.raw is not None
        self.note.layout.display = "" if shown else "none"
        self.banner.value = (f"<div style='background:#fdecea;color:#8a1c12;padding:3px 8px;border-radius:4px;"
                             "line-height:1.35'>"
                             f"⚠ {html.escape(self.model_warning)}</div>") if self.model_warning else ""
        self.banner.layout.display = "" if shown and self.model_warning else "none"
        if shown:
            if is_summed(self.method.value):  # preselect the most probable finding for per-finding methods
                self._quiet = True
                self.finding.value = report.table()["finding"].iloc[0]
                self._quiet = False
            self.figure = probability_figure(report, self.reliability)
            self.bars.outputs = (plotly_output(self.figure),)  # set directly: works with or without a kernel
        self._draw_overlay()
        self._show_timing(report, seconds)
        self._show_gate_images(report)

    def _show_timing(self, report: Report, seconds: float, what: str = "") -> None:
        stages = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in report.timings.items() if k != "total")
        if what:
            stages = f"{what}: {report.timings.get('explain', seconds) * 1000:.0f} ms"
        self.timing.value = (f"<small>{html.escape(report.source)}: {seconds:.2f} s ({stages}) · "
                             f"{html.escape(model_line(self.pipeline))}</small>")

    def _show_gate_images(self, report: Report) -> None:
        o = report.ood
        if o is None or o.input is None or o.reconstruction is None or o.error is None:  # no OOD model, or not scored
            self.ood_images.children = []
            return
        from cxrbench.explain.overlay import error_overlay

        for image, picture in zip(self._tile_images, (o.input, o.reconstruction, error_overlay(o.input, o.error))):
            image.value = png_bytes(picture)
        self.ood_images.children = self._gate_tiles

    def _render_verdict(self, report: Report) -> None:
        self.verdict.value = gate_verdict(report, self.pipeline.ood.card.ood if self.pipeline.ood else None).html()

    def _draw_overlay(self) -> None:
        from cxrbench.explain.base import gaussian_smooth
        from cxrbench.explain.overlay import overlay

        r = self.report
        self.overlay.layout.visibility = "hidden" if r is None else "visible"
        self.colour_bar.layout.display = "none"
        if r is None:
            return
        if r.maps is None:
            self.overlay.value = png_bytes(r.image)
            self.caption.value = (f"<small>the image at the model's input ({r.image.shape[-1]} px); no explanation "
                                  "without a prediction</small>")
            self.overlay.layout.visibility = "visible"
            return
        k = 0
        if not is_summed(r.method or "") and self.finding.value in r.map_labels:
            k = r.map_labels.index(self.finding.value)
        label = r.map_labels[k] if r.map_labels else ALL_FINDINGS
        if is_flat_map(r.maps[k]):  # say so instead of painting a flat wash
            self.overlay.value = png_bytes(r.image)
            said = html.escape(no_evidence_text(r.method or "", label))
            self.caption.value = (f"<small class='cxr-no-evidence'><b>{said}</b><br>"
                                  f"{html.escape(explanation_caption(r, label))}</small>")
            return
        heat = gaussian_smooth(r.maps[k], float(self.smoothing.value))
        threshold = float(self.hide_below.value) or None
        self.overlay.value = png_bytes(overlay(r.image, heat, cmap=self.CMAP, alpha=float(self.opacity.value),
                                               threshold=threshold))
        self.caption.value = f"<small>{html.escape(explanation_caption(r, label))}</small>"
        self.colour_bar.layout.display = ""


def plotly_output(figure: Any) -> dict[str, Any]:
    """A plotly figure as a Jupyter display-data output (for ``Output.outputs``), without plotly's logo."""
    spec = json.loads(figure.to_json())
    spec["config"] = {"displaylogo": False, "responsive": False}
    return {"output_type": "display_data", "metadata": {},
            "data": {"application/vnd.plotly.v1+json": spec, "text/plain": "calibrated probabilities (plotly)"}}


def colour_bar_html(cmap: str = "jet", stops: int = 9) -> str:
    """A horizontal colour bar of ``cmap`` (CSS gradient) from "low" to "high" (the map's own maximum)."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.linspace(0, 1, stops))
    css = ", ".join(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}" for r, g, b, _ in colours)
    return ("<div style='display:flex;align-items:center;gap:6px;font-size:11px;color:#555'><span>low</span>"
            f"<div style='flex:1;height:10px;background:linear-gradient(to right, {css})'></div>"
            "<span>high (the map's maximum)</span></div>")


def shared_demo_info(data: str | Path | None = None) -> dict[str, Any]:
    """The dashboard's bundles from the shared cache (:func:`cxrbench.train.shared.shared_bundle`: the demo
    classifier and OOD gate and the lung U-Net, each trained once, announced, when missing) and held-out examples."""
    from cxrbench.app.demo import demo_examples
    from cxrbench.train.shared import ENTRY_FILE, shared_bundle

    found = {key: shared_bundle(name, data) for key, name in (("classifier", "nih-classifier"),
                                                             ("ood", "ood-autoencoder"), ("unet", "lung-unet"))}
    entry = json.loads((found["classifier"].parents[1] / ENTRY_FILE).read_text())
    examples = demo_examples(Path(entry["data"]), entry["kind"], bundles=(found["classifier"], found["ood"]))
    return {**{k: str(v) for k, v in found.items()}, "examples": examples}


def dashboard_from_environment(classifier: str = "", ood: str = "", unet: str = "",
                               demo_info: str | Path = "", autoencoder: str = "", shared: bool = False) -> Any:
    """The dashboard for the bundles named here, else in ``$CXRBENCH_DEMO`` (JSON), else ``build/demo/demo.json``,
    else (``shared``) the shared cache's (:func:`shared_demo_info`).

    ``autoencoder`` (or the JSON's ``"autoencoder"``): a bundle of ``cxrbench train autoencoder --like`` the
    classifier, for the "Counterfactual (slow)" button. Returns the :class:`Dashboard`'s widget, or an HTML
    message that says how to get bundles.
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
    if not (classifier or info.get("classifier")) and shared:
        info = shared_demo_info()
    classifier = classifier or info.get("classifier") or ""
    if not classifier:
        return w.HTML("<h3>No model bundles yet</h3><p>Run <code>make demo</code> or "
                      "<code>cxrbench demo prepare</code> first, or pass a classifier bundle (or shared = True: the "
                      "shared bundles of <code>cxrbench bundles prepare</code>).</p>")
    pipeline = Pipeline.from_paths(classifier, ood=ood or info.get("ood") or None,
                                   unet=unet or info.get("unet") or None,
                                   autoencoder=autoencoder or info.get("autoencoder") or None)
    pipeline.warm_up(segment=False)  # before the page shows: the first upload then costs what every later one
    # does (its reports skip the U-Net, so the warm-up does too)
    return Dashboard(pipeline, examples=info.get("examples") or {})


def show_dashboard(app: Any, image: str | os.PathLike = "", *, snapshot: bool = True) -> Any:
    """What notebook 05 displays: ``app`` (a :class:`Dashboard`, or the message that there are no bundles).

    Outside Voila (``snapshot`` and not :func:`served_by_voila`) a dashboard first analyses ``image`` (default: its
    first example), so its static form (:func:`dashboard_html`) shows a result; in Voila nothing is analysed
    before the user asks. A missing ``image`` is a ``FileNotFoundError`` naming it.
    """
    if not isinstance(app, Dashboard) or not snapshot or served_by_voila():
        return app
    if image:
        if not Path(image).is_file():
            raise FileNotFoundError(f"{image}: no such image to analyse for the dashboard's snapshot")
        app.analyze_path(Path(image))
    elif app.examples:
        app.example.value = next(iter(app.examples))  # as if picked: the picker names the image shown
    return app
