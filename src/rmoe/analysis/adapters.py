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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADAPTERS",
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

logger = logging.getLogger(__name__)

MATRIX_TYPES: tuple[str, ...] = ("act", "up", "down")
"""Canonical expert matrix names: act = gate_proj (W_act, Mixtral w1), up (w3), down (w2)."""

# Attribute names under which decoder layers keep their FFN / MoE block, in lookup order.
_BLOCK_ATTRS = ("mlp", "block_sparse_moe", "moe", "feed_forward")
_ROUTER_ATTRS = ("gate", "router")
# Per-expert module names: (act, up, down).
_EXPERT_LINEAR_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


# --------------------------------------------------------------------------------------------
# routing function
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingSpec:
    """How a model turns router logits into chosen experts and combine weights.

    Attributes:
        score: "softmax" (over all E experts) or "sigmoid" (per expert, DeepSeek-V3).
        num_experts: E routed experts.
        top_k: K experts per token.
        norm_topk_prob: the K selected scores are divided by their sum.
        routed_scaling_factor: combine weights are multiplied by this (DeepSeek); 1 elsewhere.
        group_score: None (plain top-k), "max" (DeepSeek-V2 ``group_limited_greedy``: a group
            scores its best expert) or "top2_sum" (DeepSeek-V3: the sum of its two best).
        num_groups: expert groups for group-limited selection (1 = none).
        topk_groups: groups kept per token before the top-k.
        score_correction_bias: selection uses scores + a per-expert bias (DeepSeek-V3's
            aux-loss-free balancing) while the combine weights use the unbiased scores.
        num_shared_experts: always-on shared experts (their width is in :class:`ExpertWeights`).
        shared_expert_gate: None, or "sigmoid" when a learned sigmoid gate scales the shared
            expert's output (Qwen2-MoE).
        router: short description of the router (e.g. "linear", "recurrent:gru+linear").
    """

    score: str
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    routed_scaling_factor: float = 1.0
    group_score: str | None = None
    num_groups: int = 1
    topk_groups: int = 1
    score_correction_bias: bool = False
    num_shared_experts: int = 0
    shared_expert_gate: str | None = None
    router: str = "linear"

    def __post_init__(self) -> None:
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid'; got {self.score!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts] = [1, {self.num_experts}]; got {self.top_k}"
            )
        if self.group_score not in (None, "max", "top2_sum"):
            raise ValueError(
                f"group_score must be None, 'max' or 'top2_sum'; got {self.group_score!r}"
            )
        if self.group_score is not None and self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} must divide num_experts={self.num_experts}"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class RoutingDecision:
    """The result of :func:`route` for N tokens.

    Attributes:
        scores: [N, E] float32 raw scores (softmax or sigmoid of the logits).
        probs: [N, E] float32 scores normalised to sum to 1 per token (equal to ``scores`` for
            a softmax router) — what :mod:`rmoe.analysis.routing` expects.
        topk_idx: [N, K] int64 chosen experts, highest selection score first.
        topk_weight: [N, K] float32 combine weights in the same order.
    """

    scores: torch.Tensor
    probs: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor


