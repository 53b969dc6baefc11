"""Training loops (classifier, lung U-Net; OOD models follow), sharing checkpoints, resume, AMP and DDP."""

from .classifier import ClassifierConfig, TrainResult, train_classifier
from .common import CheckpointError
from .unet import UNetConfig, UNetTrainResult, train_unet

__all__ = ["CheckpointError", "ClassifierConfig", "TrainResult", "UNetConfig", "UNetTrainResult", "train_classifier",
           "train_unet"]
