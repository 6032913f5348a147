"""Routing metrics: expert load, router entropy, inner/outer balance, cross-layer mutual
information and routing agreement between checkpoints.

All functions are model-agnostic. They take, per MoE layer,

* ``probs``  [N, E] float — the router's softmax over **all** E experts (not logits, not the
  renormalised top-k weights), one row per token; for a sigmoid router (DeepSeek-V3), its
  per-expert scores normalised to sum to one (``RoutingResult.probs``, ``LayerCapture.probs``);
* ``topk``   [N, K] int   — the chosen expert indices, column 0 being the highest-scoring choice
  (``torch.topk`` order);
* ``mask``   [N] bool     — optional; False drops a token (padding).

and return plain numbers, numpy arrays, or small frozen dataclasses with a ``to_dict()`` for JSON.
Computation is done in float64 numpy whatever the input dtype.

Definitions follow the RMoE paper (Qiu et al., ICLR 2025; see ``shared/papers/rmoe.md`` §4):
gate entropy H_t = -Σ_n g_n ln g_n over the full softmax; inner balance IB = median_t g_(1)/g_(2);
outer balance OB = median_t Σ_{n∈TopK} g_n; cross-layer mutual information from per-token binned
softmax profiles.

This package is the one home of routing statistics; its modules:

* :mod:`~rmoe.analysis.routing.balance` — expert load, router entropy, inner/outer balance;
* :mod:`~rmoe.analysis.routing.mutual_information` — cross-layer MI (binned profiles, indices);
* :mod:`~rmoe.analysis.routing.agreement` — routing agreement of two checkpoints;
* :mod:`~rmoe.analysis.routing.summary` — one layer's metrics in one call, a whole model's for
  the experiment evaluator, and the statistics the trainer logs;
* :mod:`~rmoe.analysis.routing.model` — a whole model's metrics as ``rmoe analyze`` reports them.

Everything public is importable from ``rmoe.analysis.routing``.
"""

from rmoe.analysis.routing.agreement import RoutingAgreement, routing_agreement
from rmoe.analysis.routing.balance import (
    EntropySummary,
    LoadStats,
    entropy_summary,
    expert_load,
    inner_balance,
    normalized_entropy,
    outer_balance,
    router_entropy,
)
from rmoe.analysis.routing.model import (
    LayerRouting,
    ModelRouting,
    ModelRoutingSummary,
    model_routing,
)
from rmoe.analysis.routing.mutual_information import (
    binned_mutual_information,
    binned_mutual_information_matrix,
    choice_entropy,
    index_mutual_information,
    index_mutual_information_matrix,
)
from rmoe.analysis.routing.summary import (
    RoutingLayerStats,
    router_logit_stats,
    routing_layer_metrics,
    routing_layer_stats,
    routing_summary,
    training_log_stats,
)

__all__ = [
    "EntropySummary",
    "LayerRouting",
    "LoadStats",
    "ModelRouting",
    "ModelRoutingSummary",
    "RoutingAgreement",
    "RoutingLayerStats",
    "binned_mutual_information",
    "binned_mutual_information_matrix",
    "choice_entropy",
    "entropy_summary",
    "expert_load",
    "index_mutual_information",
    "index_mutual_information_matrix",
    "inner_balance",
    "model_routing",
    "normalized_entropy",
    "outer_balance",
    "router_entropy",
    "routing_agreement",
    "routing_layer_metrics",
    "routing_layer_stats",
    "router_logit_stats",
    "routing_summary",
    "training_log_stats",
]
