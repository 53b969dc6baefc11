"""What the dashboard tells a reader about one image, in plain words a reader will not misread.

The gate's answer is one of three verdicts (and "fine"):

- ``unreadable``, *not an image we can read*: the file could not be decoded (the reader's error);
- ``not_chest``, *not a frontal chest radiograph*: the blank-image guard failed (too small, almost no image
  content) or the OOD score lies beyond the card's *far* cutoff (``ood["far_cutoff"]``);
- ``unlike_training``, *a chest radiograph unlike the training images*: the score lies between the near
  cutoff (``ood["cutoff"]``) and the far one -- a child, another scanner, another projection. The numbers
  were measured on images like the training ones, so they are withheld unless the reader asks
  ("analyse anyway").

An older card without a far cutoff has one cutoff and two outcomes: ``chest`` or ``unrecognised``. Next to
the verdict goes the gate's own false-rejection rate on validation chest X-rays, from the card.

Also here: the caption of an explanation overlay, the test for a map without evidence, and the one line
that names the loaded models.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrbench.explain.targets import ALL_FINDINGS
from cxrbench.inference.pipeline import Pipeline, Report

__all__ = ["GUARD_CHECKS", "VERDICT_KINDS", "Verdict", "error_verdict", "explanation_caption", "false_rejection_line",
           "gate_verdict", "is_flat_map", "model_line", "no_evidence_text"]

#: the blank-image guard's checks (``OODResult.check``); "reconstruction" is the score itself
GUARD_CHECKS = ("size", "information")
VERDICT_KINDS = ("chest", "unlike_training", "not_chest", "unrecognised", "unreadable", "no_gate")
_COLOURS = {"chest": "#1e7b34", "unlike_training": "#b36b00", "not_chest": "#b00020", "unrecognised": "#b00020",
            "unreadable": "#b00020", "no_gate": "#555"}
_MARKS = {"chest": "✔", "unlike_training": "⚠", "not_chest": "✘", "unrecognised": "✘", "unreadable": "✘",
          "no_gate": "ⓘ"}


@dataclass(frozen=True)
class Verdict:
    """``kind`` (one of :data:`VERDICT_KINDS`), a ``headline`` and a ``detail`` in plain words, whether
    probabilities are shown, and the gate's false-rejection line (``""`` when unknown or not relevant)."""

    kind: str
    headline: str
    detail: str
    shows_numbers: bool
    false_rejection: str = ""
    overridden: bool = False

    def html(self) -> str:
        """The verdict as HTML for the dashboard (class ``cxr-verdict-<kind>``; ``cxr-rejected`` when withheld)."""
        rejected = " cxr-rejected" if self.kind != "chest" and not self.shows_numbers else ""
        extra = (f"<br><small style='color:#555'>{html.escape(self.false_rejection)}</small>"
                 if self.false_rejection else "")
        return (f"<div class='cxr-verdict-{self.kind}{rejected}' style='color:{_COLOURS[self.kind]};line-height:1.35'>"
                f"<b style='font-size:15px'>{_MARKS[self.kind]} {html.escape(self.headline)}</b><br>"
                f"<span style='color:#333'>{html.escape(self.detail)}</span>{extra}</div>")


def error_verdict(name: str, reason: str) -> Verdict:
    """*Not an image we can read*: ``name`` could not be decoded for ``reason``."""
    return Verdict("unreadable", "Not an image we can read",
                   f"{name}: {reason}. Nothing from the previous image is shown; try another file "
                   "(PNG, JPEG, TIFF, BMP or DICOM).", shows_numbers=False)


def false_rejection_line(ood_card: Mapping[str, Any]) -> str:
    """``"The gate turns away 5.0 % of validation chest X-rays (48 images; 1.0 % as not a chest radiograph)."``
    from the card's ``false_rejection`` (older cards: ``rejected_fraction.val``); ``""`` when the card has none."""
    rec = ood_card.get("false_rejection") or {}
    near, n, far = rec.get("near"), rec.get("n_images"), rec.get("far")
    if near is None:
        old = (ood_card.get("rejected_fraction") or {}).get("val") or {}
        near, n = old.get("bundle_cutoff"), old.get("n_images")
    if near is None:
        return "The gate's false-rejection rate on chest X-rays is not recorded in its card."
    far_text = f"; {far:.1%} as not a chest radiograph" if far is not None else ""
    return (f"The gate turns away {near:.1%} of validation chest X-rays like the training ones "
            f"({n if n is not None else '?'} images{far_text}).")


