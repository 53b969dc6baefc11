"""Say so when a model has no usable skill: a visible box above the numbers of a weak model.

A macro AUC of 0.56 on a small test split is shown by the same tables and curves as a working model; the
reader must be told that those numbers show the workflow, not a usable model. :func:`skill_box` turns a macro
AUC (and its bootstrap CI) into that warning, rendered as an HTML box in a notebook, Voila or the HTML
export, and as plain text elsewhere. :func:`skill_box_for` computes the numbers from labels and scores.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["NO_TEST_METRICS", "SKILL_FLOOR", "SkillBox", "skill_box", "skill_box_for", "skill_box_from_metrics",
           "skill_verdict"]

#: below this test macro AUC a classifier is shown as "no usable model"
SKILL_FLOOR = 0.75
#: where the effect is real on this machine's data
WHERE_IT_WORKS = ("the paediatric pneumonia task (notebook 06, or a classifier trained on "
                  "<code>cxr/pediatric</code>) or the synthetic phantoms (the last section of notebook 04), "
                  "where the models do learn")
#: the reason of a card without test metrics: nothing measured, rather than a measured lack of skill
NO_TEST_METRICS = ("its card records no test metrics (a bundle without a training run, e.g. of cxrbench import); "
                   "measure it on labelled images with notebook 02 (bundle) or cxrbench evaluate")


def _finite(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def skill_verdict(macro_auc: float, ci_low: float = math.nan, ci_high: float = math.nan, *,
                  floor: float = SKILL_FLOOR) -> str | None:
    """Why the numbers of a model with this macro AUC do not show a usable model, or None when they may.

    Weak when the AUC is below ``floor``, when its CI reaches 0.5 (or lies wholly below it), or when it is
    undefined.
    """
    auc, low, high = _finite(macro_auc), _finite(ci_low), _finite(ci_high)
    if math.isnan(auc):
        return "its macro AUC is undefined (no finding has both positives and negatives in the test split)"
    if (not math.isnan(high) and high < 0.5) or (math.isnan(high) and auc < 0.5):
        return "its macro AUC is below chance (0.5): it ranks these images worse than a coin"
    if not math.isnan(low) and low <= 0.5:
        return "the 95 % CI of its macro AUC reaches 0.5 (chance): it may rank images no better than a coin"
    if auc < floor:
        return f"its macro AUC is below {floor:.2f}, too weak to read any single probability"
    return None


@dataclass(frozen=True)
class SkillBox:
    """The verdict on one model's macro AUC, shown as a coloured box (``_repr_html_``) or as text."""

    macro_auc: float
    ci_low: float
    ci_high: float
    subject: str
    reason: str | None

    @property
    def weak(self) -> bool:
        """True when the box is a warning (the numbers show the workflow, not a usable model)."""
        return self.reason is not None

    def _numbers(self) -> str:
        ci = (f" (95 % CI {self.ci_low:.3f}-{self.ci_high:.3f})"
              if not (math.isnan(self.ci_low) or math.isnan(self.ci_high)) else "")
        return f"macro AUC {self.macro_auc:.3f}{ci}" if not math.isnan(self.macro_auc) else "macro AUC undefined"

    def text(self) -> str:
        """The message as plain text (no HTML)."""
        if not self.weak:
            return f"{self.subject}: {self._numbers()}, above the {SKILL_FLOOR:.2f} floor of this workbench."
        if self.reason == NO_TEST_METRICS:
            return f"Skill not measured: {self.subject}: {self.reason}. Until then, read what follows as the workflow."
        where = html.unescape(WHERE_IT_WORKS.replace("<code>", "").replace("</code>", ""))
        return (f"Not a usable model: {self.subject} has {self._numbers()}; {self.reason}. The numbers below show "
                f"the workflow, not a usable model. For an effect that is real, see {where}.")

    def _repr_html_(self) -> str:
        if not self.weak:
            return (f'<div class="cxr-skill cxr-skill-ok" style="border-left:4px solid #2e7d32;padding:4px 10px;'
                    f'margin:6px 0;background:#eef7ee">{html.escape(self.text())}</div>')
        style = ('<div class="cxr-skill cxr-skill-weak" role="alert" style="border:1px solid #c77700;'
                 'border-left:6px solid #c77700;background:#fff4e0;padding:8px 12px;margin:8px 0">')
        if self.reason == NO_TEST_METRICS:
            return (f"{style}<b>&#9888; Skill not measured.</b> {html.escape(self.subject)}: "
                    f"{html.escape(self.reason)}.<br>Until then, read what follows as the workflow.</div>")
        return (f"{style}<b>&#9888; Not a usable model.</b> {html.escape(self.subject)} has {self._numbers()}: "
                f"{html.escape(self.reason or '')}.<br>The numbers below show <b>the workflow, not a usable "
                f"model</b>. For an effect that is real, see {WHERE_IT_WORKS}.</div>")

    def __repr__(self) -> str:
        return self.text()


def skill_box(macro_auc: float, ci: Sequence[float] | Any = None, *, subject: str = "this model",
              floor: float = SKILL_FLOOR) -> SkillBox:
    """A :class:`SkillBox` for a macro AUC and its CI (a ``(low, high)`` pair or a
    :class:`~cxrbench.evaluation.bootstrap.BootstrapCI`; None: no interval known)."""
    low, high = (math.nan, math.nan) if ci is None else (_finite(ci[0]), _finite(ci[1]))
    auc = _finite(macro_auc)
    return SkillBox(auc, low, high, subject, skill_verdict(auc, low, high, floor=floor))


def skill_box_for(y_true: Any, scores: Any, *, subject: str = "this model", n_boot: int = 500, seed: int = 0,
                  floor: float = SKILL_FLOOR) -> SkillBox:
    """:func:`skill_box` of the macro AUC of ``(N, F)`` 0/1 labels and scores, with its bootstrap 95 % CI."""
    from cxrbench.evaluation.bootstrap import bootstrap_macro_auc_ci
    from cxrbench.evaluation.metrics import auc_per_finding, macro_auc

    y, s = np.asarray(y_true), np.asarray(scores, dtype=float)
    if y.ndim == 1:
        y, s = y[:, None], s[:, None]
    auc = macro_auc(auc_per_finding(y, s, [f"f{j}" for j in range(y.shape[1])])["auc"].to_numpy()).auc
    ci = bootstrap_macro_auc_ci(y, s, n_boot=n_boot, seed=seed) if n_boot else None
    return skill_box(auc, None if ci is None else (ci.low, ci.high), subject=subject, floor=floor)


def skill_box_from_metrics(test_metrics: dict[str, Any] | None, *, subject: str = "this model",
                           floor: float = SKILL_FLOOR) -> SkillBox:
    """:func:`skill_box` of a bundle card's test metrics (``card.metrics["test"]``: ``summary.macro_auc`` and,
    where recorded, ``summary.macro_auc_ci_low`` / ``_high``). A card without test metrics (an imported bundle)
    is weak with the reason :data:`NO_TEST_METRICS`: not measured, rather than measured to be without skill."""
    summary = (test_metrics or {}).get("summary") or {}
    if "macro_auc" not in summary:
        return SkillBox(math.nan, math.nan, math.nan, subject, NO_TEST_METRICS)
    ci = (summary["macro_auc_ci_low"], summary["macro_auc_ci_high"]) if "macro_auc_ci_low" in summary else None
    return skill_box(summary.get("macro_auc", math.nan), ci, subject=subject, floor=floor)
