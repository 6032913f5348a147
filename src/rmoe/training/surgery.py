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
    """Broadcast with GW-MoE for the duration of the block, then restore the model's policy.

    The new policy is the model's current one (:attr:`model.gw_policy`) with ``threshold``,
    ``max_tokens_per_seq`` and ``random`` (``selection="random"``, the same-count control)
    replacing its fields where given; ``threshold=None`` keeps the current threshold. The model's
    config is never changed, so a model saved afterwards has its own GW settings.

    Raises:
        ValueError: GW options on a model without a GW policy, or ``max_tokens_per_seq`` /
            ``random`` with no threshold (given or the model's).
    """
    if threshold is None and max_tokens_per_seq is None and not random:
        yield
        return
    if not hasattr(model, "set_gw_policy"):
        raise ValueError(
            "GW-MoE options (--gw-threshold, --gw-max-tokens-per-seq, --gw-random) need an rmoe "
            "model (it has a GW policy, set_gw_policy); this model has none"
        )
    from ..modeling.moe import GWPolicy

    saved = model.gw_policy
    policy = GWPolicy(
        threshold=float(threshold) if threshold is not None else saved.threshold,
        max_tokens_per_seq=(
            int(max_tokens_per_seq) if max_tokens_per_seq is not None else saved.max_tokens_per_seq
        ),
        selection="random" if random else saved.selection,
    )
    if policy.threshold is None:
        raise ValueError("--gw-random / --gw-max-tokens-per-seq need --gw-threshold")
    model.set_gw_policy(policy)
    try:
        yield
    finally:
        model.set_gw_policy(saved)
