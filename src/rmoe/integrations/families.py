"""rmoe <-> transformers MoE families: parameter names, tensor layouts and config fields as tables.

One `Family` per MoE architecture (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE), each a declarative
table read in both directions: `rmoe export` (:mod:`rmoe.integrations.export`) walks it
rmoe -> HF, `rmoe import` (:mod:`rmoe.integrations.importing`) walks the same rows HF -> rmoe.
The dense families (`DENSE_FAMILIES`: Llama, Mistral, Qwen2, Qwen3) are tables of the same
kind that `rmoe upcycle` (:mod:`rmoe.integrations.upcycle`) reads HF -> rmoe, every layer a
dense layer. The table types and their expansion are in :mod:`rmoe.integrations.tables`. Nothing else in rmoe spells a
transformers parameter or config name of these families.

A family holds

* ``fields``: HF config field <- rmoe config field, the same value both ways;
* ``constants``: HF config fields fixed by rmoe's architecture (SwiGLU = ``silu``, ...); an
  import checks the HF value equals the constant, unless ``accepts`` judges the field;
* ``derived``: HF config fields computed from rmoe fields, each with its inverse (`Derived`);
* ``accepts``: HF fields rmoe has no field for, judged on import by a function (`Accept`):
  a sliding window no longer than the context is no window at all, ``decoder_sparse_step``
  becomes dense layers, ...;
* ``implied``: rmoe settings the architecture always has (Qwen3's per-head q/k norm, Qwen2's
  q/k/v biases, Qwen2-MoE's gated shared expert), set on import;
* ``requirements``: rmoe settings the family must have (`Requirement`); export raises a
  ValueError naming the field and what would be needed, for the first one not met;
* ``tensors``: `TensorRule` rows, rmoe state-dict key template <-> HF key template, with where
  the row applies (every layer, MoE layers, dense layers, once), its `Layout` and conditions
  on the model's flags (``when``).

Key templates use ``{i}`` for the layer index and ``{e}`` for the expert index. The HF names
are those transformers' own ``save_pretrained`` writes (the Hub layout: one 2-D tensor per
expert, which transformers 5 fuses into 3-D ``gate_up_proj`` / ``down_proj`` on load and
transformers 4 reads as is). `expand` turns a table and a `Plan` (the model's layer and
expert counts and flags, from either side's config) into concrete `Entry` rows.

Shapes: D model width, E experts, F expert hidden width, Q = heads * head_dim,
KV = key/value heads * head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .tables import (
    PER_EXPERT,
    SAME,
    Accept,
    Derived,
    Entry,
    Family,
    Layout,
    PerExpert,
    Plan,
    Requirement,
    Same,
    Scaled,
    TensorRule,
    Zeros,
    applies,
    expand,
    flags_of,
    hf_moe_layers,
    plan_from_hf,
    plan_from_rmoe,
    rmoe_setting,
    settings_from_hf,
)

__all__ = [
    "DENSE_FAMILIES", "FAMILIES", "LINEAR_ROUTERS", "ROUTER_KEY", "TRAINING_ONLY", "BASE_INERT", "Accept",
    "Derived", "Entry", "Family", "Layout", "PerExpert", "Plan", "Requirement", "Same",
    "Scaled", "TensorRule", "Zeros", "applies", "expand", "flags_of", "get_family",
    "hf_moe_layers", "plan_from_hf", "plan_from_rmoe", "rmoe_setting", "settings_from_hf",
    "unmet_requirement", "PER_EXPERT", "SAME",
]  # fmt: skip


LINEAR_ROUTERS: Mapping[str, str | None] = MappingProxyType(
    {"linear": None, "random": None, "shared": "model.router_shared.weight.weight"}
)
"""rmoe router types whose logits are W x with one [E, D] weight per layer, i.e. what every
target's ``gate`` computes: the key of a weight shared by all layers (copied into each layer's
row on export), or None when each layer owns ``model.layers.{i}.moe.router.scorer.weight.weight``.
An import creates ``linear`` routers."""

ROUTER_KEY = "model.layers.{i}.moe.router.scorer.weight.weight"
"""The rmoe key of a layer's linear router weight [E, D]."""

