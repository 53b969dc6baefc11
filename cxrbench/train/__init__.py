"""Training: one epoch loop (:mod:`cxrbench.train.loop`) and the families that run in it (classifier, OOD model,
autoencoder at a classifier's resolution, lung U-Net), sharing one checkpoint format, exact resume, early stopping,
AMP and DDP."""

from cxrbench.train.autoencoder import AutoencoderConfig, train_autoencoder
from cxrbench.train.classifier import ClassifierConfig, TrainResult, train_classifier
from cxrbench.train.common import CheckpointError
from cxrbench.train.ensure import ensure_run, estimate_training_seconds
from cxrbench.train.family import Family, LoopResult, LoopSettings, TrainingParts
from cxrbench.train.folder import RunFolderError, prepare_run_folder
from cxrbench.train.loop import run_training
from cxrbench.train.ood import OODConfig, OODTrainResult, train_ood
from cxrbench.train.unet import UNetConfig, UNetTrainResult, train_unet

__all__ = ["AutoencoderConfig", "CheckpointError", "ClassifierConfig", "Family", "LoopResult", "LoopSettings",
           "OODConfig", "OODTrainResult", "RunFolderError", "TrainResult", "TrainingParts", "UNetConfig",
           "UNetTrainResult", "ensure_run", "estimate_training_seconds", "prepare_run_folder", "run_training",
           "train_autoencoder", "train_classifier", "train_ood", "train_unet"]
