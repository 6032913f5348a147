"""Model surgery for fine-tuning: freezing the routers, GW-MoE broadcasting during training.

- :func:`freeze_router` sets ``requires_grad=False`` on the routing parameters
  (:func:`router_parameter_names`: rmoe's routers and shared recurrent cell, or the ``router`` /
  ``gate`` parameters of other MoE families), as GW-MoE's fine-tuning scripts do.
- :func:`gw_training` switches GW-MoE broadcasting (or its same-count random control) on for the
  duration of a block and restores the model's previous setting afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["freeze_router", "gw_training", "router_parameter_names"]


def router_parameter_names(model: nn.Module) -> list[str]:
    """Names of the routing parameters: every ``*.moe.router.*`` and the shared router cell.

    For models that are not rmoe models, every parameter whose name contains ``router`` or
    ends in ``.gate.weight`` (Mixtral/OLMoE/Qwen-MoE gates) -- GW-MoE's own rule is ``router``.
    """
    names = []
    for name, _ in model.named_parameters():
        if ".moe.router." in name or ".router_cell." in name or "router" in name:
            names.append(name)
        elif name.endswith(".gate.weight") or ".gate.wg." in name:
            names.append(name)
    return names


def freeze_router(model: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on the routers (and the shared recurrent cell).

    Returns:
        The frozen parameter names.

    Raises:
        ValueError: the model has no router parameters.
    """
    names = set(router_parameter_names(model))
    if not names:
        raise ValueError(
            "--freeze-router: the model has no router parameters (no '*.moe.router.*', "
            "'router_cell' or '*.gate.weight' names); it is not an MoE model"
        )
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
    return sorted(names)


@contextmanager
def gw_training(
    model: nn.Module,
    threshold: float | None,
    max_tokens_per_seq: int | None = None,
    random: bool = False,
) -> Iterator[None]:
    """Set the model config's GW-MoE fields for the duration of the block, then restore them.

    ``threshold=None`` leaves the config as it is (``max_tokens_per_seq`` and ``random`` then
    apply only if the model already has a threshold).

    Raises:
        ValueError: GW options on a model whose config has no GW fields.
    """
    cfg = getattr(model, "config", None)
    wants = threshold is not None or max_tokens_per_seq is not None or random
    if not wants:
        yield
        return
    if cfg is None or not hasattr(cfg, "gw_entropy_threshold"):
        raise ValueError(
            "GW-MoE options (--gw-threshold, --gw-max-tokens-per-seq, --gw-random) need an rmoe "
            "model (its config has gw_entropy_threshold); this model has none"
        )
    saved = (cfg.gw_entropy_threshold, cfg.gw_max_tokens_per_seq, cfg.gw_selection)
    if threshold is not None:
        cfg.gw_entropy_threshold = float(threshold)
    if max_tokens_per_seq is not None:
        cfg.gw_max_tokens_per_seq = int(max_tokens_per_seq)
    if random:
        cfg.gw_selection = "random"
    if cfg.gw_entropy_threshold is None:
        cfg.gw_entropy_threshold, cfg.gw_max_tokens_per_seq, cfg.gw_selection = saved
        raise ValueError("--gw-random / --gw-max-tokens-per-seq need --gw-threshold")
    try:
        yield
    finally:
        cfg.gw_entropy_threshold, cfg.gw_max_tokens_per_seq, cfg.gw_selection = saved