def gate_verdict(report: Report, ood_card: Mapping[str, Any] | None) -> Verdict:
    """The verdict on an analysed ``report`` under the OOD card's cutoffs (``ood_card`` = ``card.ood``, None
    without an OOD model). The blank-image guard's failures (``report.ood.check`` in :data:`GUARD_CHECKS`) come
    first; a gate without a far cutoff has two outcomes."""
    o = report.ood
    numbers = report.raw is not None
    if o is not None and getattr(o, "check", "") in GUARD_CHECKS:
        return _guard_verdict(report)
    if o is None or ood_card is None or not o.scorer:
        detail = ("The image passed the blank-image check; no OOD model checks that it is a chest X-ray like the "
                  "training images." if o is not None else "Every image is analysed, whatever it shows.")
        return Verdict("no_gate", "No OOD gate model loaded", detail, numbers)
    line = false_rejection_line(ood_card)
    far = (ood_card.get("far_cutoff") or {}).get("threshold")
    score = f"{o.scorer} score {o.score:.3f}"
    if o.score <= o.cutoff:
        return Verdict("chest", "A frontal chest radiograph like the training images",
                       f"{score}, within the cutoff {o.cutoff:.3f}.", numbers, line)
    anyway = ("Analysed anyway because you asked: treat every number below with suspicion." if numbers else
              "No prediction is shown; tick “analyse anyway” to see the numbers regardless.")
    if far is None:
        return Verdict("unrecognised", "Not recognised as a chest radiograph like the training images",
                       f"{score} is beyond the cutoff {o.cutoff:.3f}. This gate has one cutoff, so it cannot tell "
                       f"a different chest X-ray from a non-chest image. {anyway}", numbers, line, report.overridden)
    if o.score <= float(far):
        return Verdict("unlike_training", "A chest radiograph unlike the training images",
                       f"{score} lies between the near cutoff {o.cutoff:.3f} and the far cutoff {float(far):.3f}: "
                       "it looks like a chest X-ray, but not like the images the model learned from (a child, "
                       "another scanner or projection). The model's accuracy and operating points were measured "
                       f"on images like the training ones and may not hold here. {anyway}",
                       numbers, line, report.overridden)
    return Verdict("not_chest", "Not a frontal chest radiograph",
                   f"{score} is beyond the far cutoff {float(far):.3f}: the image is unlike any chest X-ray the gate "
                   f"knows (red in the error map marks where its reconstruction fails). {anyway}",
                   numbers, line, report.overridden)


def _guard_verdict(report: Report) -> Verdict:
    o = report.ood
    if report.raw is not None:
        tail = "Analysed anyway because you asked: the numbers mean nothing for such an image."
    elif getattr(o, "overridable", False):
        tail = "No prediction is shown (“analyse anyway” would show numbers that mean nothing here)."
    else:
        tail = "No prediction is made for it."
    return Verdict("not_chest", "Not a frontal chest radiograph",
                   f"The image fails the blank-image check: {getattr(o, 'reason', '') or getattr(o, 'check', '')}. "
                   f"{tail}", report.raw is not None, "", report.overridden)


def is_flat_map(heat: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether an ``(H, W)`` explanation map is constant (all zero after min-max scaling): no evidence shown."""
    heat = np.asarray(heat, dtype=np.float64)
    return heat.size == 0 or float(np.ptp(heat)) <= tol


def no_evidence_text(method: str, label: str) -> str:
    """What to say instead of a flat colour wash."""
    what = "any finding" if label == ALL_FINDINGS else label
    return f"This method ({method}) finds no evidence for {what} here: its map is constant, so none is drawn."


def explanation_caption(report: Report, label: str) -> str:
    """``"gradcam · Effusion · 128 px model input"``: what an overlay shows."""
    size = report.image.shape[-1]
    return f"{report.method} · {label} · {size} px model input"


def model_line(pipeline: Pipeline) -> str:
    """``"classifier resnet18, 128 px, 14 findings · gate autoencoder, 64 px"``: which models gave a result."""
    card = pipeline.classifier.card
    arch = card.builder_kwargs.get("arch", card.builder)
    text = f"classifier {arch}, {card.preprocessing.size} px, {len(card.labels)} findings"
    if pipeline.ood is not None:
        text += f" · gate {pipeline.ood.card.builder}, {pipeline.ood.card.preprocessing.size} px"
    return text + f" · {pipeline.classifier_backend.name}"
