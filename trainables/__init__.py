"""Models, data sets, attacks and the Ray Tune trainable that each trial of a sweep runs.

``fit(config)`` trains in this process; ``train_classifier(config)`` is the same loop as a
Ray Tune function trainable (reports and checkpoints every epoch, resumes exactly).
"""

from trainables.attacks import ATTACK_METHODS, attack, eval_mode, fgsm, pgd
from trainables.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainables.config import (
    AttackConfig,
    ConfigError,
    RobustConfig,
    ScheduleConfig,
    TrainConfig,
    parse_config,
)
from trainables.data import (
    DATASET_NAMES,
    DatasetCorruptError,
    DatasetNotFoundError,
    DataSplits,
    ImageTensorDataset,
    load_dataset,
)
from trainables.evaluate import EvalResult, evaluate
from trainables.models import MODELS, build_model, build_seeded_model, count_parameters, model_names
from trainables.schedule import lr_factor, scaled_lr
from trainables.train import (
    METRIC_KEYS,
    TrainedModel,
    fit,
    load_trained,
    resolve_device,
    train_classifier,
)

__all__ = [
    "ATTACK_METHODS",
    "DATASET_NAMES",
    "METRIC_KEYS",
    "MODELS",
    "AttackConfig",
    "CheckpointError",
    "ConfigError",
    "DataSplits",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "EvalResult",
    "ImageTensorDataset",
    "RobustConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainedModel",
    "attack",
    "build_model",
    "build_seeded_model",
    "count_parameters",
    "eval_mode",
    "evaluate",
    "fgsm",
    "fit",
    "load_checkpoint",
    "load_dataset",
    "load_trained",
    "lr_factor",
    "model_names",
    "parse_config",
    "pgd",
    "resolve_device",
    "save_checkpoint",
    "scaled_lr",
    "train_classifier",
]
