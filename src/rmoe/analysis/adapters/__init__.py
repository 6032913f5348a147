"""Model adapters: one interface over the MoE layers of rmoe and Hugging Face MoE families.

An adapter maps a loaded causal LM to, per MoE layer,

* the **router weight** — the rows that score the experts ([E, R]; R = D for a linear router,
  the state width P for rmoe's recurrent router, see :attr:`MoELayer.router_space`);
* the **expert matrices** in the canonical orientation of :mod:`rmoe.analysis.experts`
  (``act`` = gate_proj, ``up``, ``down`` transposed, each [E, F, D]) plus the shared experts;
* the **routing function** (:class:`RoutingSpec`: softmax or sigmoid scores, top-k renormalised
  or not, scaling, group-limited selection, score-correction bias, shared experts) and
  :func:`route`, which reproduces the model's gate from its logits;
* a **capture** (:class:`RoutingCapture`: hooks on the routers and experts) that records, for the
  tokens the model actually runs, the router logits, the chosen experts and their combine
  weights, and on request the MoE input, every expert's output and its intermediate activations.

Supported families (``config.model_type``; :func:`supported_families` lists them):

* ``rmoe`` (RMoEForCausalLM, every router type) — :mod:`~rmoe.analysis.adapters.rmoe_model`;
* the transformers-5 families, through one generic adapter
  (:class:`~rmoe.analysis.adapters.huggingface.HFMoEAdapter`) that reads the model's choice at
  its experts module — ``experts(hidden_states, top_k_index, top_k_weights)``, seen by a
  forward pre-hook — and the expert matrices through the same interface, each family stating
  only its routing function: softmax routers ``mixtral``, ``minimax``, ``hunyuan_v1_moe``,
  ``olmoe``, ``flex_olmo``, ``lara_mini``, ``mellum``, ``jamba``, ``qwen2_moe``,
  ``qwen3_moe``, ``qwen3_next``, ``qwen3_5_moe_text``, ``phimoe`` (sparsemixer weights
  recorded, not reproduced), ``ernie4_5_moe`` (selection bias), ``cohere2_moe``, ``deepseek_v2``
  and the top-k-logit softmax routers ``granitemoe``, ``granitemoeshared``,
  ``granitemoehybrid``, ``granitemoe_swa``, ``aria_text``; DeepSeek-V3-style sigmoid routers
  with a selection bias and expert groups ``deepseek_v3``, ``deepseek_v32``, ``glm4_moe``,
  ``glm4_moe_lite``, ``glm_moe_dsa``, ``dots1``, ``kimi_linear``, ``exaone_moe``,
  ``solar_open``, ``mimo_v2_flash``, ``bailing_hybrid``; other sigmoid routers ``minimax_m2``,
  ``afmoe``, ``hy_v3``, ``lfm2_moe``, ``flint``;
* families with their own expert function, layout or router output
  (:mod:`~rmoe.analysis.adapters.hf_custom`): ``gpt_oss`` (interleaved gate/up columns,
  expert biases, clamped alpha-SiLU GLU), ``hy_v4`` (DeepSeek-V3 router, clamped SwiGLU),
  ``llama4_text`` (sigmoid weights that scale the
  expert inputs), ``dbrx`` (``w1``/``v1``/``w2`` [E·F, D]), ``jetmoe`` (parallel-experts
  linears; the mixture-of-attention is not analysed).

Expert layouts read: the fused 3-D tensors of transformers 5 (``experts.gate_up_proj``
[E, 2F, D] gate half first, or [E, D, 2F] when ``is_transposed``, or interleaved columns when
not ``is_concatenated``; ``down_proj`` [E, D, F] / [E, F, D]; optional biases), per-expert
modules (an ``nn.ModuleList`` of MLPs with ``gate_proj/up_proj/down_proj`` or ``w1/w3/w2``),
rmoe's separate 3-D ``gate_proj/up_proj/down_proj``, and the DBRX and JetMoE layouts. Each
adapter computes expert outputs with its family's function (:class:`GLU`: SwiGLU unless the
family says otherwise, plus biases); non-gated experts (up/down only) are refused with a clear
error, since the act/up/down analyses do not apply to them.

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
matrices, the expert function), ``capture`` (layers and hooks), ``base`` (the interface),
``huggingface``, ``hf_custom`` and ``rmoe_model`` (the families), ``registry`` (model type ->
adapter: the one place a family is registered). Everything public is
importable from ``rmoe.analysis.adapters``.
"""

from rmoe.analysis.adapters.base import MoEAdapter
from rmoe.analysis.adapters.capture import LayerCapture, MoELayer, RoutingCapture
from rmoe.analysis.adapters.hf_custom import (
    DbrxAdapter,
    GptOssAdapter,
    HYV4Adapter,
    JetMoeAdapter,
    Llama4Adapter,
)
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
from rmoe.analysis.adapters.weights import (
    BIAS_TYPES,
    GLU,
    MATRIX_TYPES,
    ExpertWeights,
    alpha_silu,
    expert_forward,
)

__all__ = [
    "ADAPTERS",
    "BIAS_TYPES",
    "GLU",
    "DbrxAdapter",
    "GptOssAdapter",
    "HYV4Adapter",
    "JetMoeAdapter",
    "Llama4Adapter",
    "alpha_silu",
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
