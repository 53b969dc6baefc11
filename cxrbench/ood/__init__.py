"""The out-of-distribution gate: reconstruction scorers (L1, L2, SSIM, latent), cutoffs, evaluation sets,
AUROC / FPR@95 tables and the cutoff-vs-AUC trade-off (Chester Fig. 6).

Higher scores mean "more out of distribution"; ``ssim`` is 1 - SSIM.
"""

from cxrbench.ood.scoring import (
                                  CORRUPTIONS,
                                  SCORER_NAMES,
                                  OODCutoff,
                                  OODModel,
                                  chester_ssim_cutoff,
                                  corrupt,
                                  cutoff_tradeoff,
                                  error_map,
                                  fit_cutoff,
                                  ood_metrics,
                                  reconstruction_scores,
                                  score_batch,
                                  score_batches,
                                  structural_similarity_batch,
)

__all__ = ["CORRUPTIONS", "SCORER_NAMES", "OODCutoff", "OODModel", "chester_ssim_cutoff", "corrupt", "cutoff_tradeoff",
           "error_map", "fit_cutoff", "ood_metrics", "reconstruction_scores", "score_batch", "score_batches",
           "structural_similarity_batch"]
