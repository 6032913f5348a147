"""Model adapters: one interface over the MoE layers of rmoe and Hugging Face MoE families.

An adapter maps a loaded causal LM to, per MoE layer,

* the **router weight** — the rows that score the experts ([E, R]; R = D for a linear router,
  the state width P for rmoe's recurrent router, see :attr:`MoELayer.router_space`);
* the **expert matrices** in the canonical orientation of :mod:`rmoe.analysis.experts`
  (``act`` = gate_proj, ``up``, ``down`` transposed, each [E, F, D]) plus the shared experts;
* the **routing function** (:class:`RoutingSpec`: softmax or sigmoid scores, top-k renormalised
  or not, scaling, group-limited selection, score-correction bias, shared experts) and
  :func:`route`, which reproduces the model's gate from its logits;
* a **capture** (:class:`RoutingCapture`, forward hooks on the routers) that records, for the
  tokens the model actually runs, the router logits, the chosen experts and their combine
  weights, and on request the MoE input, every expert's output and its intermediate activations.

Supported families (``config.model_type``): ``rmoe`` (RMoEForCausalLM), ``mixtral``, ``olmoe``,
``qwen2_moe``, ``qwen3_moe``, ``deepseek_v2``, ``deepseek_v3``. Both expert layouts are read:
the fused 3-D tensors of transformers 5 (``experts.gate_up_proj`` [E, 2F, D] with the gate
half first, ``experts.down_proj`` [E, D, F]; also the transposed [E, D, 2F] / [E, F, D] variant)
and per-expert modules (an ``nn.ModuleList`` of MLPs with ``gate_proj/up_proj/down_proj`` or
``w1/w3/w2`` linears), as well as rmoe's separate 3-D ``gate_proj/up_proj/down_proj``.

Typical use::

    adapter = get_adapter(model)
    with adapter.capture(store_inputs=1024) as cap:
        model(input_ids)
    layer0 = cap.layer(0)           # LayerCapture: probs [N, E], topk_idx [N, K], inputs [n, D]
    w = adapter.expert_weights(0)   # ExpertWeights: act/up/down [E, F, D]
    outs, acts = adapter.expert_outputs(0, layer0.inputs, with_activations=True)

Shapes: N tokens (B·T flattened), D model width, E routed experts, K experts per token,
F expert hidden width, R router-row width.

Modules: :mod:`~rmoe.analysis.adapters.spec` (routing function), ``weights`` (canonical expert
matrices), ``capture`` (layers and hooks), ``base`` (the interface), ``huggingface`` and
``rmoe_model`` (the families), ``registry`` (model type -> adapter). Everything public is
importable from ``rmoe.analysis.adapters``.
"""

from rmoe.analysis.adapters.base import MoEAdapter
from rmoe.analysis.adapters.capture import LayerCapture, MoELayer, RoutingCapture
from rmoe.analysis.adapters.huggingface import (
    DeepseekV2Adapter,
    DeepseekV3Adapter,
    HFMoEAdapter,
    MixtralAdapter,
    OlmoeAdapter,
    Qwen2MoeAdapter,
    Qwen3MoeAdapter,
)
from rmoe.analysis.adapters.registry import ADAPTERS, get_adapter, supported_families
from rmoe.analysis.adapters.rmoe_model import RMoEAdapter
from rmoe.analysis.adapters.spec import RoutingDecision, RoutingSpec, route
from rmoe.analysis.adapters.weights import MATRIX_TYPES, ExpertWeights, expert_forward

__all__ = [
    "ADAPTERS",
    "DeepseekV2Adapter",
    "DeepseekV3Adapter",
    "HFMoEAdapter",
    "MixtralAdapter",
    "OlmoeAdapter",
    "Qwen2MoeAdapter",
    "Qwen3MoeAdapter",
    "RMoEAdapter",
    "MATRIX_TYPES",
    "ExpertWeights",
    "LayerCapture",
    "MoEAdapter",
    "MoELayer",
    "RoutingCapture",
    "RoutingDecision",
    "RoutingSpec",
    "expert_forward",
    "get_adapter",
    "route",
    "supported_families",
]
