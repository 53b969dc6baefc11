"""How far to trust each finding's number: its test AUC, the AUC's 95 % CI and the positives it rests on.

A finding is *not reliable* when its test AUC is undefined (no positive test images), when it rests on fewer
than :data:`MIN_POSITIVES` positive test images, or when its CI reaches 0.5 (chance). The model as a whole is
*weak* when its test macro AUC is below :data:`WEAK_MACRO_AUC`. Both read a card's ``metrics["test"]``
(:attr:`cxrbench.models.card.ModelCard.test_metrics`); nothing is computed from images here.

>>> r = finding_reliability({"Hernia": {"auc": 0.9, "auc_ci_low": 0.4, "auc_ci_high": 1.0, "n_pos": 2}}, ["Hernia"])
>>> r["Hernia"].reliable, r["Hernia"].label
(False, 'AUC 0.90 [0.40, 1.00], 2 pos.')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["MIN_POSITIVES", "WEAK_MACRO_AUC", "FindingReliability", "finding_reliability", "model_warning"]

#: fewer positive test images than this and a finding's AUC says little
MIN_POSITIVES = 5
#: below this test macro AUC a model is a demonstration of the workflow, not a reader
WEAK_MACRO_AUC = 0.75


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class FindingReliability:
    """One finding's test evidence; ``reliable`` is None when the card has none for it (unknown)."""

    finding: str
    auc: float | None
    ci_low: float | None
    ci_high: float | None
    n_pos: int | None
    reliable: bool | None
    why: str

    @property
    def label(self) -> str:
        """``"AUC 0.73 [0.50, 0.90], 2 pos."``, or what is missing."""
        if self.reliable is None:
            return "not tested"
        if self.auc is None:
            return f"AUC n/a, {self.n_pos or 0} pos."
        ci = (f" [{self.ci_low:.2f}, {self.ci_high:.2f}]" if self.ci_low is not None and self.ci_high is not None
              else " [CI n/a]")
        return f"AUC {self.auc:.2f}{ci}, {self.n_pos} pos."


def _one(finding: str, m: Mapping[str, Any] | None) -> FindingReliability:
    if not m:
        return FindingReliability(finding, None, None, None, None, None, "the card holds no test metrics for it")
    auc, low, high = _number(m.get("auc")), _number(m.get("auc_ci_low")), _number(m.get("auc_ci_high"))
    n_pos = int(_number(m.get("n_pos")) or 0)
    if auc is None:
        why = "no test AUC (no positive test images)"
    elif n_pos < MIN_POSITIVES:
        why = f"only {n_pos} positive test image{'s' * (n_pos != 1)}"
    elif low is None or low <= 0.5:
        why = "its 95 % CI reaches 0.5 (chance)" if low is not None else "its AUC has no confidence interval"
    else:
        why = ""
    return FindingReliability(finding, auc, low, high, n_pos, not why, why)


def finding_reliability(per_finding: Mapping[str, Mapping[str, Any]] | None,
                        findings: Sequence[str]) -> dict[str, FindingReliability]:
    """``finding -> FindingReliability`` for ``findings``, from a card's ``metrics["test"]["per_finding"]``."""
    per_finding = per_finding or {}
    return {f: _one(f, per_finding.get(f)) for f in findings}


def model_warning(test_metrics: Mapping[str, Any], threshold: float = WEAK_MACRO_AUC) -> str:
    """A plain warning for the top of the results, or ``""``: no test metrics, or a macro AUC below ``threshold``."""
    macro = _number((test_metrics.get("summary") or {}).get("macro_auc"))
    if macro is None:
        return "This model's card holds no test-set metrics: how well it works is unknown."
    if macro < threshold:
        return (f"A weak model (test macro AUC {macro:.2f}, below {threshold:.2f}): it shows how the workflow "
                "runs, not what the X-ray shows.")
    return ""
