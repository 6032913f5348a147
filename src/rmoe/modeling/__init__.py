"""rmoe model code: routing, experts and dispatch, the MoE block, losses, the decoder, accounting."""

from .accounting import ModelCounts, count_model, flops_per_token, parameter_counts
from .balancing import (
    Balancer,
    GlobalBalance,
    SequenceBalance,
    SwitchBalance,
    end_router_step,
    install_router_step_hook,
    update_expert_biases,
)
from .experts import DISPATCH_BACKENDS, Experts
from .losses import load_balancing_loss, normalized_entropy, router_z_loss
from .moe import GWPolicy, MoEBlock, MoEOutput
from .routing import (
    ROUTERS,
    RecurrentCell,
    Router,
    RoutingResult,
    Scorer,
    build_cell,
    router_presets,
    select_topk,
)
from .transformer import (
    RMoECausalLMOutput,
    RMoEForCausalLM,
    RMoEModel,
    RMoEModelOutput,
    RMoEPreTrainedModel,
)

__all__ = [
    "Balancer",
    "DISPATCH_BACKENDS",
    "GlobalBalance",
    "SequenceBalance",
    "SwitchBalance",
    "end_router_step",
    "install_router_step_hook",
    "update_expert_biases",
    "Experts",
    "GWPolicy",
    "MoEBlock",
    "MoEOutput",
    "ModelCounts",
    "RMoECausalLMOutput",
    "RMoEForCausalLM",
    "RMoEModel",
    "RMoEModelOutput",
    "RMoEPreTrainedModel",
    "ROUTERS",
    "RecurrentCell",
    "Router",
    "RoutingResult",
    "Scorer",
    "build_cell",
    "count_model",
    "flops_per_token",
    "load_balancing_loss",
    "normalized_entropy",
    "parameter_counts",
    "router_presets",
    "router_z_loss",
    "select_topk",
]
