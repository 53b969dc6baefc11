"""Training loops (classifier; OOD models and U-Net follow), sharing checkpoints, resume, AMP and DDP."""

from .classifier import ClassifierConfig, TrainResult, train_classifier
from .common import CheckpointError

__all__ = ["CheckpointError", "ClassifierConfig", "TrainResult", "train_classifier"]
