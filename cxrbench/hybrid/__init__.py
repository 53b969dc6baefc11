"""The hybrid-feature track (the student report): LBP / HOG / CNN features with a resumable cache, a
1-channel ResNet18 and its layer4-tuned copy, logistic and MLP classifiers, and the report's table with
a degeneracy verdict per row.

The modules, bottom to top: :mod:`.features` (hand-crafted and CNN features of one image, hybrid
vectors), :mod:`.extraction` (the features of a manifest, cached and resumable), :mod:`.backbone` (the
ResNet18 and its layer4 fine-tuning), :mod:`.classifiers`, :mod:`.tasks` (labelled tasks, the report's
feature blocks, reference scores of a bundle) and :mod:`.experiment` (the comparison table). This
package is their public surface.
"""

from cxrbench.hybrid.backbone import FinetuneResult, cached_finetune, finetune_layer4, resnet18_backbone
from cxrbench.hybrid.classifiers import CLASSIFIERS, LogisticBaseline, TorchMLPClassifier, make_classifier
from cxrbench.hybrid.experiment import (
    TABLE_COLUMNS,
    TaskExperiment,
    evaluate_scores,
    run_hybrid_experiment,
    run_task_experiment,
)
from cxrbench.hybrid.extraction import UnreadableImagesWarning, extract_features, extraction_errors
from cxrbench.hybrid.features import (
    FEATURE_KINDS,
    FeatureSpec,
    cnn_embeddings,
    feature_maps,
    hog_features,
    hybrid_vectors,
    lbp_features,
    model_fingerprint,
)
from cxrbench.hybrid.tasks import REPORT_COMBOS, bundle_scores, hybrid_feature_blocks, load_task, task_folders

__all__ = ["CLASSIFIERS", "FEATURE_KINDS", "REPORT_COMBOS", "TABLE_COLUMNS", "FeatureSpec", "FinetuneResult",
           "LogisticBaseline", "TaskExperiment", "TorchMLPClassifier", "UnreadableImagesWarning", "bundle_scores",
           "cached_finetune", "cnn_embeddings", "evaluate_scores", "extract_features", "extraction_errors",
           "feature_maps", "finetune_layer4", "hog_features", "hybrid_feature_blocks", "hybrid_vectors",
           "lbp_features", "load_task", "make_classifier", "model_fingerprint", "resnet18_backbone",
           "run_hybrid_experiment", "run_task_experiment", "task_folders"]