TRAINING_ONLY: Mapping[str, tuple[Any, str]] = MappingProxyType(
    {
        "router_jitter": (0.0, "router input jitter (training only) is not carried"),
        "capacity_factor": (None, "the training capacity is not carried (exports are dropless)"),
        "hidden_dropout": (0.0, "hidden dropout (training only) is not carried"),
        "gw_entropy_threshold": (None, "GW-MoE broadcasting (training only) is not carried"),
        "router_z_loss_coef": (0.0, "the router z-loss is not carried"),
        "router_aux_loss_type": ("switch", "the targets' aux loss is the Switch loss"),
    }
)
"""rmoe fields that change training but not the model's function: export drops them, with a
note when they are not at the inert value given here."""

BASE_INERT = frozenset(
    {
        "transformers_version",
        "architectures",
        "output_hidden_states",
        "return_dict",
        "dtype",
        "torch_dtype",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "model_type",
        "_name_or_path",
    }
)
"""HF config fields of every model that do not change a causal LM's function."""

# ----------------------------------------------------------------------------------------------
# Tensor rows
# ----------------------------------------------------------------------------------------------
_ATTENTION: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "model.embed_tokens.weight", "once"),
    TensorRule("model.norm.weight", "model.norm.weight", "once"),
    TensorRule("lm_head.weight", "lm_head.weight", "once", when=(("tied", False),)),
    TensorRule("model.layers.{i}.input_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    TensorRule(
        "model.layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"
    ),
    *(
        TensorRule(
            f"model.layers.{{i}}.attn.{p}.weight", f"model.layers.{{i}}.self_attn.{p}.weight"
        )
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ),
)


def _bias_rows(projections: tuple[str, ...], zeros_when_off: bool) -> tuple[TensorRule, ...]:
    """Attention biases: rmoe ``attn.{p}.bias`` <-> ``self_attn.{p}.bias`` when the model has
    them (flag ``attn_bias``, ``attn_out_bias`` for o_proj); with `zeros_when_off` a model
    without them is written with zero biases (for architectures whose biases always exist)."""
    dims = {"q_proj": "Q", "k_proj": "KV", "v_proj": "KV", "o_proj": "D"}
    rows = []
    for p in projections:
        flag = "attn_out_bias" if p == "o_proj" else "attn_bias"
        hf = f"model.layers.{{i}}.self_attn.{p}.bias"
        rows.append(TensorRule(f"model.layers.{{i}}.attn.{p}.bias", hf, when=((flag, True),)))
        if zeros_when_off:
            rows.append(TensorRule(None, hf, "layer", Zeros((dims[p],)), when=((flag, False),)))
    return tuple(rows)


_QKV = ("q_proj", "k_proj", "v_proj")
_QKVO = (*_QKV, "o_proj")

_QK_NORM: tuple[TensorRule, ...] = tuple(
    TensorRule(
        f"model.layers.{{i}}.attn.{p}.weight",
        f"model.layers.{{i}}.self_attn.{p}.weight",
        when=(("qk_norm", True),),
        note="RMSNorm on queries / keys: per head [head_dim] (Qwen3) or over the whole "
        "projection [Q] / [KV] (OLMoE)",
    )
    for p in ("q_norm", "k_norm")
)


def _moe_rows(block: str, router: str, names: tuple[str, str, str]) -> tuple[TensorRule, ...]:
    """Router and routed experts: rmoe (gate_proj, up_proj, down_proj) [E, F, D] / [E, D, F]
    <-> ``{block}.experts.{e}.{name}.weight`` for the family's `names` of the three."""
    rows = [TensorRule(ROUTER_KEY, f"model.layers.{{i}}.{block}.{router}.weight", "moe")]
    for rm, hf in zip(("gate_proj", "up_proj", "down_proj"), names):
        rows.append(
            TensorRule(
                f"model.layers.{{i}}.moe.experts.{rm}",
                f"model.layers.{{i}}.{block}.experts.{{e}}.{hf}.weight",
                "moe",
                PER_EXPERT,
            )
        )
    return tuple(rows)


_DENSE: tuple[TensorRule, ...] = tuple(
    TensorRule(f"model.layers.{{i}}.mlp.{p}.weight", f"model.layers.{{i}}.mlp.{p}.weight", "dense")
    for p in ("gate_proj", "up_proj", "down_proj")
)

