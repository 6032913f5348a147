"""LoRA targets for an rmoe model with PEFT (``pip install peft``, >= 0.17 for ``target_parameters``).

rmoe's routed experts are 3-D parameters, not modules: ``moe.experts.gate_proj`` [E, F, D],
``moe.experts.up_proj`` [E, F, D], ``moe.experts.down_proj`` [E, D, F] (nn.Linear's [out, in]
per expert, the layout PEFT assumes for 3-D parameters). PEFT adapts them through
``LoraConfig(target_parameters=...)``: one rank-r update per expert, applied as a
parametrisation while the `Experts` module runs. Attention, shared-expert and dense-FFN
projections are nn.Linear modules (``target_modules``).

Behaviours of PEFT to know (peft 0.21):

* ``target_modules=["experts"]`` is rejected ("Target module Experts(...) is not supported"):
  the experts hold 3-D parameters, not linear layers; use ``target_parameters``.
* ``target_modules="all-linear"`` silently also adapts the routers' linear layers (a router
  ``scorer.weight`` is an nn.Linear subclass; the recurrent router's projections too), which
  changes routing. `lora_targets` leaves routers out unless ``router=True``.
* LoRA on parameters (``target_parameters``) needs ``lora_dropout=0``, no DoRA, no LoRA bias.
* While the adapter is active, reading ``model...experts.gate_proj`` directly (analysis code,
  MIGU) gives the base weight without the LoRA update; ``merge_and_unload()`` folds it in.
* The recurrent router's shared cell (``router_cell``: raw GRU/RNN/LSTM parameters) and
  cosine/XMoE expert embeddings are never targeted; train them with ``modules_to_save`` if
  wanted.

Typical use::

    from peft import get_peft_model
    from rmoe.integrations.peft import lora_config

    peft_model = get_peft_model(model, lora_config(model, r=8, alpha=16))
    ...  # train
    merged = peft_model.merge_and_unload()  # an RMoEForCausalLM again
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..modeling.accounting import is_router_parameter
from ..modeling.experts import DenseMLP, Experts

_LAYER_PREFIX = re.compile(r"^(?:.*\.)?layers\.\d+\.")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _pattern(name: str) -> str:
    """A module / parameter name without its ``...layers.N.`` prefix: the suffix PEFT matches
    in every layer (``model.layers.3.attn.q_proj`` -> ``attn.q_proj``)."""
    return _LAYER_PREFIX.sub("", name)


def _collect(model: nn.Module) -> dict[str, set[str]]:
    """Target patterns of `model` by part: attention, shared_experts, dense_mlp, router
    (module names) and experts (parameter names)."""
    parts: dict[str, set[str]] = {
        k: set() for k in ("attention", "shared_experts", "dense_mlp", "router", "experts")
    }
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, Experts):
            parts["experts"].update(_pattern(f"{name}.{p}") for p in _MLP)
        elif isinstance(module, DenseMLP):
            part = "shared_experts" if leaf == "shared_experts" else "dense_mlp"
            parts[part].update(_pattern(f"{name}.{p}") for p in _MLP)
        elif isinstance(module, nn.Linear) and is_router_parameter(f"{name}.weight"):
            parts["router"].add(_pattern(name))
        elif isinstance(module, nn.Linear) and leaf in _ATTENTION and ".attn." in f".{name}":
            parts["attention"].add(_pattern(name))
    return parts


def lora_targets(
    model: nn.Module,
    attention: bool = True,
    experts: bool = True,
    router: bool = False,
    shared_experts: bool = True,
    dense_mlp: bool = True,
) -> dict[str, list[str]]:
    """Keyword arguments for ``peft.LoraConfig`` that adapt the chosen parts of an rmoe model.

    Args:
        model: an `rmoe.RMoEForCausalLM` (or any module holding rmoe layers).
        attention: the q/k/v/o projections (``attn.q_proj``, ...).
        experts: the routed experts' 3-D weights (``moe.experts.gate_proj`` [E, F, D],
            ``up_proj`` [E, F, D], ``down_proj`` [E, D, F]) via ``target_parameters``.
        router: the routers' linear layers (per-layer scorers and projections, the shared
            router weight); off by default, so routing stays as trained.
        shared_experts: the shared experts' projections (``moe.shared_experts.gate_proj``...).
        dense_mlp: the dense FFN projections of ``mlp_only_layers`` (``mlp.gate_proj``...).

    Returns:
        ``{"target_modules": [...], "target_parameters": [...]}``: sorted suffix patterns that
        PEFT matches in every layer (only parts the model has).

    Raises:
        ValueError: nothing to adapt with these choices.
    """
    parts = _collect(model)
    chosen = {
        "attention": attention,
        "shared_experts": shared_experts,
        "dense_mlp": dense_mlp,
        "router": router,
    }
    modules = sorted(set().union(*(parts[k] for k, on in chosen.items() if on)))
    params = sorted(parts["experts"]) if experts else []
    if not modules and not params:
        raise ValueError(
            "lora_targets found nothing to adapt: enable at least one of attention, experts, "
            "router, shared_experts, dense_mlp that the model has"
        )
    return {"target_modules": modules, "target_parameters": params}


def lora_config(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    *,
    attention: bool = True,
    experts: bool = True,
    router: bool = False,
    shared_experts: bool = True,
    dense_mlp: bool = True,
    **kwargs: Any,
):
    """A ``peft.LoraConfig`` (task CAUSAL_LM, rank `r`, ``lora_alpha`` = `alpha`, no dropout)
    with the targets of `lora_targets`; `kwargs` go to ``LoraConfig`` (``lora_dropout`` must
    stay 0 when experts are targeted: PEFT's parameter LoRA cannot apply dropout)."""
    from peft import LoraConfig

    targets = lora_targets(
        model,
        attention=attention,
        experts=experts,
        router=router,
        shared_experts=shared_experts,
        dense_mlp=dense_mlp,
    )
    options: dict[str, Any] = {"task_type": "CAUSAL_LM", "lora_dropout": 0.0, **kwargs}
    return LoraConfig(r=r, lora_alpha=alpha, **targets, **options)