def _scores(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """[N, E] logits -> [N, E] float32 softmax or sigmoid scores."""
    z = logits.float()
    return torch.softmax(z, dim=-1) if spec.score == "softmax" else torch.sigmoid(z)


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _selection_scores(
    scores: torch.Tensor, spec: RoutingSpec, bias: torch.Tensor | None
) -> torch.Tensor:
    """[N, E] scores used to pick the experts (bias added, groups outside the best masked)."""
    sel = scores if bias is None else scores + bias.float().to(scores.device)
    if spec.group_score is None or spec.num_groups <= 1:
        return sel
    n, e = sel.shape
    grouped = sel.view(n, spec.num_groups, e // spec.num_groups)
    if spec.group_score == "max":
        group_scores = grouped.max(dim=-1).values
        fill = 0.0  # DeepSeek-V2 masks with zeros (scores are non-negative)
    else:
        group_scores = grouped.topk(min(2, e // spec.num_groups), dim=-1).values.sum(dim=-1)
        fill = float("-inf")
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(spec.topk_groups, dim=-1).indices, True)
    mask = keep[:, :, None].expand_as(grouped).reshape(n, e)
    return sel.masked_fill(~mask, fill)


def route(
    logits: torch.Tensor, spec: RoutingSpec, bias: torch.Tensor | None = None
) -> RoutingDecision:
    """Reproduce a model's gate from its router logits.

    scores = softmax(logits) or sigmoid(logits); selection scores = scores (+ ``bias``), with
    all but the best ``topk_groups`` groups masked for group-limited routing; the K experts with
    the highest selection scores are chosen; their combine weights are the (unbiased) scores,
    divided by their sum when ``norm_topk_prob`` and multiplied by ``routed_scaling_factor``.

    Args:
        logits: [N, E] router logits.
        spec: the model's :class:`RoutingSpec`.
        bias: [E] score-correction bias (DeepSeek-V3), or None.

    Returns:
        :class:`RoutingDecision` with scores/probs [N, E] and topk_idx/topk_weight [N, K].
    """
    if logits.ndim != 2 or logits.shape[-1] != spec.num_experts:
        raise ValueError(
            f"logits must have shape [N, E] = [N, {spec.num_experts}]; got {tuple(logits.shape)}"
        )
    scores = _scores(logits, spec)
    sel = _selection_scores(scores, spec, bias)
    idx = sel.topk(spec.top_k, dim=-1).indices
    weight = scores.gather(1, idx)
    if spec.norm_topk_prob:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    weight = weight * spec.routed_scaling_factor
    probs = scores if spec.score == "softmax" else _normalise(scores)
    return RoutingDecision(scores, probs, idx, weight)


# --------------------------------------------------------------------------------------------
# expert matrices
# --------------------------------------------------------------------------------------------


@dataclass
class ExpertWeights:
    """One MoE layer's expert matrices in the canonical orientation (one row per neuron).

    Attributes:
        act: [E, F, D] gate projection (W_act; ``gate_proj``, Mixtral ``w1``).
        up: [E, F, D] up projection (``up_proj``, ``w3``).
        down: [E, F, D] down projection transposed (``down_proj``, ``w2``, stored as [E, D, F]).
        shared: {"act", "up", "down"} -> [F_s, D] for the layer's shared expert(s) (the
            concatenation of all shared experts, as the models run them), or None.
        layout: how the model stores them: "fused" (gate_up_proj [E, 2F, D]),
            "fused_transposed" ([E, D, 2F]), "separate" (gate/up/down 3-D tensors) or
            "modules" (one MLP module per expert).
    """

    act: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    shared: dict[str, torch.Tensor] | None = None
    layout: str = "separate"

    def as_dict(self) -> dict[str, torch.Tensor]:
        """{"act": [E, F, D], "up": [E, F, D], "down": [E, F, D]}."""
        return {"act": self.act, "up": self.up, "down": self.down}

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.act.shape[0])


def expert_forward(
    x: torch.Tensor,
    weights: ExpertWeights,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    experts: Sequence[int] | None = None,
    with_activations: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run every (or the listed) expert on every token, unweighted.

    E_n(x) = down_n(act_fn(act_n x) ⊙ up_n x), computed as batched matmuls in float32.

    Args:
        x: [N, D] MoE inputs.
        weights: the layer's :class:`ExpertWeights`.
        act_fn: the activation (SiLU for all supported families).
        experts: indices to run (default: all E).
        with_activations: also return a_n(x) = act_fn(act_n x).

    Returns:
        (outputs [E', N, D], activations [E', N, F] or None), E' = number of experts run.
    """
    sel = slice(None) if experts is None else torch.as_tensor(list(experts), dtype=torch.long)
    act, up, down = (w[sel].float() for w in (weights.act, weights.up, weights.down))
    xf = x.float().to(act.device)
    a = act_fn(torch.einsum("nd,efd->enf", xf, act))
    h = a * torch.einsum("nd,efd->enf", xf, up)
    out = torch.einsum("enf,efd->end", h, down)
    return out, (a if with_activations else None)


def _find_linear_triplet(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    for names in _EXPERT_LINEAR_NAMES:
        mods = [getattr(module, n, None) for n in names]
        if all(isinstance(m, nn.Module) and hasattr(m, "weight") for m in mods):
            return mods[0], mods[1], mods[2]
    return None


def _read_experts(experts: nn.Module, hidden_size: int) -> ExpertWeights:
    """Canonical [E, F, D] matrices from any supported expert container."""
    with torch.no_grad():
        gate_up = getattr(experts, "gate_up_proj", None)
        if isinstance(gate_up, torch.Tensor) and gate_up.ndim == 3:
            down = experts.down_proj
            if gate_up.shape[2] == hidden_size:  # [E, 2F, D], gate half first
                act, up = gate_up.detach().chunk(2, dim=1)
                return ExpertWeights(act, up, down.detach().transpose(1, 2), layout="fused")
            if gate_up.shape[1] == hidden_size:  # [E, D, 2F]; down already [E, F, D]
                act, up = gate_up.detach().chunk(2, dim=2)
                return ExpertWeights(
                    act.transpose(1, 2), up.transpose(1, 2), down.detach(), "fused_transposed"
                )
            raise ValueError(
                f"experts.gate_up_proj has shape {tuple(gate_up.shape)}, which matches neither "
                f"[E, 2F, D] nor [E, D, 2F] for D = {hidden_size}"
            )
        gate = getattr(experts, "gate_proj", None)
        if isinstance(gate, torch.Tensor) and gate.ndim == 3:  # rmoe: [E, F, D], down [E, D, F]
            return ExpertWeights(
                gate.detach(),
                experts.up_proj.detach(),
                experts.down_proj.detach().transpose(1, 2),
                layout="separate",
            )
        if isinstance(experts, (nn.ModuleList, list, tuple)) or hasattr(experts, "__iter__"):
            triplets = [_find_linear_triplet(m) for m in experts]
            if triplets and all(t is not None for t in triplets):
                act = torch.stack([t[0].weight.detach() for t in triplets])
                up = torch.stack([t[1].weight.detach() for t in triplets])
                down = torch.stack([t[2].weight.detach().T for t in triplets])
                return ExpertWeights(act, up, down, layout="modules")
    raise ValueError(
        f"cannot read expert weights from {type(experts).__name__}: expected fused "
        "gate_up_proj/down_proj tensors, 3-D gate_proj/up_proj/down_proj tensors, or a list of "
        "MLPs with gate_proj/up_proj/down_proj (or w1/w3/w2) linears"
    )


def _write_experts(experts: nn.Module, w: ExpertWeights, layout: str) -> None:
    """Copy canonical matrices back into the model's own layout (inverse of _read_experts)."""
    with torch.no_grad():
        if layout == "fused":
            experts.gate_up_proj.copy_(torch.cat([w.act, w.up], dim=1))
            experts.down_proj.copy_(w.down.transpose(1, 2))
        elif layout == "fused_transposed":
            experts.gate_up_proj.copy_(torch.cat([w.act, w.up], dim=1).transpose(1, 2))
            experts.down_proj.copy_(w.down)
        elif layout == "separate":
            experts.gate_proj.copy_(w.act)
            experts.up_proj.copy_(w.up)
            experts.down_proj.copy_(w.down.transpose(1, 2))
        elif layout == "modules":
            for e, module in enumerate(experts):
                act, up, down = _find_linear_triplet(module)  # type: ignore[misc]
                act.weight.copy_(w.act[e])
                up.weight.copy_(w.up[e])
                down.weight.copy_(w.down[e].T)
        else:  # pragma: no cover - layouts come from _read_experts
            raise ValueError(f"unknown expert layout {layout!r}")


def _read_mlp(module: nn.Module | None) -> dict[str, torch.Tensor] | None:
    """{"act", "up", "down"} -> [F_s, D] from a dense SwiGLU MLP, or None."""
    if module is None:
        return None
    trip = _find_linear_triplet(module)
    if trip is None:
        return None
    act, up, down = trip
    return {"act": act.weight.detach(), "up": up.weight.detach(), "down": down.weight.detach().T}


# --------------------------------------------------------------------------------------------
# layers and capture
# --------------------------------------------------------------------------------------------


@dataclass
class MoELayer:
    """References to one MoE layer's modules.

    Attributes:
        index: position among the model's MoE layers (0-based).
        layer_index: index of the decoder layer that holds it.
        block: the MoE block (its input is the normalised FFN input x [B, T, D]).
        router: the module that scores the experts (forward hooks go here).
        experts: the routed-experts container.
        shared: the shared-expert MLP, or None.
        shared_gate: the shared expert's gate (Qwen2-MoE), or None.
        router_space: what the router rows live in ("model width D", "router state P", ...).
    """

    index: int
    layer_index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None = None
    shared_gate: nn.Module | None = None
    router_space: str = "model width D"


@dataclass
class LayerCapture:
    """What :class:`RoutingCapture` recorded for one MoE layer, tokens concatenated in order.

    Attributes:
        layer: MoE layer index; ``layer_index``: its decoder layer.
        logits: [N, E] float32 router logits.
        topk_idx: [N, K] int64 the experts the model chose, highest selection score first.
        topk_weight: [N, K] float32 the model's combine weights, same order.
        inputs: [n, D] float32 MoE inputs of the first n tokens (``store_inputs``), or None.
        expert_outputs: [E, n, D] every expert's unweighted output on ``inputs``, or None.
        activations: [E, n, F] intermediate activations act_fn(W_act x) on ``inputs``, or None.
    """

    layer: int
    layer_index: int
    spec: RoutingSpec = field(repr=False)
    bias: torch.Tensor | None = field(repr=False)
    logits: torch.Tensor = field(repr=False)
    topk_idx: torch.Tensor = field(repr=False)
    topk_weight: torch.Tensor = field(repr=False)
    inputs: torch.Tensor | None = field(default=None, repr=False)
    expert_outputs: torch.Tensor | None = field(default=None, repr=False)
    activations: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        """N."""
        return int(self.logits.shape[0])

    @property
    def scores(self) -> torch.Tensor:
        """[N, E] raw router scores (softmax or sigmoid of the logits), for rank analyses."""
        return _scores(self.logits, self.spec)

    @property
    def probs(self) -> torch.Tensor:
        """[N, E] scores normalised to sum to 1 (the router's softmax for softmax routers)."""
        s = self.scores
        return s if self.spec.score == "softmax" else _normalise(s)


class RoutingCapture:
    """Forward hooks on every router of a model; use as a context manager (see module doc).

    Each forward pass inside the ``with`` block appends its tokens; :meth:`layer` returns them
    concatenated. The model's own choice of experts is recorded (sorted by selection score);
    when a router returns only logits (per-expert-module layouts), the choice is reproduced
    with :func:`route`.

    Args:
        adapter: the model's adapter.
        store_inputs: keep the MoE inputs x of the first this many tokens (0 = none).
        store_outputs: also run every expert on the kept inputs and keep outputs [E, n, D] and
            activations [E, n, F] (memory: E·n·(D + F) floats per layer).
    """

    def __init__(self, adapter: MoEAdapter, store_inputs: int = 0, store_outputs: bool = False):
        if store_inputs < 0:
            raise ValueError(f"store_inputs must be >= 0; got {store_inputs}")
        if store_outputs and store_inputs == 0:
            raise ValueError("store_outputs needs store_inputs > 0 (the tokens to run experts on)")
        self.adapter = adapter
        self.store_inputs = store_inputs
        self.store_outputs = store_outputs
        self._handles: list[Any] = []
        self._records: list[dict[str, list[torch.Tensor]]] = []
        self._stored: list[int] = []
        self._weights: dict[int, ExpertWeights] = {}
        self.clear()

    def clear(self) -> None:
        """Forget everything recorded so far."""
        n = self.adapter.num_layers
        self._records = [
            {k: [] for k in ("logits", "idx", "weight", "inputs", "outputs", "acts")}
            for _ in range(n)
        ]
        self._stored = [0] * n

    def __enter__(self) -> RoutingCapture:
        if self._handles:
            raise RuntimeError("this capture is already active")
        for layer in self.adapter.layers:
            self._handles.append(
                layer.router.register_forward_hook(self._make_hook(layer.index), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            self._record(i, x, output)

        return hook

    @torch.no_grad()
    def _record(self, i: int, x: torch.Tensor, output: Any) -> None:
        adapter = self.adapter
        logits, idx, weight = adapter.parse_router_output(i, output)
        logits = logits.detach().float().reshape(-1, adapter.spec.num_experts)
        bias = adapter.score_correction_bias(i)
        if idx is None:
            decision = route(logits, adapter.spec, bias)
            idx, weight = decision.topk_idx, decision.topk_weight
        else:
            idx = idx.detach().reshape(logits.shape[0], -1).long()
            weight = weight.detach().float().reshape(idx.shape)
            sel = _selection_scores(_scores(logits, adapter.spec), adapter.spec, bias)
            order = sel.gather(1, idx).argsort(dim=1, descending=True, stable=True)
            idx, weight = idx.gather(1, order), weight.gather(1, order)
        rec = self._records[i]
        rec["logits"].append(logits.cpu())
        rec["idx"].append(idx.cpu())
        rec["weight"].append(weight.float().cpu())
        room = self.store_inputs - self._stored[i]
        if room > 0 and x is not None:
            xs = x.detach().reshape(-1, x.shape[-1])[:room].float()
            self._stored[i] += xs.shape[0]
            rec["inputs"].append(xs.cpu())
            if self.store_outputs:
                if i not in self._weights:
                    self._weights[i] = adapter.expert_weights(i)
                out, acts = expert_forward(
                    xs, self._weights[i], adapter.act_fn, with_activations=True
                )
                rec["outputs"].append(out.cpu())
                rec["acts"].append(acts.cpu())  # type: ignore[union-attr]

    @property
    def num_layers(self) -> int:
        """Number of MoE layers hooked."""
        return self.adapter.num_layers

    def layer(self, i: int) -> LayerCapture:
        """The recording of MoE layer ``i`` (raises if nothing was captured)."""
        rec = self._records[i]
        if not rec["logits"]:
            raise ValueError(
                f"nothing was captured for MoE layer {i}; run the model inside `with capture:`"
            )

        def cat(key: str, dim: int = 0) -> torch.Tensor | None:
            return torch.cat(rec[key], dim=dim) if rec[key] else None

        return LayerCapture(
            layer=i,
            layer_index=self.adapter.layers[i].layer_index,
            spec=self.adapter.spec,
            bias=self.adapter.score_correction_bias(i),
            logits=cat("logits"),  # type: ignore[arg-type]
            topk_idx=cat("idx"),  # type: ignore[arg-type]
            topk_weight=cat("weight"),  # type: ignore[arg-type]
            inputs=cat("inputs"),
            expert_outputs=cat("outputs", 1),
            activations=cat("acts", 1),
        )

    @property
    def layers(self) -> list[LayerCapture]:
        """:meth:`layer` for every MoE layer."""
        return [self.layer(i) for i in range(self.num_layers)]

    def __iter__(self) -> Iterator[LayerCapture]:
        return iter(self.layers)


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"{type(model).__name__} has no decoder layers at model.model.layers or model.layers; "
        "pass a causal LM such as MixtralForCausalLM or RMoEForCausalLM"
    )


class MoEAdapter:
    """Base adapter. Subclasses set :attr:`family` and implement :meth:`_find_layers`,
    :meth:`_spec` and, if their router does not return ``(logits, weights, indices)``,
    :meth:`parse_router_output`."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.hidden_size = int(self.config.hidden_size)
        self.layers: list[MoELayer] = self._find_layers()
        if not self.layers:
            raise ValueError(
                f"found no MoE layers in {type(model).__name__} ({self.family}); every decoder "
                "layer is dense"
            )
        self.spec: RoutingSpec = self._spec()
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = self._act_fn()
        self._layouts: dict[int, str] = {}

    # -- to implement ----------------------------------------------------------------------
    def _find_layers(self) -> list[MoELayer]:
        raise NotImplementedError

    def _spec(self) -> RoutingSpec:
        raise NotImplementedError

    def _act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return F.silu

    # -- public interface ------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of MoE layers L."""
        return len(self.layers)

    @property
    def layer_indices(self) -> list[int]:
        """Decoder-layer index of each MoE layer."""
        return [layer.layer_index for layer in self.layers]

    def _layer(self, i: int) -> MoELayer:
        if not 0 <= i < self.num_layers:
            raise ValueError(f"MoE layer {i} is out of range; this model has {self.num_layers}")
        return self.layers[i]

    def router_weight(self, i: int) -> torch.Tensor:
        """[E, R] the rows that score the experts at MoE layer ``i`` (see ``router_space``)."""
        return self._layer(i).router.weight.detach()

    def score_correction_bias(self, i: int) -> torch.Tensor | None:
        """[E] the selection bias of MoE layer ``i`` (DeepSeek-V3), else None."""
        b = getattr(self._layer(i).router, "e_score_correction_bias", None)
        return b.detach().float() if isinstance(b, torch.Tensor) else None

    def router_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """[N, E] float32 router logits of MoE inputs x [N, D] (linear routers)."""
        w = self.router_weight(i)
        return F.linear(x.reshape(-1, x.shape[-1]).float(), w.float())

    def route(self, i: int, logits: torch.Tensor) -> RoutingDecision:
        """:func:`route` with this model's spec and layer ``i``'s bias."""
        return route(logits, self.spec, self.score_correction_bias(i))

    def expert_weights(self, i: int) -> ExpertWeights:
        """Canonical expert matrices of MoE layer ``i`` (views of the model's weights: do not
        modify in place; use :meth:`set_expert_weights`)."""
        layer = self._layer(i)
        w = _read_experts(layer.experts, self.hidden_size)
        w.shared = _read_mlp(layer.shared)
        self._layouts[i] = w.layout
        return w

    def set_expert_weights(self, i: int, weights: ExpertWeights) -> None:
        """Write canonical matrices back into the model's own layout at MoE layer ``i``."""
        current = self.expert_weights(i)
        for name in MATRIX_TYPES:
            got, want = getattr(weights, name).shape, getattr(current, name).shape
            if got != want:
                raise ValueError(f"{name} has shape {tuple(got)}; layer {i} needs {tuple(want)}")
        _write_experts(self._layer(i).experts, weights, current.layout)

    def expert_outputs(
        self,
        i: int,
        x: torch.Tensor,
        with_activations: bool = False,
        weights: ExpertWeights | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every routed expert of MoE layer ``i`` on inputs x [N, D]: outputs [E, N, D] and,
        if asked, activations [E, N, F] (see :func:`expert_forward`)."""
        w = weights if weights is not None else self.expert_weights(i)
        with torch.no_grad():
            return expert_forward(x, w, self.act_fn, with_activations=with_activations)

    def parse_router_output(
        self, i: int, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits [N, E], chosen indices [N, K] or None, weights [N, K] or None) from what the
        router module returned."""
        if isinstance(output, torch.Tensor):
            return output, None, None
        if isinstance(output, (tuple, list)) and len(output) >= 3:
            return output[0], output[2], output[1]
        raise ValueError(
            f"router of MoE layer {i} returned {type(output).__name__}; expected logits or "
            "(logits, weights, indices)"
        )

    def router_parameters(self, i: int) -> list[nn.Parameter]:
        """Trainable parameters of MoE layer ``i``'s router."""
        return [p for p in self._layer(i).router.parameters() if p.requires_grad]

    def shared_router_parameters(self) -> list[nn.Parameter]:
        """Trainable router parameters shared by all layers (rmoe's recurrent cell), else []."""
        return []

    def capture(self, store_inputs: int = 0, store_outputs: bool = False) -> RoutingCapture:
        """A :class:`RoutingCapture` for this model (use with ``with``)."""
        return RoutingCapture(self, store_inputs, store_outputs)

    def describe(self) -> dict:
        """JSON-ready summary: family, layers, spec, expert shapes and layout."""
        w = self.expert_weights(0)
        return {
            "family": self.family,
            "model_type": getattr(self.config, "model_type", None),
            "num_moe_layers": self.num_layers,
            "moe_layer_indices": self.layer_indices,
            "routing": self.spec.to_dict(),
            "expert_shape": {"E": w.num_experts, "F": int(w.act.shape[1]), "D": self.hidden_size},
            "shared_expert_width": None if w.shared is None else int(w.shared["act"].shape[0]),
            "expert_layout": w.layout,
            "router_space": self.layers[0].router_space,
        }


class HFMoEAdapter(MoEAdapter):
    """Shared logic of the transformers MoE families (router at ``block.gate``)."""

    def _find_layers(self) -> list[MoELayer]:
        found: list[MoELayer] = []
        for li, layer in enumerate(_decoder_layers(self.model)):
            for attr in _BLOCK_ATTRS:
                block = getattr(layer, attr, None)
                if block is None or not hasattr(block, "experts"):
                    continue
                router = next((getattr(block, a) for a in _ROUTER_ATTRS if hasattr(block, a)), None)
                if router is None:
                    continue
                shared = getattr(block, "shared_expert", None)
                if shared is None:
                    shared = getattr(block, "shared_experts", None)
                found.append(
                    MoELayer(
                        index=len(found),
                        layer_index=li,
                        block=block,
                        router=router,
                        experts=block.experts,
                        shared=shared,
                        shared_gate=getattr(block, "shared_expert_gate", None),
                    )
                )
                break
        return found

    def _act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        experts = self.layers[0].experts
        fn = getattr(experts, "act_fn", None)
        if fn is None and isinstance(experts, nn.ModuleList) and len(experts):
            fn = getattr(experts[0], "act_fn", None)
        if fn is None:
            from transformers.activations import ACT2FN

            fn = ACT2FN[getattr(self.config, "hidden_act", "silu")]
        return fn

    def _top_k(self) -> int:
        router = self.layers[0].router
        k = getattr(router, "top_k", None) or getattr(self.layers[0].block, "top_k", None)
        return int(k if k is not None else self.config.num_experts_per_tok)

    def _num_experts(self) -> int:
        return int(self.router_weight(0).shape[0])

    def _norm_topk(self, default: bool) -> bool:
        router = self.layers[0].router
        value = getattr(router, "norm_topk_prob", None)
        if value is None:
            value = getattr(self.config, "norm_topk_prob", default)
        return bool(value)

    def _num_shared(self) -> int:
        return 0 if self.layers[0].shared is None else 1


class MixtralAdapter(HFMoEAdapter):
    """Mixtral: softmax over all experts -> top-k -> renormalise."""

    family = "mixtral"
    model_types = ("mixtral",)

    def _spec(self) -> RoutingSpec:
        return RoutingSpec("softmax", self._num_experts(), self._top_k(), norm_topk_prob=True)


class OlmoeAdapter(HFMoEAdapter):
    """OLMoE: softmax -> top-k, renormalised only with ``norm_topk_prob`` (default off)."""

    family = "olmoe"
    model_types = ("olmoe",)

    def _spec(self) -> RoutingSpec:
        return RoutingSpec("softmax", self._num_experts(), self._top_k(), self._norm_topk(False))


class Qwen2MoeAdapter(HFMoEAdapter):
    """Qwen1.5/2-MoE: softmax -> top-k (``norm_topk_prob``), plus a shared expert scaled by a
    sigmoid gate."""

    family = "qwen2_moe"
    model_types = ("qwen2_moe",)

    def _spec(self) -> RoutingSpec:
        gated = self.layers[0].shared_gate is not None
        return RoutingSpec(
            "softmax",
            self._num_experts(),
            self._top_k(),
            self._norm_topk(False),
            num_shared_experts=self._num_shared(),
            shared_expert_gate="sigmoid" if gated else None,
        )


class Qwen3MoeAdapter(HFMoEAdapter):
    """Qwen3-MoE: softmax -> top-k, renormalised with ``norm_topk_prob``; no shared expert."""

    family = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def _spec(self) -> RoutingSpec:
        return RoutingSpec("softmax", self._num_experts(), self._top_k(), self._norm_topk(True))


class DeepseekV2Adapter(HFMoEAdapter):
    """DeepSeek-V2: softmax -> greedy or group-limited greedy top-k (a group scores its best
    expert), no renormalisation, weights × ``routed_scaling_factor``; shared experts; the first
    ``first_k_dense_replace`` layers are dense."""

    family = "deepseek_v2"
    model_types = ("deepseek_v2",)

    def _spec(self) -> RoutingSpec:
        router = self.layers[0].router
        method = getattr(router, "topk_method", getattr(self.config, "topk_method", "greedy"))
        grouped = method == "group_limited_greedy"
        return RoutingSpec(
            "softmax",
            self._num_experts(),
            self._top_k(),
            norm_topk_prob=False,
            routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
            group_score="max" if grouped else None,
            num_groups=int(getattr(router, "num_group", 1) or 1) if grouped else 1,
            topk_groups=int(getattr(router, "topk_group", 1) or 1) if grouped else 1,
            num_shared_experts=int(getattr(self.config, "n_shared_experts", 0) or 0),
        )


class DeepseekV3Adapter(HFMoEAdapter):
    """DeepSeek-V3: sigmoid scores; selection on scores + ``e_score_correction_bias`` within the
    best ``topk_group`` of ``n_group`` groups (a group scores the sum of its two best);
    weights = unbiased scores, renormalised with ``norm_topk_prob``, × ``routed_scaling_factor``;
    shared experts; the first ``first_k_dense_replace`` layers are dense."""

    family = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def _spec(self) -> RoutingSpec:
        router = self.layers[0].router
        return RoutingSpec(
            "sigmoid",
            self._num_experts(),
            self._top_k(),
            self._norm_topk(True),
            routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
            group_score="top2_sum",
            num_groups=int(getattr(router, "num_group", 1) or 1),
            topk_groups=int(getattr(router, "topk_group", 1) or 1),
            score_correction_bias=hasattr(router, "e_score_correction_bias"),
            num_shared_experts=int(getattr(self.config, "n_shared_experts", 0) or 0),
        )


class RMoEAdapter(MoEAdapter):
    """rmoe's own RMoEForCausalLM: any router type, including the recurrent (RMoE) router,
    whose rows live in the router-state space P (the per-layer scorer on h_i)."""

    family = "rmoe"
    model_types = ("rmoe",)

    def _find_layers(self) -> list[MoELayer]:
        cfg = self.config
        space = {
            "linear": "model width D",
            "random": "model width D (frozen)",
            "mlp": "router MLP hidden layer",
            "cosine": "expert embeddings (width D)",
            "xmoe": f"expert embeddings (width {getattr(cfg, 'router_xmoe_dim', '?')})",
            "recurrent": "router state P (per-layer scorer on h_i)",
        }.get(getattr(cfg, "router_type", "linear"), "router")
        found: list[MoELayer] = []
        for li, layer in enumerate(_decoder_layers(self.model)):
            moe = getattr(layer, "moe", None)
            if moe is None:
                continue
            found.append(
                MoELayer(
                    index=len(found),
                    layer_index=li,
                    block=moe,
                    router=moe.router,
                    experts=moe.experts,
                    shared=moe.shared_experts,
                    router_space=space,
                )
            )
        return found

    def _spec(self) -> RoutingSpec:
        cfg = self.config
        router = cfg.router_type
        if router == "recurrent":
            router = f"recurrent:{cfg.router_cell}+{cfg.router_scorer}"
            if not cfg.router_pass_state:
                router += " (no state passing)"
        return RoutingSpec(
            "softmax",
            int(cfg.num_experts),
            int(cfg.num_experts_per_tok),
            bool(cfg.norm_topk_prob),
            num_shared_experts=int(cfg.num_shared_experts),
            router=router,
        )

    def router_weight(self, i: int) -> torch.Tensor:
        """[E, R]: the linear scorer's weight, the cosine/XMoE expert embeddings, or the MLP
        router's output layer; for the recurrent router, the per-layer scorer on the state."""
        scorer = self._layer(i).router.scorer
        if hasattr(scorer, "expert_embeddings"):
            return scorer.expert_embeddings.detach()
        if hasattr(scorer, "fc2"):
            return scorer.fc2.weight.detach()
        return scorer.weight.weight.detach()

    def router_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """[N, E] logits of a stateless router on x [N, D]; the recurrent router's logits need
        the state of the previous layer, so use :meth:`capture` instead."""
        router = self._layer(i).router
        if self.config.router_type == "recurrent":
            raise ValueError(
                "the recurrent router's logits depend on the router state from the previous "
                "layer; run the model inside adapter.capture() to record them"
            )
        with torch.no_grad():
            logits, _ = router.compute_logits(x.reshape(-1, x.shape[-1]), None, None)
        return logits.float()

    def parse_router_output(
        self, i: int, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """rmoe routers return a ``RoutingResult``."""
        if hasattr(output, "topk_idx"):
            return output.logits, output.topk_idx, output.topk_weight
        return super().parse_router_output(i, output)

    def shared_router_parameters(self) -> list[nn.Parameter]:
        """The recurrent cell shared by all MoE layers (empty for other routers)."""
        cell = getattr(getattr(self.model, "model", self.model), "router_cell", None)
        return [] if cell is None else [p for p in cell.parameters() if p.requires_grad]


ADAPTERS: dict[str, type[MoEAdapter]] = {
    t: cls
    for cls in (
        RMoEAdapter,
        MixtralAdapter,
        OlmoeAdapter,
        Qwen2MoeAdapter,
        Qwen3MoeAdapter,
        DeepseekV2Adapter,
        DeepseekV3Adapter,
    )
    for t in cls.model_types
}
"""``config.model_type`` -> adapter class: the one place a family is registered."""


def supported_families() -> list[str]:
    """The ``model_type`` values :func:`get_adapter` accepts."""
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Raises:
        ValueError: the model type is not a supported MoE family (the message lists them).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = ADAPTERS.get(str(model_type))
    if cls is None:
        import difflib

        near = difflib.get_close_matches(str(model_type), list(ADAPTERS), n=1)
        hint = f" (nearest: {near[0]!r})" if near else ""
        raise ValueError(
            f"model type {model_type!r} is not a supported MoE family; supported: "
            f"{', '.join(supported_families())}{hint}"
        )
    return cls(model)
