"""Evaluation: ROC, Youden operating points, Chester's f_opt calibration, AUC with spread and CI, F1, Hamming,
the degeneracy check and reference tables.

scikit-learn computes the curves and scores; this package adds the multi-label bookkeeping (findings
without positives reported as such), the half-split spread, the one bootstrap CI (:mod:`.bootstrap`),
the label-permutation test of "has this model learned anything" (:mod:`.degeneracy`), Chester's table and
the box that says when a model's numbers show the workflow, not a usable model (:mod:`.skill`).
"""

from cxrbench.evaluation.bootstrap import (
                                             BootstrapCI,
                                             bootstrap_auc_ci,
                                             bootstrap_macro_auc_ci,
                                             weighted_auc,
)
from cxrbench.evaluation.calibration import (
                                             OperatingPoints,
                                             calibrate,
                                             fit_operating_points,
                                             uncalibrate,
                                             youden_operating_point,
)
from cxrbench.evaluation.degeneracy import degeneracy_check, holm_adjust
from cxrbench.evaluation.metrics import (
                                             AucSpread,
                                             MacroAUC,
                                             auc_half_split_spread,
                                             auc_or_nan,
                                             auc_per_finding,
                                             evaluate_predictions,
                                             macro_auc,
                                             multilabel_report,
                                             threshold_array,
                                             threshold_comparison,
)
from cxrbench.evaluation.reference import chester_table1
from cxrbench.evaluation.skill import (
                                             SKILL_FLOOR,
                                             SkillBox,
                                             skill_box,
                                             skill_box_for,
                                             skill_box_from_metrics,
                                             skill_verdict,
)

__all__ = ["SKILL_FLOOR", "AucSpread", "BootstrapCI", "MacroAUC", "OperatingPoints", "SkillBox",
           "auc_half_split_spread", "auc_or_nan", "auc_per_finding", "bootstrap_auc_ci", "bootstrap_macro_auc_ci",
           "calibrate", "chester_table1", "degeneracy_check", "evaluate_predictions", "fit_operating_points",
           "holm_adjust", "macro_auc", "multilabel_report", "skill_box", "skill_box_for", "skill_box_from_metrics",
           "skill_verdict", "threshold_array", "threshold_comparison", "uncalibrate", "weighted_auc",
           "youden_operating_point"]
