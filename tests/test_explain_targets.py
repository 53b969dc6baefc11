"""cxrbench.explain.targets: one rule for "saliency" / a finding / a list / top-k, used by every face."""

from __future__ import annotations

import numpy as np
import pytest

from cxrbench.explain.targets import (
    ALL_FINDINGS,
    ExplanationTargets,
    explanation_targets,
    finding_indices,
    finding_ranking,
    is_summed,
)

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Mass"]


def test_summed_saliency_explains_all_findings_in_one_map_unless_findings_are_named():
    assert is_summed("saliency") and not is_summed("saliency_per_finding") and not is_summed("gradcam")
    assert explanation_targets("saliency", FINDINGS) == ExplanationTargets(None, [ALL_FINDINGS])
    assert explanation_targets("saliency", FINDINGS).outputs(4) == [0, 1, 2, 3]
    named = explanation_targets("saliency", FINDINGS, ["Effusion", "Mass"])
    assert named == ExplanationTargets([2, 3], ["Effusion+Mass"]) and named.outputs(4) == [2, 3]


def test_per_finding_methods_take_a_name_a_list_or_the_top_k_of_the_ranking():
    assert explanation_targets("gradcam", FINDINGS, "Mass") == ExplanationTargets([3], ["Mass"])
    assert explanation_targets("cam", FINDINGS, ["Mass", "Atelectasis"]).labels == ["Mass", "Atelectasis"]
    ranking = finding_ranking(np.array([0.1, 0.7, 0.4, 0.9]))
    top2 = explanation_targets("gradcam", FINDINGS, ranking=ranking, top=2)
    assert top2 == ExplanationTargets([3, 1], ["Mass", "Cardiomegaly"])
    # an empty list means the default, as before
    assert explanation_targets("saliency_per_finding", FINDINGS, [], ranking=ranking).index == [3, 1, 2]
    with pytest.raises(ValueError, match="pass their ranking"):
        explanation_targets("gradcam", FINDINGS)
    for top in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="top must be a whole number >= 1"):
            explanation_targets("gradcam", FINDINGS, ranking=ranking, top=top)


def test_unknown_findings_are_named():
    with pytest.raises(ValueError, match=r"unknown findings \['Broken_Arm'\]; the model's findings are"):
        explanation_targets("gradcam", FINDINGS, ["Mass", "Broken_Arm"])
    with pytest.raises(ValueError, match="no findings"):
        finding_indices([], FINDINGS)
    assert finding_indices("Effusion", FINDINGS) == [2]


def test_ranking_uses_calibrated_values_then_raw_ones_nan_last_and_ties_in_output_order():
    calibrated = np.array([0.5, np.nan, 0.9, 0.5])
    assert finding_ranking(calibrated, np.array([0.9, 0.99, 0.1, 0.2])).tolist() == [2, 0, 3, 1]
    # no operating points at all: the raw probabilities decide
    assert finding_ranking(np.full(4, np.nan), np.array([0.2, 0.6, 0.1, 0.3])).tolist() == [1, 3, 0, 2]
    assert finding_ranking(None, np.array([0.2, 0.6, 0.1, 0.3])).tolist() == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="calibrated or raw"):
        finding_ranking(np.full(4, np.nan))
