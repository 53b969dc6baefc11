"""The out-of-distribution gate: reconstruction scorers (L1, L2, SSIM, latent), cutoffs, evaluation sets,
AUROC / FPR@95 tables and the cutoff-vs-AUC trade-off (Chester Fig. 6).

Higher scores mean "more out of distribution"; ``ssim`` is 1 - SSIM. The modules, bottom to top:
:mod:`.scoring` (scorers, error maps, scores of batches, sets and files), :mod:`.cutoffs` (fitted and
Chester's cutoffs), :mod:`.sets` (the evaluation sets and labelled images), :mod:`.evaluation`
(separation tables) and :mod:`.tradeoff` (what the gate buys the classifier).
"""

from cxrbench.ood.cutoffs import CHESTER_SSIM_CUTOFF, OODCutoff, chester_ssim_cutoff, fit_cutoff
from cxrbench.ood.evaluation import ood_auroc_table, ood_metrics
from cxrbench.ood.scoring import (
    OOD_PREPROCESS,
    SCORER_NAMES,
    SSIM_WIN_SIZE,
    OODModel,
    error_map,
    reconstruction_scores,
    score_batch,
    score_batches,
    score_files,
    score_images,
    score_sets,
    structural_similarity_batch,
)
from cxrbench.ood.sets import (
    CORRUPTIONS,
    PHOTOGRAPHS,
    corrupt,
    corrupted_sets,
    dev_data_folders,
    digits_set,
    evaluation_sets,
    images_of,
    load_images,
    photo_set,
    rotate_images,
    split_rows,
    unseen_rows,
)
from cxrbench.ood.tradeoff import (
    classifier_probabilities,
    cutoff_tradeoff,
    rotation_tradeoff,
    shifted_set_tradeoff,
    skill_warning,
    sweep_skill_box,
    tradeoff_sweep,
)

__all__ = ["CHESTER_SSIM_CUTOFF", "CORRUPTIONS", "OOD_PREPROCESS", "PHOTOGRAPHS", "SCORER_NAMES", "SSIM_WIN_SIZE",
           "OODCutoff", "OODModel", "chester_ssim_cutoff", "classifier_probabilities", "corrupt", "corrupted_sets",
           "cutoff_tradeoff", "dev_data_folders", "digits_set", "error_map", "evaluation_sets", "fit_cutoff",
           "images_of", "load_images", "ood_auroc_table", "ood_metrics", "photo_set", "reconstruction_scores",
           "rotate_images", "rotation_tradeoff", "score_batch", "score_batches", "score_files", "score_images",
           "score_sets", "shifted_set_tradeoff", "skill_warning", "split_rows", "structural_similarity_batch",
           "sweep_skill_box", "tradeoff_sweep", "unseen_rows"]