_SHARED_ON = (("shared_experts", True),)
_QWEN2_SHARED: tuple[TensorRule, ...] = (
    *(
        TensorRule(
            f"model.layers.{{i}}.moe.shared_experts.{p}.weight",
            f"model.layers.{{i}}.mlp.shared_expert.{p}.weight",
            "moe",
            when=_SHARED_ON,
        )
        for p in ("gate_proj", "up_proj")
    ),
    TensorRule(
        "model.layers.{i}.moe.shared_experts.down_proj.weight",
        "model.layers.{i}.mlp.shared_expert.down_proj.weight",
        "moe",
        when=(("shared_gate", True),),
    ),
    TensorRule(
        "model.layers.{i}.moe.shared_expert_gate.weight",
        "model.layers.{i}.mlp.shared_expert_gate.weight",
        "moe",
        when=(("shared_gate", True),),
        note="rmoe's shared_expert_gate: sigmoid(w x) times the shared experts, as Qwen2-MoE",
    ),
    TensorRule(
        "model.layers.{i}.moe.shared_experts.down_proj.weight",
        "model.layers.{i}.mlp.shared_expert.down_proj.weight",
        "moe",
        Scaled(2.0),
        when=(*_SHARED_ON, ("shared_gate", False)),
        note="ungated rmoe shared experts: Qwen2-MoE multiplies the shared expert by "
        "sigmoid(shared_expert_gate x) = 0.5 for the zero gate; 2 * 0.5 = 1 exactly",
    ),
    *(
        TensorRule(
            None,
            f"model.layers.{{i}}.mlp.shared_expert.{p}.weight",
            "moe",
            Zeros(shape),
            when=(("shared_experts", False),),
            note="no shared experts in rmoe: a width-1 shared expert of zeros adds exactly 0",
        )
        for p, shape in (
            ("gate_proj", ("1", "D")),
            ("up_proj", ("1", "D")),
            ("down_proj", ("D", "1")),
        )
    ),
    TensorRule(
        None,
        "model.layers.{i}.mlp.shared_expert_gate.weight",
        "moe",
        Zeros(("1", "D")),
        when=(("shared_gate", False),),
        note="rmoe shared experts without a gate: a zero gate weight gives sigmoid(0) = 0.5",
    ),
)

# ----------------------------------------------------------------------------------------------
# Requirements: what a target cannot represent
# ----------------------------------------------------------------------------------------------
_TARGETS = "mixtral, olmoe, qwen2_moe or qwen3_moe"


def _router_need(config: Any) -> str:
    if config.router_type == "recurrent" or getattr(config, "router_share_proj", False):
        return (
            "no native transformers architecture has a cross-layer recurrent router; export "
            "needs router_type linear (one linear gate W x per layer, as in "
            f"{_TARGETS}). Exporting an RMoE model as is would need a custom architecture "
            "loaded with trust_remote_code, or distilling its routing into linear routers"
        )
    return (
        f"the gate of {_TARGETS.replace(' or ', ' and ')} is one linear layer W x per layer "
        "followed by a softmax; export "
        f"needs router_type linear (or {sorted(k for k in LINEAR_ROUTERS if k != 'linear')}, "
        "also W x); this router would need its own architecture (trust_remote_code)"
    )


COMMON_REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("router_type", lambda c: c.router_type in LINEAR_ROUTERS, ""),  # _router_need
    Requirement(
        "router_logit_residual",
        lambda c: c.router_logit_residual == 0,
        "the logit residual carries router logits from layer to layer, which no target does; "
        "needs router_logit_residual 0",
    ),
    Requirement(
        "router_bias",
        lambda c: not c.router_bias,
        "the targets' gates have no bias (gate.weight only); needs router_bias false",
    ),
    Requirement(
        "router_score_func",
        lambda c: c.router_score_func == "softmax",
        "the targets score experts with a softmax over all experts; needs router_score_func "
        "softmax (sigmoid routers are DeepSeek-V3's architecture, not an export target)",
    ),
    Requirement(
        "router_expert_bias",
        lambda c: not c.router_expert_bias,
        "the targets choose experts by the softmax scores alone; a selection-only expert bias "
        "needs an architecture with one (DeepSeek-V3's e_score_correction_bias); needs "
        "router_expert_bias false",
    ),
    Requirement(
        "router_scale",
        lambda c: c.router_scale == 1.0,
        "the targets apply no routed scaling factor to the combine weights; needs router_scale "
        "1 (DeepSeek-V3's routed_scaling_factor is the native equivalent)",
    ),
    Requirement(
        "eval_capacity_factor",
        lambda c: c.eval_capacity_factor is None,
        "the targets are dropless at inference; needs eval_capacity_factor None",
    ),
)
"""What every target needs (checked before the family's own requirements)."""


