"""Training loops (classifier, OOD models, lung U-Net), sharing checkpoints, resume, AMP and DDP."""

from .classifier import ClassifierConfig, TrainResult, train_classifier
from .common import CheckpointError
from .ood import OODConfig, OODTrainResult, train_ood
from .unet import UNetConfig, UNetTrainResult, train_unet

__all__ = ["CheckpointError", "ClassifierConfig", "OODConfig", "OODTrainResult", "TrainResult", "UNetConfig",
           "UNetTrainResult", "train_classifier", "train_ood", "train_unet"]
