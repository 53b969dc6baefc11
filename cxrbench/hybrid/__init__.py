"""The hybrid-feature track (the student report): LBP / HOG / CNN features with a resumable cache,
logistic and MLP classifiers with a degeneracy check, and the report's tasks and feature blocks.
"""

from cxrbench.hybrid.classifiers import (
                                         CLASSIFIERS,
                                         LogisticBaseline,
                                         TorchMLPClassifier,
                                         comparison_chart,
                                         degeneracy_check,
                                         evaluate_scores,
                                         holm_adjust,
                                         make_classifier,
                                         run_hybrid_experiment,
)
from cxrbench.hybrid.features import (
                                         FEATURE_KINDS,
                                         FeatureSpec,
                                         UnreadableImagesWarning,
                                         cnn_embeddings,
                                         extract_features,
                                         extraction_errors,
                                         feature_maps,
                                         hog_features,
                                         hybrid_vectors,
                                         lbp_features,
)
from cxrbench.hybrid.tasks import (
                                         REPORT_COMBOS,
                                         FinetuneResult,
                                         bundle_scores,
                                         finetune_layer4,
                                         hybrid_feature_blocks,
                                         load_task,
                                         resnet18_backbone,
                                         task_folders,
)

__all__ = ["CLASSIFIERS", "FEATURE_KINDS", "REPORT_COMBOS", "FeatureSpec", "FinetuneResult", "LogisticBaseline",
           "TorchMLPClassifier", "UnreadableImagesWarning", "bundle_scores", "cnn_embeddings", "comparison_chart",
           "degeneracy_check", "evaluate_scores", "extract_features", "extraction_errors", "feature_maps",
           "finetune_layer4", "hog_features", "holm_adjust", "hybrid_feature_blocks", "hybrid_vectors", "lbp_features",
           "load_task", "make_classifier", "resnet18_backbone", "run_hybrid_experiment", "task_folders"]