def _qk_norm_is(kind: str, need: str) -> Requirement:
    return Requirement("qk_norm", lambda c: rmoe_setting(c, "qk_norm") == kind, need)


_NO_QK_NORM = _qk_norm_is(
    "none",
    "this family has no q/k RMSNorm; use --to qwen3_moe (per-head norm, qk_norm head) or "
    "--to olmoe (norm over the whole projection, qk_norm proj)",
)
_NO_SHARED = "has no shared experts; needs num_shared_experts 0 (qwen2_moe has a shared expert)"
_NO_DENSE = "has an MoE block in every layer; needs mlp_only_layers [] (qwen2_moe and qwen3_moe "
_NO_DENSE += "have dense layers)"
_HEAD_DIM = Requirement(
    "head_dim",
    lambda c: c.head_dim * c.num_attention_heads == c.hidden_size,
    "this family derives head_dim = hidden_size // num_attention_heads (transformers 4 and "
    "other runtimes ignore a head_dim field); needs head_dim == hidden_size // "
    "num_attention_heads = {c.hidden_size} // {c.num_attention_heads} (mixtral and "
    "qwen3_moe carry head_dim)",
)
_SAME_BIASES = Requirement(
    "attention_out_bias",
    lambda c: rmoe_setting(c, "attention_bias") == rmoe_setting(c, "attention_out_bias"),
    "this family's attention_bias puts biases on all four projections (q, k, v and o) or on "
    "none; needs attention_out_bias == attention_bias",
)

MIXTRAL_REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("mlp_only_layers", lambda c: not c.mlp_only_layers, "Mixtral " + _NO_DENSE),
    Requirement(
        "norm_topk_prob",
        lambda c: bool(c.norm_topk_prob),
        "Mixtral always renormalises the top-k probabilities; needs norm_topk_prob true "
        "(olmoe, qwen2_moe and qwen3_moe have the option)",
    ),
    Requirement("num_shared_experts", lambda c: c.num_shared_experts == 0, "Mixtral " + _NO_SHARED),
    _NO_QK_NORM,
    Requirement(
        "attention_bias",
        lambda c: not rmoe_setting(c, "attention_bias"),
        "Mixtral's attention has no biases; needs attention_bias false (qwen2_moe has q/k/v "
        "biases; olmoe and qwen3_moe biases on all four projections)",
    ),
    Requirement(
        "attention_out_bias",
        lambda c: not rmoe_setting(c, "attention_out_bias"),
        "Mixtral's attention has no biases; needs attention_out_bias false",
    ),
)

OLMOE_REQUIREMENTS: tuple[Requirement, ...] = (
    _qk_norm_is(
        "proj",
        "OLMoE always applies an RMSNorm over the whole q and k projections (self_attn.q_norm "
        "[hidden_size], k_norm); needs qk_norm proj (--to qwen3_moe takes qk_norm head)",
    ),
    _HEAD_DIM,
    Requirement("mlp_only_layers", lambda c: not c.mlp_only_layers, "OLMoE " + _NO_DENSE),
    Requirement("num_shared_experts", lambda c: c.num_shared_experts == 0, "OLMoE " + _NO_SHARED),
    _SAME_BIASES,
)

QWEN2_REQUIREMENTS: tuple[Requirement, ...] = (
    _HEAD_DIM,
    _NO_QK_NORM,
    Requirement(
        "attention_out_bias",
        lambda c: not rmoe_setting(c, "attention_out_bias"),
        "Qwen2-MoE has q/k/v biases but none on o_proj; needs attention_out_bias false",
    ),
)

QWEN3_REQUIREMENTS: tuple[Requirement, ...] = (
    _qk_norm_is(
        "head",
        "Qwen3-MoE always applies a per-head RMSNorm to queries and keys (self_attn.q_norm, "
        "k_norm), which no weights can make the identity, and this rmoe model has no per-head "
        "q/k norm (qk_norm head); export it with --to qwen2_moe or --to mixtral instead",
    ),
    Requirement(
        "num_shared_experts", lambda c: c.num_shared_experts == 0, "Qwen3-MoE " + _NO_SHARED
    ),
    _SAME_BIASES,
)


