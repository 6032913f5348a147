"""The gradient masker a fine-tuning config asks for: MIGU, its random-row control, or none.

:func:`rmoe.training.sft.finetune` knows no masking method; its callers (``rmoe finetune``, the
continual harness) pass it :func:`masker_factory` of their :class:`~rmoe.training.sft.SFTConfig`::

    finetune(model, tok, train, evals, cfg, masker=masker_factory(cfg))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rmoe.continual.migu import MIGU, RandomMask

if TYPE_CHECKING:
    from rmoe.training.sft import MaskerFactory, SFTConfig

__all__ = ["build_masker", "masker_factory"]


def build_masker(
    model: nn.Module, cfg: SFTConfig, optimizer: torch.optim.Optimizer | None = None
) -> MIGU | RandomMask | None:
    """The MIGU / RandomMask object for ``cfg`` (or None), covering linear and expert weights
    (rmoe's experts through their built-in probes).

    ``optimizer`` is hooked (its step restores the masked rows) when ``cfg.freeze_masked_rows``.
    """
    common = {
        "targets": cfg.mask_targets,
        "freeze_masked_rows": cfg.freeze_masked_rows,
        "optimizer": optimizer if cfg.freeze_masked_rows else None,
    }
    if cfg.migu_ratio is not None:
        return MIGU(model, cfg.migu_ratio, norm=cfg.migu_norm, **common)
    if cfg.random_mask_ratio is not None:
        return RandomMask(model, cfg.random_mask_ratio, seed=cfg.seed, **common)
    return None


def masker_factory(cfg: SFTConfig) -> MaskerFactory | None:
    """``(model, optimizer) -> masker`` for ``cfg``, or None when ``cfg`` asks for no masking."""
    if cfg.method == "plain":
        return None

    def build(model: nn.Module, optimizer: torch.optim.Optimizer) -> MIGU | RandomMask | None:
        return build_masker(model, cfg, optimizer)

    return build
