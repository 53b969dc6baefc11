"""The dashboard's "Counterfactual (slow)" panel: Latent Shift on request, never on upload.

A click runs :meth:`Pipeline.counterfactual <cxrbench.inference.pipeline.Pipeline.counterfactual>` for the
finding chosen in the dashboard and shows the difference map over the image and a few frames, each with the
finding's probability on it (the classifier's raw sigmoid output for that frame). Without an autoencoder bundle
the button is disabled and the panel says how to train one.
"""

from __future__ import annotations

import html
import time
import traceback
from collections.abc import Callable

import numpy as np

from cxrbench.app.pictures import png_bytes
from cxrbench.explain.latent_shift import Counterfactual
from cxrbench.inference.pipeline import Pipeline, Report

__all__ = ["BUTTON_LABEL", "CounterfactualPanel", "frame_indices", "frame_captions"]

BUTTON_LABEL = "Counterfactual (slow)"
NO_AUTOENCODER_NOTE = ("Counterfactuals need an autoencoder at the classifier's resolution: "
                       "<code>cxrbench train autoencoder --like CLASSIFIER --data DATA --out RUN</code>, then "
                       "start the dashboard with its bundle.")


def frame_indices(n_frames: int, shown: int = 4) -> list[int]:
    """Which of ``n_frames`` frames to show: ``shown`` evenly spaced ones, always the first and the last."""
    if n_frames < 1:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, min(shown, n_frames))})


def frame_captions(cf: Counterfactual, indices: list[int], finding: str) -> list[str]:
    """One caption per shown frame: its shift and the probability of ``finding`` on it."""
    captions = []
    for i in indices:
        what = "reconstruction" if i == 0 else ("counterfactual" if i == len(cf.lambdas) - 1 else f"step {i}")
        captions.append(f"{what} · λ {cf.lambdas[i]:.2f} · p({finding}) {cf.probabilities[i]:.2f}")
    return captions


class CounterfactualPanel:
    """A button and what it shows. ``finding`` and ``report`` are callables giving the dashboard's current ones."""

    SHOWN_FRAMES = 4

    def __init__(self, pipeline: Pipeline, report: Callable[[], Report | None], finding: Callable[[], str]) -> None:
        import ipywidgets as w

        self.pipeline, self._report, self._finding = pipeline, report, finding
        self.result: Counterfactual | None = None
        available = pipeline.autoencoder is not None
        self.button = w.Button(description=BUTTON_LABEL, disabled=not available, icon="hourglass-half",
                               tooltip="Latent Shift: what would have to change for the finding to go "
                                       "(a search through the autoencoder, a few seconds)",
                               layout=w.Layout(width="200px"))
        self.button.add_class("cxr-counterfactual")
        self.button.on_click(lambda _: self.run())
        self.status = w.HTML("" if available else f"<small>{NO_AUTOENCODER_NOTE}</small>",
                             layout=w.Layout(width="650px"))
        self.status.add_class("cxr-counterfactual-status")
        self.status.add_class("cxr-tight")
        self.difference = w.Image(format="png", layout=w.Layout(width="160px", height="160px", display="none"))
        self.difference.add_class("cxr-counterfactual-difference")
        self.frames = w.HBox([], layout=w.Layout(flex_flow="row nowrap", grid_gap="4px"))
        self.frames.add_class("cxr-counterfactual-frames")
        self.difference_caption = w.HTML("", layout=w.Layout(width="160px"))
        self.difference_caption.add_class("cxr-tight")
        difference = w.VBox([self.difference, self.difference_caption], layout=w.Layout(width="164px"))
        shown = w.HBox([difference, self.frames], layout=w.Layout(align_items="flex-start", grid_gap="12px"))
        self.widget = w.VBox([self.button, self.status, shown],
                             layout=w.Layout(display="none"))  # shown with a prediction (the dashboard decides)

    def clear(self) -> None:
        """Forget the last counterfactual (a new image, another finding)."""
        self.result = None
        self.status.value = "" if self.pipeline.autoencoder is not None else f"<small>{NO_AUTOENCODER_NOTE}</small>"
        self.difference.value, self.difference.layout.display = b"", "none"
        self.difference_caption.value = ""
        self.frames.children = []

    def run(self) -> Counterfactual | None:
        """Compute and show the counterfactual of the current report and finding; errors become a message."""
        report, finding = self._report(), self._finding()
        self.clear()
        if report is None or report.raw is None:
            self.status.value = "<small>No prediction to explain: analyse a chest X-ray first.</small>"
            return None
        self.status.value = f"<small>⏳ shifting the image away from {html.escape(finding)}…</small>"
        t0 = time.perf_counter()
        try:
            cf = self.pipeline.counterfactual(report, finding)
        except Exception as exc:  # a message instead of a traceback
            self._last_traceback = traceback.format_exc()
            self.status.value = (f"<div style='color:#b00020'>Could not compute the counterfactual: "
                                 f"{html.escape(str(exc))}</div>")
            return None
        self.result = cf
        self._show(cf, finding, time.perf_counter() - t0)
        return cf

    def _show(self, cf: Counterfactual, finding: str, seconds: float) -> None:
        import ipywidgets as w

        from cxrbench.explain.base import minmax_normalize
        from cxrbench.explain.overlay import overlay

        report = self._report()
        base = report.image if report is not None else cf.frames[0]  # the image as the model sees it
        self.difference.value = png_bytes(overlay(base, minmax_normalize(cf.difference), cmap="jet", alpha=0.5))
        self.difference.layout.display = ""
        self.difference_caption.value = "<small>|reconstruction − counterfactual| over the image</small>"
        indices = frame_indices(len(cf.frames), self.SHOWN_FRAMES)
        tiles = []
        for i, caption in zip(indices, frame_captions(cf, indices, finding)):
            tile = w.VBox([w.Image(value=png_bytes(cf.frames[i]), format="png",
                                   layout=w.Layout(width="92px", height="92px")),
                           w.HTML(f"<div style='line-height:1.2;width:92px'><small>{html.escape(caption)}"
                                  "</small></div>")], layout=w.Layout(width="96px"))
            tile.add_class("cxr-counterfactual-frame")
            tiles.append(tile)
        self.frames.children = tiles
        self.status.value = (
            f"<small><b>Latent Shift for {html.escape(finding)}</b>: raw p falls from {cf.probabilities[0]:.2f} "
            f"to {cf.probabilities[-1]:.2f} along the frames (the image itself: {cf.input_probability:.2f}). "
            "Left, over the image: the pixels that change where the prediction has fallen (red = most). "
            "Search stopped because "
            f"{html.escape(cf.stop)}; {seconds:.1f} s.</small>")
