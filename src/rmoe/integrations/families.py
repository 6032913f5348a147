"""rmoe <-> transformers MoE families: parameter names, tensor layouts and config fields as tables.

One `Family` per target architecture (Mixtral, Qwen2-MoE, Qwen3-MoE), each a declarative table
read in both directions: `rmoe export` (:mod:`rmoe.integrations.export`) walks it rmoe -> HF,
and the planned `rmoe import` walks the same rows HF -> rmoe. Nothing else in rmoe spells a
transformers parameter or config name of these families.

A family holds

* ``fields``: HF config field <- rmoe config field, the same value both ways;
* ``constants``: HF config fields fixed by rmoe's architecture (SwiGLU = ``silu``, no sliding
  window, ...); an import checks the HF value equals the constant;
* ``derived``: HF config fields computed from rmoe fields, each with its inverse (`Derived`);
* ``requirements``: rmoe settings the family must have (`Requirement`); export raises a
  ValueError naming the field and what would be needed, for the first one not met;
* ``tensors``: `TensorRule` rows, rmoe state-dict key template <-> HF key template, with where
  the row applies (every layer, MoE layers, dense layers, once), its `Layout` and an optional
  condition on the model (``when``).

Key templates use ``{i}`` for the layer index and ``{e}`` for the expert index. The HF names
are those transformers' own ``save_pretrained`` writes (the Hub layout: one 2-D tensor per
expert, which transformers 5 fuses into 3-D ``gate_up_proj`` / ``down_proj`` on load and
transformers 4 reads as is). `expand` turns a table and a `Plan` (the model's layer and
expert counts and flags, from either side's config) into concrete `Entry` rows.

Shapes: D model width, E experts, F expert hidden width, Q = heads * head_dim,
KV = key/value heads * head_dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

# ----------------------------------------------------------------------------------------------
# Layouts: how one rmoe tensor becomes HF tensors, and back
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Same:
    """The tensor is the same on both sides."""

    def to_hf(self, t: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
        return [t]

    def to_rmoe(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0]


@dataclass(frozen=True)
class PerExpert:
    """rmoe's 3-D expert weight [E, a, b] <-> E HF tensors [a, b] (``{e}`` in the HF key).
    Both sides use nn.Linear's [out, in] layout per expert."""

    def to_hf(self, t: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
        if t.dim() != 3 or t.shape[0] != num_experts:
            raise ValueError(f"expected an [E={num_experts}, ...] expert weight, got {t.shape}")
        return list(t.unbind(0))

    def to_rmoe(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(ts, 0)


@dataclass(frozen=True)
class Scaled:
    """HF tensor = factor * rmoe tensor (compensates a fixed factor the HF forward applies)."""

    factor: float

    def to_hf(self, t: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
        return [t * self.factor]

    def to_rmoe(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0] / self.factor


@dataclass(frozen=True)
class Zeros:
    """An HF-only tensor, written as zeros of the symbolic `shape` (names in `Plan.dims`).

    rmoe has no counterpart: export writes zeros, which make the HF computation equal to
    rmoe's; an import can take the HF model exactly only where this tensor is all zeros."""

    shape: tuple[str, ...]

    def zeros(self, dims: Mapping[str, int], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros([dims[s] for s in self.shape], dtype=dtype)


Layout = Same | PerExpert | Scaled | Zeros
SAME, PER_EXPERT = Same(), PerExpert()

# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
WHERE = ("once", "layer", "moe", "dense")
"""Where a tensor row applies: once per model, every layer, MoE layers only, dense layers only."""


@dataclass(frozen=True)
class TensorRule:
    """One row of a family's tensor table.

    Attributes:
        rmoe: the rmoe state-dict key template (``{i}`` = layer), or None for an HF-only tensor
            (its layout is then `Zeros`).
        hf: the HF key template (``{i}`` = layer, ``{e}`` = expert for `PerExpert`).
        where: one of `WHERE`.
        layout: `Same`, `PerExpert`, `Scaled` or `Zeros`.
        when: (flag, value): the row applies only when `Plan.flags[flag] == value`.
        note: why the row is what it is, when that is not obvious.
    """

    rmoe: str | None
    hf: str
    where: str = "layer"
    layout: Layout = SAME
    when: tuple[str, bool] | None = None
    note: str = ""


@dataclass(frozen=True)
class Requirement:
    """An rmoe setting a family needs: `ok(config)` must hold, else export raises a
    ValueError with ``field=value`` and `need` (formatted with ``c`` = the rmoe config, so
    ``{c.hidden_size}`` shows the model's value)."""

    field: str
    ok: Callable[[Any], bool]
    need: str


@dataclass(frozen=True)
class Derived:
    """An HF config field computed from rmoe fields: `to_hf(rmoe_config) -> value` and its
    inverse `to_rmoe(value) -> {rmoe field: value}`."""

    to_hf: Callable[[Any], Any]
    to_rmoe: Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """A transformers MoE architecture as a two-way table (see the module docstring)."""

    name: str
    config_class: str
    model_class: str
    fields: Mapping[str, str]
    constants: Mapping[str, Any]
    derived: Mapping[str, Derived]
    requirements: tuple[Requirement, ...]
    tensors: tuple[TensorRule, ...]
    notes: tuple[str, ...] = field(default=())

    def hf_field(self, rmoe_field: str) -> str:
        """The HF config field that carries `rmoe_field` in this family."""
        for hf, rm in self.fields.items():
            if rm == rmoe_field:
                return hf
        raise KeyError(f"{self.name} has no config field for rmoe's {rmoe_field!r}")


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

_ATTENTION: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", "model.embed_tokens.weight", "once"),
    TensorRule("model.norm.weight", "model.norm.weight", "once"),
    TensorRule("lm_head.weight", "lm_head.weight", "once", when=("tied", False)),
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

_QWEN2_SHARED: tuple[TensorRule, ...] = (
    TensorRule(
        "model.layers.{i}.moe.shared_experts.gate_proj.weight",
        "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
        "moe",
        when=("shared_experts", True),
    ),
    TensorRule(
        "model.layers.{i}.moe.shared_experts.up_proj.weight",
        "model.layers.{i}.mlp.shared_expert.up_proj.weight",
        "moe",
        when=("shared_experts", True),
    ),
    TensorRule(
        "model.layers.{i}.moe.shared_experts.down_proj.weight",
        "model.layers.{i}.mlp.shared_expert.down_proj.weight",
        "moe",
        Scaled(2.0),
        when=("shared_experts", True),
        note="Qwen2-MoE multiplies the shared expert by sigmoid(shared_expert_gate x) = 0.5 "
        "for the zero gate; 2 * 0.5 = 1 exactly in floating point",
    ),
    *(
        TensorRule(
            None,
            f"model.layers.{{i}}.mlp.shared_expert.{p}.weight",
            "moe",
            Zeros(shape),
            when=("shared_experts", False),
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
        note="rmoe adds its shared experts ungated; a zero gate weight gives sigmoid(0) = 0.5",
    ),
)

_QKV_BIAS: tuple[TensorRule, ...] = tuple(
    TensorRule(None, f"model.layers.{{i}}.self_attn.{p}.bias", "layer", Zeros((dim,)))
    for p, dim in (("q_proj", "Q"), ("k_proj", "KV"), ("v_proj", "KV"))
)

_QK_NORM: tuple[TensorRule, ...] = tuple(
    TensorRule(
        f"model.layers.{{i}}.attn.{p}.weight",
        f"model.layers.{{i}}.self_attn.{p}.weight",
        when=("qk_norm", True),
        note="per-head RMSNorm [head_dim] on queries / keys; rmoe has none yet",
    )
    for p in ("q_norm", "k_norm")
)

# ----------------------------------------------------------------------------------------------
# Requirements: what a target cannot represent
# ----------------------------------------------------------------------------------------------
_TARGETS = "mixtral, qwen2_moe or qwen3_moe"


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

_NO_QK_NORM = Requirement(
    "qk_norm",
    lambda c: not getattr(c, "qk_norm", False),
    "this family has no per-head q/k RMSNorm; use --to qwen3_moe",
)
_NO_SHARED = "has no shared experts; needs num_shared_experts 0 (qwen2_moe has a shared expert)"

MIXTRAL_REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        "mlp_only_layers",
        lambda c: not c.mlp_only_layers,
        "Mixtral has an MoE block in every layer; needs mlp_only_layers [] (qwen2_moe and "
        "qwen3_moe have dense layers)",
    ),
    Requirement(
        "norm_topk_prob",
        lambda c: bool(c.norm_topk_prob),
        "Mixtral always renormalises the top-k probabilities; needs norm_topk_prob true "
        "(qwen2_moe and qwen3_moe have the option)",
    ),
    Requirement("num_shared_experts", lambda c: c.num_shared_experts == 0, "Mixtral " + _NO_SHARED),
    _NO_QK_NORM,
)

QWEN2_REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        "head_dim",
        lambda c: c.head_dim * c.num_attention_heads == c.hidden_size,
        "Qwen2-MoE derives head_dim = hidden_size // num_attention_heads (transformers 4 and "
        "other runtimes ignore a head_dim field); needs head_dim == hidden_size // "
        "num_attention_heads = {c.hidden_size} // {c.num_attention_heads} (mixtral and "
        "qwen3_moe carry head_dim)",
    ),
    _NO_QK_NORM,
)

QWEN3_REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        "qk_norm",
        lambda c: bool(getattr(c, "qk_norm", False)),
        "Qwen3-MoE always applies a per-head RMSNorm to queries and keys (self_attn.q_norm, "
        "k_norm), which no weights can make the identity, and this rmoe model has no per-head "
        "q/k norm (an architecture option planned with `rmoe import`); export it with --to "
        "qwen2_moe or --to mixtral instead",
    ),
    Requirement(
        "num_shared_experts", lambda c: c.num_shared_experts == 0, "Qwen3-MoE " + _NO_SHARED
    ),
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
_COMMON_FIELDS: dict[str, str] = {
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
        "num_experts_per_tok",
        "router_aux_loss_coef",
        "output_router_logits",
        "use_cache",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    )
}
_QWEN_FIELDS: dict[str, str] = {
    **_COMMON_FIELDS,
    "intermediate_size": "intermediate_size",
    "moe_intermediate_size": "moe_intermediate_size",
    "num_experts": "num_experts",
    "norm_topk_prob": "norm_topk_prob",
    "mlp_only_layers": "mlp_only_layers",
}
_ROPE = Derived(
    to_hf=lambda c: {"rope_type": "default", "rope_theta": float(c.rope_theta)},
    to_rmoe=lambda v: {"rope_theta": v["rope_theta"]},
)
_QWEN2_SHARED_WIDTH = Derived(
    to_hf=lambda c: c.num_shared_experts * c.shared_expert_intermediate_size or 1,
    to_rmoe=lambda v: {"num_shared_experts": 1, "shared_expert_intermediate_size": v},
)

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
)

