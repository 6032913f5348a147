"""The table types behind :mod:`rmoe.integrations.families`: layouts, rows, plans, expansion.

A `Family` (defined here, filled in by `families`) is a declarative table of one transformers
architecture read in both directions (see the `families` module docstring for what it holds).
This module has no family in it: the `Layout` classes (how one rmoe tensor becomes HF tensors
and back), the row and field types (`TensorRule`, `Requirement`, `Derived`, `Accept`), the
`Plan` of one model and `expand`, which turns a table and a plan into concrete `Entry` rows.

Shapes: D model width, E experts, F expert hidden width, Q = heads * head_dim,
KV = key/value heads * head_dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    rmoe's; an import takes the HF model exactly only where this tensor is all zeros (and
    refuses it otherwise)."""

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

Condition = tuple[tuple[str, bool], ...]


@dataclass(frozen=True)
class TensorRule:
    """One row of a family's tensor table.

    Attributes:
        rmoe: the rmoe state-dict key template (``{i}`` = layer), or None for an HF-only tensor
            (its layout is then `Zeros`).
        hf: the HF key template (``{i}`` = layer, ``{e}`` = expert for `PerExpert`).
        where: one of `WHERE`.
        layout: `Same`, `PerExpert`, `Scaled` or `Zeros`.
        when: ((flag, value), ...): the row applies only when `Plan.flags[flag] == value` for
            every pair (empty = always).
        note: why the row is what it is, when that is not obvious.
    """

    rmoe: str | None
    hf: str
    where: str = "layer"
    layout: Layout = SAME
    when: Condition = ()
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
    inverse `to_rmoe(value) -> {rmoe field: value}` (which raises ValueError for a value rmoe
    cannot represent)."""

    to_hf: Callable[[Any], Any]
    to_rmoe: Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class Accept:
    """How an import judges an HF config field rmoe has no field for: `problem(hf_config)`
    says why the checkpoint cannot be taken exactly (None = fine), `note(hf_config)` what the
    user should know (None = nothing)."""

    problem: Callable[[Any], str | None]
    note: Callable[[Any], str | None] = lambda c: None


@dataclass(frozen=True)
class Family:
    """A transformers architecture as a two-way table (see the module docstring)."""

    name: str
    config_class: str
    model_class: str
    fields: Mapping[str, str]
    constants: Mapping[str, Any]
    derived: Mapping[str, Derived]
    requirements: tuple[Requirement, ...]
    tensors: tuple[TensorRule, ...]
    notes: tuple[str, ...] = field(default=())
    accepts: Mapping[str, Accept] = field(default_factory=dict)
    implied: Mapping[str, Any] = field(default_factory=dict)
    moe: bool = True

    def hf_field(self, rmoe_field: str) -> str:
        """The HF config field that carries `rmoe_field` in this family."""
        for hf, rm in self.fields.items():
            if rm == rmoe_field:
                return hf
        raise KeyError(f"{self.name} has no config field for rmoe's {rmoe_field!r}")


def rmoe_setting(config: Any, name: str) -> Any:
    """An rmoe config's setting `name`, with the architecture options an older config lacks
    read as off (``qk_norm`` "none", biases and the shared-expert gate False, no rope scaling)."""
    off = {"qk_norm": "none", "rope_scaling": None, "router_base_linear": False}
    value = getattr(config, name, off.get(name, False))
    if name == "qk_norm" and value in (None, False):
        return "none"
    return value


# ----------------------------------------------------------------------------------------------
# Plans and expansion
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a table's expansion needs to know about one model, from either side's config.

    Attributes:
        num_layers: decoder layers L.
        moe_layers: indices of the layers with an MoE block (the others are dense).
        num_experts: routed experts E (0 for a dense model).
        dims: sizes of the symbolic `Zeros` dimensions: "1", "D", "Q", "KV".
        flags: the `TensorRule.when` conditions: "tied" (tied embeddings), "shared_experts",
            "shared_gate" (a sigmoid gate on them), "qk_norm" (any q/k norm), "attn_bias"
            (q/k/v biases), "attn_out_bias" (o_proj bias).
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


def flags_of(settings: Any) -> dict[str, bool]:
    """The `Plan.flags` of an rmoe config (or a namespace of rmoe settings)."""
    return {
        "tied": bool(settings.tie_word_embeddings),
        "shared_experts": getattr(settings, "num_shared_experts", 0) > 0,
        "shared_gate": bool(rmoe_setting(settings, "shared_expert_gate")),
        "qk_norm": rmoe_setting(settings, "qk_norm") != "none",
        "attn_bias": bool(rmoe_setting(settings, "attention_bias")),
        "attn_out_bias": bool(rmoe_setting(settings, "attention_out_bias")),
    }


def plan_from_rmoe(config: Any) -> Plan:
    """The `Plan` of an rmoe config (`rmoe.RMoEConfig`)."""
    return Plan(
        num_layers=config.num_hidden_layers,
        moe_layers=frozenset(config.moe_layer_indices),
        num_experts=config.num_experts,
        dims=_dims(config),
        flags=flags_of(config),
    )


def hf_moe_layers(family: Family, config: Any) -> frozenset[int]:
    """The MoE layers of a `family` HF config: those not in ``mlp_only_layers`` and on the
    ``decoder_sparse_step``; none for a dense family."""
    if not family.moe:
        return frozenset()
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    layers = range(config.num_hidden_layers)
    return frozenset(i for i in layers if i not in dense and (i + 1) % step == 0)


def settings_from_hf(family: Family, config: Any) -> dict[str, Any]:
    """The rmoe settings a `family` HF config maps to, by the tables alone (fields, derived
    inverses, implied settings, dense layers from the plan); no checks (see
    `rmoe.integrations.importing` for those)."""
    kw: dict[str, Any] = {rm: getattr(config, hf, None) for hf, rm in family.fields.items()}
    for hf, derived in family.derived.items():
        kw.update(derived.to_rmoe(getattr(config, hf)))
    kw.update(family.implied)
    if family.moe:
        moe = hf_moe_layers(family, config)
        kw["mlp_only_layers"] = [i for i in range(config.num_hidden_layers) if i not in moe]
    return kw


def plan_from_hf(family: Family, config: Any) -> Plan:
    """The `Plan` of a `family` HF config (for the import direction)."""
    settings = settings_from_hf(family, config)
    ns = type("Settings", (), {"num_shared_experts": 0, **settings})
    return Plan(
        num_layers=config.num_hidden_layers,
        moe_layers=hf_moe_layers(family, config),
        num_experts=getattr(config, family.hf_field("num_experts")) if family.moe else 0,
        dims=_dims(config),
        flags=flags_of(ns),
    )


@dataclass(frozen=True)
class Entry:
    """One expanded row: the rmoe key (None for an HF-only tensor), its HF keys (E of them
    for `PerExpert`, else one) and the layout."""

    rmoe: str | None
    hf: tuple[str, ...]
    layout: Layout
    note: str = ""


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


def applies(rule: TensorRule, plan: Plan) -> bool:
    """Whether `rule`'s conditions hold for `plan`."""
    return all(plan.flags.get(flag, False) == value for flag, value in rule.when)


def expand(family: Family, plan: Plan) -> list[Entry]:
    """The concrete rows of `family`'s tensor table for a model with `plan`, in table order
    (layer by layer within each row)."""
    out: list[Entry] = []
    for rule in family.tensors:
        if not applies(rule, plan):
            continue
        for i in _layers(rule.where, plan):
            rm = None if rule.rmoe is None else rule.rmoe.format(i=i)
            if isinstance(rule.layout, PerExpert):
                hf = tuple(rule.hf.format(i=i, e=e) for e in range(plan.num_experts))
            else:
                hf = (rule.hf.format(i=i),)
            out.append(Entry(rm, hf, rule.layout, rule.note))
    return out
