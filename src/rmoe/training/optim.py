"""The optimizer and the learning-rate schedule, shared by pre-training and fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: weight decay on matrices and expert
    tensors (dim >= 2), none on vectors (norms, biases, temperatures); model order kept."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` of ``model``."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW as a run's ``optim`` section says (lr, weight decay, betas, eps)."""
    o = cfg.optim
    return adamw(model, o.lr, o.weight_decay, o.betas, o.eps)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then constant / cosine /
    linear decay to min_lr_ratio at max_steps."""
    o, total = cfg.optim, cfg.train.max_steps
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, total - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    if o.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


def warmup_constant(warmup_steps: int):
    """``lambda step: factor``: linear warm-up over ``warmup_steps``, then 1 (fine-tuning)."""

    def factor(step: int) -> float:
        return (step + 1) / warmup_steps if warmup_steps and step < warmup_steps else 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule as a ``LambdaLR`` over :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
