"""Training loops (classifier, OOD models, lung U-Net), sharing checkpoints, resume, AMP and DDP."""

from cxrbench.train.classifier import ClassifierConfig, TrainResult, train_classifier
from cxrbench.train.common import CheckpointError
from cxrbench.train.ood import OODConfig, OODTrainResult, train_ood
from cxrbench.train.unet import UNetConfig, UNetTrainResult, train_unet

__all__ = ["CheckpointError", "ClassifierConfig", "OODConfig", "OODTrainResult", "TrainResult", "UNetConfig",
           "UNetTrainResult", "train_classifier", "train_ood", "train_unet"]
