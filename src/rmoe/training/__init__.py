"""Training: configs and presets, run preparation, the step, checkpoints, metrics, the loop."""

from ..evaluation import evaluate_split
from ..loading import find_model_dir
from .checkpoint import Checkpointer, latest_checkpoint, list_checkpoints
from .config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    load_config,
    preset_names,
    valid_keys,
)
from .metrics import MetricsWriter
from .optim import build_optimizer, lr_factor
from .prepare import PreparedRun, prepare_run
from .step import GradientMasker, StepRecord, accumulate_gradients, apply_update
from .trainer import NonFiniteLossError, TrainResult, train

__all__ = [
    "Checkpointer",
    "DataConfig",
    "GradientMasker",
    "MetricsWriter",
    "NonFiniteLossError",
    "OptimConfig",
    "PreparedRun",
    "RunConfig",
    "StepRecord",
    "TrainConfig",
    "TrainResult",
    "accumulate_gradients",
    "apply_update",
    "build_optimizer",
    "evaluate_split",
    "find_model_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_config",
    "lr_factor",
    "preset_names",
    "prepare_run",
    "train",
    "valid_keys",
]