def unmet_requirement(family: Family, config: Any) -> str | None:
    """The error message of the first requirement of `family` that `config` does not meet
    (common ones first), or None when the model can be exported."""
    for req in (*COMMON_REQUIREMENTS, *family.requirements):
        if not req.ok(config):
            need = _router_need(config) if req.field == "router_type" else req.need
            if hasattr(config, req.field):
                setting = f"{req.field}={getattr(config, req.field)!r}"
            else:
                setting = f"{req.field} (not an rmoe config option yet)"
            return f"cannot export to {family.name}: {setting}: {need.format(c=config)}"
    return None


# ----------------------------------------------------------------------------------------------
# Config tables
# ----------------------------------------------------------------------------------------------
_BASE_FIELDS: dict[str, str] = {
    name: name
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "attention_dropout",
        "initializer_range",
        "tie_word_embeddings",
        "use_cache",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    )
}
_COMMON_FIELDS: dict[str, str] = {
    **_BASE_FIELDS,
    **{n: n for n in ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits")},
}
_QWEN_FIELDS: dict[str, str] = {
    **_COMMON_FIELDS,
    **{
        n: n
        for n in (
            "intermediate_size",
            "moe_intermediate_size",
            "num_experts",
            "norm_topk_prob",
            "mlp_only_layers",
        )
    },
}
_DENSE_FIELDS = {**_BASE_FIELDS, "intermediate_size": "intermediate_size"}


def _rope_to_hf(c: Any) -> dict[str, Any]:
    scaling = dict(rmoe_setting(c, "rope_scaling") or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    return {"rope_type": "default", **scaling, "rope_theta": float(c.rope_theta)}


def _rope_to_rmoe(value: Mapping[str, Any]) -> dict[str, Any]:
    value = dict(value or {})
    legacy = value.pop("type", None)  # transformers 4's rope_scaling spelling
    kind = value.pop("rope_type", None) or legacy or "default"
    theta = value.pop("rope_theta", 10000.0)
    if value.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            f"rope_parameters: partial_rotary_factor={value['partial_rotary_factor']} (RoPE on "
            "part of each head) changes the model and rmoe rotates whole heads"
        )
    value.pop("partial_rotary_factor", None)
    if kind == "default":
        return {"rope_theta": theta}
    return {"rope_theta": theta, "rope_scaling": {"rope_type": kind, **value}}


_ROPE = Derived(to_hf=_rope_to_hf, to_rmoe=_rope_to_rmoe)
_QWEN2_SHARED_WIDTH = Derived(
    to_hf=lambda c: c.num_shared_experts * c.shared_expert_intermediate_size or 1,
    to_rmoe=lambda v: {"num_shared_experts": 1, "shared_expert_intermediate_size": v},
)
_ALL_BIASES = Derived(
    to_hf=lambda c: bool(rmoe_setting(c, "attention_bias")),
    to_rmoe=lambda v: {"attention_bias": bool(v), "attention_out_bias": bool(v)},
)
_QKV_BIASES = Derived(
    to_hf=lambda c: True,  # transformers 4 has no qkv_bias: the biases always exist there
    to_rmoe=lambda v: {"attention_bias": bool(v)},
)


def _sliding_problem(c: Any) -> str | None:
    """Why a sliding window changes the model (None: no layer uses one, or it is at least
    as long as max_position_embeddings, which makes it full attention)."""
    window = getattr(c, "sliding_window", None)
    types = getattr(c, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    if types is None and getattr(c, "use_sliding_window", True) is False:
        return None
    if not window or window >= c.max_position_embeddings:
        return None
    return (
        f"sliding-window attention (sliding_window={window} < max_position_embeddings="
        f"{c.max_position_embeddings}): rmoe attends to the whole context. Import it only if "
        f"you will use sequences of at most {window} tokens, after setting sliding_window to "
        "null (or use_sliding_window false) in config.json"
    )


_SLIDING = Accept(_sliding_problem)
_SLIDING_FIELDS = {
    n: _SLIDING
    for n in ("sliding_window", "use_sliding_window", "layer_types", "max_window_layers")
}
_SPARSE_STEP = Accept(
    problem=lambda c: None,
    note=lambda c: (
        None
        if (getattr(c, "decoder_sparse_step", 1) or 1) == 1
        else f"decoder_sparse_step={c.decoder_sparse_step}: the layers off the step are dense "
        "layers (mlp_only_layers)"
    ),
)
_JITTER = Accept(
    problem=lambda c: None,
    note=lambda c: (
        None
        if not getattr(c, "router_jitter_noise", 0.0)
        else f"router_jitter_noise={c.router_jitter_noise} (training only) is not carried; set "
        "model.router_jitter to train with jitter on the router input"
    ),
)
_CLIP_QKV = Accept(
    lambda c: (
        None
        if getattr(c, "clip_qkv", None) is None
        else f"clip_qkv={c.clip_qkv}: rmoe does not clamp queries, keys and values"
    )
)

# ----------------------------------------------------------------------------------------------
# The MoE families
# ----------------------------------------------------------------------------------------------
_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")

MIXTRAL = Family(
    name="mixtral",
    config_class="MixtralConfig",
    model_class="MixtralForCausalLM",
    fields=MappingProxyType(
        {
            **_COMMON_FIELDS,
            "head_dim": "head_dim",
            "intermediate_size": "moe_intermediate_size",
            "num_local_experts": "num_experts",
        }
    ),
    constants=MappingProxyType(
        {"hidden_act": "silu", "sliding_window": None, "router_jitter_noise": 0.0}
    ),
    derived=MappingProxyType({"rope_parameters": _ROPE}),
    requirements=MIXTRAL_REQUIREMENTS,
    tensors=(*_ATTENTION, *_moe_rows("block_sparse_moe", "gate", ("w1", "w3", "w2"))),
    accepts=MappingProxyType({"sliding_window": _SLIDING, "router_jitter_noise": _JITTER}),
)

OLMOE = Family(
    name="olmoe",
    config_class="OlmoeConfig",
    model_class="OlmoeForCausalLM",
    fields=MappingProxyType(
        {
            **_COMMON_FIELDS,
            "intermediate_size": "moe_intermediate_size",
            "num_experts": "num_experts",
            "norm_topk_prob": "norm_topk_prob",
        }
    ),
    constants=MappingProxyType({"hidden_act": "silu", "clip_qkv": None}),
    derived=MappingProxyType({"rope_parameters": _ROPE, "attention_bias": _ALL_BIASES}),
    requirements=OLMOE_REQUIREMENTS,
    tensors=(
        *_ATTENTION,
        *_bias_rows(_QKVO, zeros_when_off=False),
        *_QK_NORM,
        *_moe_rows("mlp", "gate", _EXPERT_NAMES),
    ),
    accepts=MappingProxyType({"clip_qkv": _CLIP_QKV}),
    implied=MappingProxyType({"qk_norm": "proj"}),
)

QWEN2_MOE = Family(
    name="qwen2_moe",
    config_class="Qwen2MoeConfig",
    model_class="Qwen2MoeForCausalLM",
    fields=MappingProxyType(_QWEN_FIELDS),
    constants=MappingProxyType(
        {"hidden_act": "silu", "decoder_sparse_step": 1, "use_sliding_window": False}
    ),
    derived=MappingProxyType(
        {
            "rope_parameters": _ROPE,
            "shared_expert_intermediate_size": _QWEN2_SHARED_WIDTH,
            "qkv_bias": _QKV_BIASES,
        }
    ),
    requirements=QWEN2_REQUIREMENTS,
    tensors=(
        *_ATTENTION,
        *_bias_rows(_QKV, zeros_when_off=True),
        *_moe_rows("mlp", "gate", _EXPERT_NAMES),
        *_QWEN2_SHARED,
        *_DENSE,
    ),
    notes=(
        "without rmoe attention biases, the q/k/v biases are written as zeros",
        "without rmoe's shared_expert_gate, the sigmoid-gated shared expert gets a zero gate "
        "and a doubled down projection (exact); without rmoe shared experts it is a width-1 "
        "shared expert of zeros",
    ),
    accepts=MappingProxyType({**_SLIDING_FIELDS, "decoder_sparse_step": _SPARSE_STEP}),
    implied=MappingProxyType({"shared_expert_gate": True, "attention_out_bias": False}),
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    config_class="Qwen3MoeConfig",
    model_class="Qwen3MoeForCausalLM",
    fields=MappingProxyType({**_QWEN_FIELDS, "head_dim": "head_dim"}),
    constants=MappingProxyType(
        {"hidden_act": "silu", "decoder_sparse_step": 1, "use_sliding_window": False}
    ),
    derived=MappingProxyType({"rope_parameters": _ROPE, "attention_bias": _ALL_BIASES}),
    requirements=QWEN3_REQUIREMENTS,
    tensors=(
        *_ATTENTION,
        *_bias_rows(_QKVO, zeros_when_off=False),
        *_QK_NORM,
        *_moe_rows("mlp", "gate", _EXPERT_NAMES),
        *_DENSE,
    ),
    accepts=MappingProxyType({**_SLIDING_FIELDS, "decoder_sparse_step": _SPARSE_STEP}),
    implied=MappingProxyType({"qk_norm": "head"}),
)

FAMILIES: Mapping[str, Family] = MappingProxyType(
    {f.name: f for f in (MIXTRAL, OLMOE, QWEN2_MOE, QWEN3_MOE)}
)
"""MoE family name (``rmoe export --to``, HF ``model_type``) -> `Family`."""

# ----------------------------------------------------------------------------------------------
# The dense families (read only: the start of `rmoe upcycle`; every layer is a dense layer)
# ----------------------------------------------------------------------------------------------
_DENSE_HEAD_DIM = {**_DENSE_FIELDS, "head_dim": "head_dim"}
_PRETRAINING_TP = Accept(
    problem=lambda c: None,
    note=lambda c: (
        None
        if getattr(c, "pretraining_tp", 1) == 1
        else f"pretraining_tp={c.pretraining_tp} is ignored (transformers 5 ignores it too)"
    ),
)


def _dense(name: str, cls: str, fields: Mapping[str, str], **kw: Any) -> Family:
    return Family(
        name=name,
        config_class=f"{cls}Config",
        model_class=f"{cls}ForCausalLM",
        fields=MappingProxyType(dict(fields)),
        requirements=(),
        moe=False,
        **{k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in kw.items()},
    )


DENSE_FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        f.name: f
        for f in (
            _dense(
                "llama",
                "Llama",
                _DENSE_HEAD_DIM,
                constants={"hidden_act": "silu", "mlp_bias": False, "pretraining_tp": 1},
                derived={"rope_parameters": _ROPE, "attention_bias": _ALL_BIASES},
                accepts={"pretraining_tp": _PRETRAINING_TP},
                tensors=(*_ATTENTION, *_bias_rows(_QKVO, zeros_when_off=False), *_DENSE),
            ),
            _dense(
                "mistral",
                "Mistral",
                _DENSE_HEAD_DIM,
                constants={"hidden_act": "silu", "sliding_window": None},
                derived={"rope_parameters": _ROPE},
                accepts={"sliding_window": _SLIDING},
                tensors=(*_ATTENTION, *_DENSE),
            ),
            _dense(
                "qwen2",
                "Qwen2",
                _DENSE_FIELDS,
                constants={"hidden_act": "silu", "use_sliding_window": False},
                derived={"rope_parameters": _ROPE},
                accepts=_SLIDING_FIELDS,
                implied={"attention_bias": True, "attention_out_bias": False},
                tensors=(*_ATTENTION, *_bias_rows(_QKV, zeros_when_off=True), *_DENSE),
            ),
            _dense(
                "qwen3",
                "Qwen3",
                _DENSE_HEAD_DIM,
                constants={"hidden_act": "silu", "use_sliding_window": False},
                derived={"rope_parameters": _ROPE, "attention_bias": _ALL_BIASES},
                accepts=_SLIDING_FIELDS,
                implied={"qk_norm": "head"},
                tensors=(
                    *_ATTENTION,
                    *_bias_rows(_QKVO, zeros_when_off=False),
                    *_QK_NORM,
                    *_DENSE,
                ),
            ),
        )
    }
)
"""Dense family name (HF ``model_type``) -> `Family`: what `rmoe upcycle` reads."""


def get_family(name: str, families: Mapping[str, Family] = FAMILIES) -> Family:
    """The family called `name` in `families`; ValueError listing the choices otherwise."""
    if name not in families:
        raise ValueError(f"unknown family {name!r}; choose one of {sorted(families)}")
    return families[name]
