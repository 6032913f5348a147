"""The rmoe model outputs (transformers `ModelOutput` dataclasses).

Shapes: B batch, T positions, D width, V vocabulary, N = B*T tokens, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput

from .routing import RoutingResult

# transformers renamed the KV-cache argument/output `past_key_values` -> `cache` during 5.x;
# outputs carry whichever name the installed version's generation code reads.
CACHE_FIELD = (
    "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)
_CACHE_FIELD = CACHE_FIELD


@dataclass
class RMoEModelOutput(ModelOutput):
    """Output of `RMoEModel`.

    last_hidden_state [B, T, D]; cache (named past_key_values on transformers versions before
    the rename): the KV cache; hidden_states: per-layer inputs + final (if asked);
    router_logits: tuple over MoE layers of [N, E] float32 (if asked); routing: tuple over MoE
    layers of `RoutingResult` (if `output_routing=True`); aux_loss / z_loss: unscaled scalars
    averaged over MoE layers; gw_tokens: tokens broadcast by GW-MoE, summed over layers.
    """

    last_hidden_state: torch.Tensor | None = None
    if _CACHE_FIELD == "cache":
        cache: Cache | None = None
    else:  # pragma: no cover - older transformers
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    routing: tuple[RoutingResult, ...] | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    gw_tokens: int | None = None


@dataclass
class RMoECausalLMOutput(ModelOutput):
    """Output of `RMoEForCausalLM`.

    loss: when labels are given, in training mode LM cross-entropy + router_aux_loss_coef *
    aux_loss + router_z_loss_coef * z_loss, in eval mode the LM cross-entropy alone; lm_loss: the cross-entropy alone; logits [B, T, V]; the rest as in
    `RMoEModelOutput`. aux_loss and z_loss are unscaled (multiply by the coefficients to get the
    amounts added to `loss`).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if _CACHE_FIELD == "cache":
        cache: Cache | None = None
    else:  # pragma: no cover - older transformers
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    routing: tuple[RoutingResult, ...] | None = None
    gw_tokens: int | None = None