QWEN2_MOE = Family(
    name="qwen2_moe",
    config_class="Qwen2MoeConfig",
    model_class="Qwen2MoeForCausalLM",
    fields=MappingProxyType(_QWEN_FIELDS),
    constants=MappingProxyType(
        {
            "hidden_act": "silu",
            "decoder_sparse_step": 1,
            "use_sliding_window": False,
            "qkv_bias": True,
        }
    ),
    derived=MappingProxyType(
        {"rope_parameters": _ROPE, "shared_expert_intermediate_size": _QWEN2_SHARED_WIDTH}
    ),
    requirements=QWEN2_REQUIREMENTS,
    tensors=(
        *_ATTENTION,
        *_QKV_BIAS,
        *_moe_rows("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
        *_QWEN2_SHARED,
        *_DENSE,
    ),
    notes=(
        "attention q/k/v biases are written as zeros (rmoe has none)",
        "the sigmoid-gated shared expert gets a zero gate and a doubled down projection "
        "(exact); without rmoe shared experts it is a width-1 shared expert of zeros",
    ),
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    config_class="Qwen3MoeConfig",
    model_class="Qwen3MoeForCausalLM",
    fields=MappingProxyType({**_QWEN_FIELDS, "head_dim": "head_dim"}),
    constants=MappingProxyType(
        {
            "hidden_act": "silu",
            "decoder_sparse_step": 1,
            "use_sliding_window": False,
            "attention_bias": False,
        }
    ),
    derived=MappingProxyType({"rope_parameters": _ROPE}),
    requirements=QWEN3_REQUIREMENTS,
    tensors=(
        *_ATTENTION,
        *_QK_NORM,
        *_moe_rows("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
        *_DENSE,
    ),
)

FAMILIES: Mapping[str, Family] = MappingProxyType(
    {f.name: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}
)
"""Target name (``rmoe export --to``, HF ``model_type``) -> `Family`."""


def get_family(name: str) -> Family:
    """The family called `name`; ValueError listing the choices otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown export target {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------------------------
# Plans and expansion
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a table's expansion needs to know about one model, from either side's config.

    Attributes:
        num_layers: decoder layers L.
        moe_layers: indices of the layers with an MoE block (the others are dense).
        num_experts: routed experts E.
        dims: sizes of the symbolic `Zeros` dimensions: "1", "D", "Q", "KV".
        flags: "tied" (tied embeddings), "shared_experts" (the model has shared experts),
            "qk_norm" (per-head q/k norm) — the `TensorRule.when` conditions.
    """

    num_layers: int
    moe_layers: frozenset[int]
    num_experts: int
    dims: Mapping[str, int]
    flags: Mapping[str, bool]


def _dims(config: Any) -> dict[str, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "1": 1,
        "D": config.hidden_size,
        "Q": config.num_attention_heads * head_dim,
        "KV": config.num_key_value_heads * head_dim,
    }


def plan_from_rmoe(config: Any) -> Plan:
    """The `Plan` of an rmoe config (`rmoe.RMoEConfig`)."""
    return Plan(
        num_layers=config.num_hidden_layers,
        moe_layers=frozenset(config.moe_layer_indices),
        num_experts=config.num_experts,
        dims=_dims(config),
        flags={
            "tied": bool(config.tie_word_embeddings),
            "shared_experts": config.num_shared_experts > 0,
            "qk_norm": bool(getattr(config, "qk_norm", False)),
        },
    )


def plan_from_hf(family: Family, config: Any) -> Plan:
    """The `Plan` of a `family` HF config (for the import direction): layers in
    ``mlp_only_layers`` or off the ``decoder_sparse_step`` are dense; Qwen2-MoE always has a
    shared expert, Qwen3-MoE always a q/k norm."""
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    moe = frozenset(
        i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0
    )
    return Plan(
        num_layers=config.num_hidden_layers,
        moe_layers=moe,
        num_experts=getattr(config, family.hf_field("num_experts")),
        dims=_dims(config),
        flags={
            "tied": bool(config.tie_word_embeddings),
            "shared_experts": family is QWEN2_MOE,
            "qk_norm": family is QWEN3_MOE,
        },
    )


@dataclass(frozen=True)
class Entry:
    """One expanded row: the rmoe key (None for an HF-only tensor), its HF keys (E of them
    for `PerExpert`, else one) and the layout."""

    rmoe: str | None
    hf: tuple[str, ...]
    layout: Layout


def _layers(where: str, plan: Plan) -> list[int | None]:
    if where == "once":
        return [None]
    everything = range(plan.num_layers)
    if where == "layer":
        return list(everything)
    if where == "moe":
        return [i for i in everything if i in plan.moe_layers]
    if where == "dense":
        return [i for i in everything if i not in plan.moe_layers]
    raise ValueError(f"TensorRule.where must be one of {WHERE}, got {where!r}")


def expand(family: Family, plan: Plan) -> list[Entry]:
    """The concrete rows of `family`'s tensor table for a model with `plan`, in table order
    (layer by layer within each row)."""
    out: list[Entry] = []
    for rule in family.tensors:
        if rule.when is not None and plan.flags.get(rule.when[0], False) != rule.when[1]:
            continue
        for i in _layers(rule.where, plan):
            rm = None if rule.rmoe is None else rule.rmoe.format(i=i)
            if isinstance(rule.layout, PerExpert):
                hf = tuple(rule.hf.format(i=i, e=e) for e in range(plan.num_experts))
            else:
                hf = (rule.hf.format(i=i),)
            out.append(Entry(rm, hf, rule.layout))
    return out
