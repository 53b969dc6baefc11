"""Evaluation: ROC, Youden operating points, Chester's f_opt calibration, AUC with spread and CI, F1, Hamming.

scikit-learn computes the curves and scores; this package adds the multi-label bookkeeping (findings
without positives reported as such), the half-split spread and bootstrap CI, and reference tables.
"""

from cxrbench.evaluation.calibration import (
                                             OperatingPoints,
                                             calibrate,
                                             fit_operating_points,
                                             uncalibrate,
                                             youden_operating_point,
)
from cxrbench.evaluation.metrics import (
                                             AucSpread,
                                             BootstrapCI,
                                             MacroAUC,
                                             auc_half_split_spread,
                                             auc_or_nan,
                                             auc_per_finding,
                                             bootstrap_auc_ci,
                                             evaluate_predictions,
                                             macro_auc,
                                             multilabel_report,
                                             threshold_comparison,
                                             weighted_auc,
)
from cxrbench.evaluation.reference import chester_table1

__all__ = ["AucSpread", "BootstrapCI", "MacroAUC", "OperatingPoints", "auc_half_split_spread", "auc_or_nan",
           "auc_per_finding", "bootstrap_auc_ci", "calibrate", "chester_table1", "evaluate_predictions",
           "fit_operating_points", "macro_auc", "multilabel_report", "threshold_comparison", "uncalibrate",
           "weighted_auc", "youden_operating_point"]
