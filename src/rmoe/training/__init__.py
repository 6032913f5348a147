"""Training: configs and presets, the trainer loop, evaluation, atomic checkpoints."""

from .checkpoint import latest_checkpoint, list_checkpoints
from .config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    load_config,
    preset_names,
    valid_keys,
)
from .trainer import (
    NonFiniteLossError,
    TrainResult,
    evaluate_split,
    find_model_dir,
    lr_factor,
    routing_stats,
    train,
)

__all__ = [
    "DataConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "evaluate_split",
    "find_model_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_config",
    "lr_factor",
    "preset_names",
    "routing_stats",
    "train",
    "valid_keys",
]
