"""Model surgery for fine-tuning: freezing the routers, GW-MoE broadcasting during training,
retrofitting a recurrent router onto a linear-router model.

- :func:`freeze_router` sets ``requires_grad=False`` on the routing parameters
  (:func:`router_parameter_names`: rmoe's routers and shared recurrent cell, or the ``router`` /
  ``gate`` parameters of other MoE families), as GW-MoE's fine-tuning scripts do.
- :func:`gw_training` switches GW-MoE broadcasting (or its same-count random control) on for the
  duration of a block and restores the model's previous setting afterwards.
- :func:`retrofit_recurrent` turns a linear-router rmoe model (e.g. an imported or upcycled
  Mixtral / Qwen-MoE) into a recurrent-router one with ``router_base_linear``: layer i's logits
  are W_i x_i + G_i h_i with W_i the old router and G_i = 0, so it is the same function at the
  start; :func:`freeze_except_router` then trains only the new recurrent stage.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "RETROFIT_KEYS",
    "freeze_except_router",
    "freeze_router",
    "gw_training",
    "retrofit_recurrent",
    "router_parameter_names",
]

RETROFIT_KEYS = frozenset(
    {
        "router_type",
        "router_dim",
        "router_cell",
        "router_scorer",
        "router_pass_state",
        "router_detach_state",
        "router_share_proj",
        "router_bias",
        "router_init",
        "router_init_std",
    }
)
"""The config keys `retrofit_recurrent` takes (the recurrent stage's; router_type only as
"recurrent", router_scorer only as "linear"): any other field would change the function."""

_LINEAR_ROUTER_KEY = re.compile(r"^model\.layers\.(\d+)\.moe\.router\.scorer\.weight\.weight$")


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


def _retrofit_config(config: Any, recurrent_kwargs: dict[str, Any]) -> Any:
    """The recurrent `RMoEConfig` for `retrofit_recurrent` (ValueError for a source or keys
    that cannot give the same function at the start)."""
    from ..config import RMoEConfig

    if config.router_type != "linear":
        raise ValueError(
            f"retrofit_recurrent takes a model with router_type 'linear' (one W x per layer, "
            f"what imports and upcycling give), got router_type={config.router_type!r}"
        )
    if config.router_bias:
        raise ValueError(
            "retrofit_recurrent: the linear router has biases (router_bias true); the "
            "retrofit's base W_i has none, so it needs a router without biases"
        )
    unknown = sorted(set(recurrent_kwargs) - RETROFIT_KEYS)
    if unknown:
        raise ValueError(
            f"retrofit_recurrent takes only the recurrent stage's keys {sorted(RETROFIT_KEYS)}; "
            f"got {unknown} (other fields would change the model's function)"
        )
    kw = {"router_type": "recurrent", "router_scorer": "linear", **recurrent_kwargs}
    if kw["router_type"] != "recurrent" or kw["router_scorer"] != "linear":
        raise ValueError(
            "retrofit_recurrent needs router_type 'recurrent' with router_scorer 'linear' (G_i "
            f"= 0 makes a linear scorer exactly zero), got {kw['router_type']!r} / "
            f"{kw['router_scorer']!r}"
        )
    fields = config.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(key, None)
    return RMoEConfig(**{**fields, **kw, "router_base_linear": True})


def retrofit_recurrent(model_linear: nn.Module, seed: int | None = None, **recurrent_kwargs):
    """A recurrent-router copy of a linear-router rmoe model that computes the same function.

    The new model has ``router_type="recurrent"`` with ``router_base_linear=True``: layer i's
    logits are W_i x_i + G_i h_i. W_i (``moe.router.base.weight`` [E, D]) is layer i's old
    router weight, G_i (the linear scorer on the state, ``moe.router.scorer.weight.*``) is
    zero, and every other weight and buffer (embeddings, attention, norms, experts, shared
    experts, expert biases) is copied. The new recurrent stage -- Proj_i, the shared cell --
    is initialised as a new model's is: from the global random stream, or from
    `init_weights_seeded(seed)` when `seed` is given. Logits, routing and losses therefore
    equal the original's exactly at the start (in float32; G_i h_i is exactly 0), and differ
    once G_i trains. The new model is on the original's device and dtype, in its train/eval
    mode, with its GW-MoE policy.

    Args:
        model_linear: an `RMoEForCausalLM` with router_type "linear" and no router biases.
        seed: seed of the new recurrent stage's init (None = the global random stream).
        **recurrent_kwargs: the recurrent stage's config keys (`RETROFIT_KEYS`), e.g.
            router_dim=64, router_cell="gru", router_pass_state=False (a preset's keys,
            `rmoe.modeling.router_presets()["recurrent-np"]`, fit as long as they set no
            logit residual).

    Returns:
        The new `RMoEForCausalLM`; the original is not changed.

    Raises:
        ValueError: not a linear-router model, router biases, or keys outside `RETROFIT_KEYS`.
    """
    from ..modeling import RMoEForCausalLM

    config = _retrofit_config(model_linear.config, recurrent_kwargs)
    new = RMoEForCausalLM(config)
    if seed is not None:
        new.init_weights_seeded(seed)
    source = model_linear.state_dict()
    target = new.state_dict()
    with torch.no_grad():
        for key, value in source.items():
            match = _LINEAR_ROUTER_KEY.match(key)
            dest = f"model.layers.{match.group(1)}.moe.router.base.weight" if match else key
            if dest not in target or target[dest].shape != value.shape:
                raise ValueError(f"retrofit_recurrent: no place for {key} {tuple(value.shape)}")
            target[dest].copy_(value)
        for name, p in new.named_parameters():
            if ".moe.router.scorer." in name:
                p.zero_()  # G_i = 0: the recurrent stage starts silent
    ref = next(model_linear.parameters())
    new.to(device=ref.device, dtype=ref.dtype)
    new.set_gw_policy(model_linear.gw_policy)
    return new.train(model_linear.training)


def freeze_except_router(model: nn.Module, train_base: bool = False) -> list[str]:
    """Train only the router's recurrent stage: ``requires_grad=False`` everywhere except the
    per-layer projections Proj_i and scorers G_i, the shared cell and the module all layers
    share (S-proj's projector); the retrofit base W_i (``moe.router.base``) too when
    `train_base`. For a model without a cell this leaves its routers trainable (the random
    router's weights stay frozen in use: it reads them detached).

    Returns:
        The trainable parameter names.

    Raises:
        ValueError: the model has no router parameters.
    """
    from ..modeling.accounting import is_router_parameter

    trainable = []
    for name, p in model.named_parameters():
        keep = is_router_parameter(name) and (train_base or ".moe.router.base." not in name)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            "freeze_except_router: the model has no router parameters to train (no "
            "'*.moe.router.*', 'router_cell' or 'router_shared' names); it is not an rmoe MoE "
            "model"
        )
    return trainable
