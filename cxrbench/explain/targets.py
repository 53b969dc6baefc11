"""Explanation targets: the one place that turns a request into output indices and map labels.

A request is one of

* nothing (``None``): Chester's summed saliency explains all findings in one map (``"all findings"``);
  every per-finding method explains the ``top`` most probable findings of a ranking;
* a finding name (``"Effusion"``) or a list of names: those findings, in that order; a summed method
  sums just them into one map labelled ``"Effusion+Mass"``.

The ranking is :func:`finding_ranking`: calibrated probabilities where the model has operating points, else
raw ones; findings without a value come last, ties keep the model's output order. :meth:`Report.table
<cxrbench.inference.pipeline.Report.table>` sorts by the same ranking, so "the most probable finding" is
the same finding everywhere.

>>> t = explanation_targets("gradcam", ["A", "B", "C"], ranking=finding_ranking(np.array([.2, .9, .5])), top=2)
>>> t.index, t.labels
([1, 2], ['B', 'C'])
>>> explanation_targets("saliency", ["A", "B", "C"]).labels
['all findings']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ALL_FINDINGS", "DEFAULT_TOP", "SUMMED_METHODS", "ExplanationTargets", "explanation_targets",
           "finding_indices", "finding_ranking", "is_summed"]

#: Label of the one map of a summed method explaining every finding (Chester's general explanation).
ALL_FINDINGS = "all findings"
#: Methods that sum the chosen findings into one map per image (see :class:`cxrbench.explain.ChesterSaliency`).
SUMMED_METHODS = frozenset({"saliency"})
#: How many of the most probable findings a per-finding method explains when none are named.
DEFAULT_TOP = 3


@dataclass(frozen=True)
class ExplanationTargets:
    """What to explain: ``index`` for the explainer (output indices; None = every output) and one label per map."""

    index: list[int] | None
    labels: list[str]

    def outputs(self, n_outputs: int) -> list[int]:
        """The output indices the maps explain (all ``n_outputs`` when ``index`` is None)."""
        return list(range(n_outputs)) if self.index is None else list(self.index)


def is_summed(method: str) -> bool:
    """Whether ``method`` gives one map of all its targets summed (True for ``"saliency"``)."""
    return method in SUMMED_METHODS


def finding_ranking(calibrated: np.ndarray | None, raw: np.ndarray | None = None) -> np.ndarray:
    """Output indices ``(F,)`` int, most probable first.

    Ranks by ``calibrated`` ``(F,)`` when any of it is finite, else by ``raw`` ``(F,)``; NaN values come
    last; ties keep the output order (a stable sort).
    """
    values = None if calibrated is None else np.asarray(calibrated, dtype=np.float64)
    if values is None or not np.isfinite(values).any():
        if raw is None:
            raise ValueError("finding_ranking needs calibrated or raw probabilities")
        values = np.asarray(raw, dtype=np.float64)
    return np.argsort(-np.where(np.isfinite(values), values, -np.inf), kind="stable")


def finding_indices(names: str | Sequence[str], findings: Sequence[str]) -> list[int]:
    """Output indices of finding ``names`` (one name or a list); ``ValueError`` naming the unknown ones."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("no findings to explain were given")
    unknown = [n for n in names if n not in findings]
    if unknown:
        raise ValueError(f"unknown findings {unknown}; the model's findings are {list(findings)}")
    return [list(findings).index(n) for n in names]


def explanation_targets(method: str, findings: Sequence[str], request: str | Sequence[str] | None = None, *,
                        ranking: Sequence[int] | np.ndarray | None = None, top: int = DEFAULT_TOP,
                        untrained: Sequence[str] = ()) -> ExplanationTargets:
    """Targets and map labels for ``method`` on a model with outputs ``findings``.

    Parameters
    ----------
    method : explainer name (:data:`cxrbench.explain.EXPLAINERS`); summed methods see :data:`SUMMED_METHODS`.
    findings : the model's output names, in output order.
    request : None, a finding name or a list of names (see the module doc).
    ranking : output indices, most probable first (:func:`finding_ranking`); needed for the top-k default.
    top : how many findings the top-k default explains (>= 1).
    untrained : outputs the weights never trained (a bundle card's ``untrained``): asking for one is a
        ``ValueError`` ("not trained by this model"); the top-k default passes over them.
    """
    if request is not None and (isinstance(request, str) or len(request)):  # an empty list: the default
        index = finding_indices(request, findings)
        refused = [findings[i] for i in index if findings[i] in untrained]
        if refused:
            raise ValueError(f"{', '.join(refused)}: not trained by this model (its published weights never learnt "
                             f"{'this finding' if len(refused) == 1 else 'these findings'}), so there is nothing to "
                             "explain")
        labels = ["+".join(findings[i] for i in index)] if is_summed(method) else [findings[i] for i in index]
        return ExplanationTargets(index, labels)
    if is_summed(method):  # every output, or every trained one where the weights never trained some
        trained = [i for i, f in enumerate(findings) if f not in untrained]
        return ExplanationTargets(trained if len(trained) < len(findings) else None, [ALL_FINDINGS])
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a whole number >= 1 (how many findings to explain), got {top!r}")
    if ranking is None:
        raise ValueError(f"{method} explains the {top} most probable findings: pass their ranking")
    index = [int(i) for i in list(ranking) if findings[int(i)] not in untrained][:top]
    return ExplanationTargets(index, [findings[i] for i in index])
