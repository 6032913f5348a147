"""Routers: one MoE layer's logits producer, composed with a score function and a selection.

Shapes: N flattened tokens (B*T), D model width, E experts, K top-k, P router state width.

A router is three stages (DESIGN.md, "A router is three stages"):

    logits = producer(x, state)        a registered `Router` subclass: `compute_logits`
             (+ alpha * previous layer's logits, `router_logit_residual`, RealFormer style)
    scores = score_fn(logits)          `router_score_func`: softmax or sigmoid (selection.py)
    (idx, weight) = select(scores, expert_bias, capacity)

Plain producers ("linear", "mlp", "cosine", "xmoe", "random") apply one scorer to x and pass
the state on. "shared" (Omni-Router, arXiv 2507.05724) applies ONE linear scorer that the model
owns and hands to every MoE layer. The recurrent producer (RMoE, arXiv 2408.06793) computes,
per MoE layer i,

    x'_i = Proj_i(x_i)              Proj_i: D -> P (per layer; one for all with router_share_proj)
    h_i  = Cell(x'_i, h_{i-1})      ONE cell shared by all MoE layers, h_0 = 0
    logits_i = Scorer_i(h_i)        per-layer scorer P -> E (linear by default)
             (+ W_i x_i             the retrofit router's linear base, router_base_linear)

The state is per token and carried over depth only; the model threads it explicitly from layer
to layer (it is never stored on a module). With a logit residual the state also carries the
layer's logits: [N, state_dim + E] (state_dim = 0 for producers without a cell).

The expert bias (aux-loss-free balancing, `router_expert_bias`) is a float32 buffer of each
router, saved with the model. Forward only reads it; in training the MoE block records the
step's expert loads with `record_load`, and `rmoe.modeling.balancing` updates the bias after
the optimizer step (summed over accumulation, all-reduced over ranks).

Routers are registered in `rmoe.registry.ROUTERS` by `name`; a new one is ONE class here with
its parameter / multiply-add count (`layer_counts`, plus `shared_counts` for a module the model
owns for all layers, built by `build_shared`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config import RMoEConfig
from ...registry import ROUTERS, SCORE_FUNCS, SCORERS
from .cells import RecurrentCell
from .init import RouterLinear
from .scorers import (
    CosineScorer,
    LinearScorer,
    MLPScorer,
    Scorer,
    XMoEScorer,
    build_scorer,
)
from .selection import capacity_keep, expert_capacity, select_experts


@dataclass
class RoutingResult:
    """What a router returns for one MoE layer.

    Attributes:
        logits: [N, E] float32 router logits (after any logit residual).
        probs: [N, E] float32 distribution over experts: the softmax, or the sigmoid scores
            normalised to sum to one (balance losses, entropies and GW-MoE read this).
        topk_idx: [N, K] int64 chosen experts (highest biased score first).
        topk_weight: [N, K] float32 combine weights (renormalised if `norm_topk_prob`, times
            `router_scale`; 0 for an assignment dropped by the capacity).
        state: router state to hand to the next MoE layer ([N, P], [N, 2P] for an LSTM cell
            holding (h, c), + E logits with a logit residual); the incoming state unchanged
            for stateless routers.
        scores: [N, E] float32 score-function output (= probs for softmax); None = probs.
        dropped: [N, K] bool, True for assignments over their expert's capacity; None when
            no capacity applies (dropless).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    state: torch.Tensor | None
    scores: torch.Tensor | None = None
    dropped: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scores is None:
            self.scores = self.probs

    @property
    def dropped_share(self) -> float:
        """Share of the N*K assignments dropped by the capacity (0.0 when dropless)."""
        return 0.0 if self.dropped is None else float(self.dropped.float().mean())


class Router(nn.Module):
    """Base router: subclasses implement `compute_logits`; this class adds jitter, the logit
    residual, the score function, the expert bias, top-k, renormalisation and capacity.

    Class attributes of a registered router:
        name: its `router_type`.
        uses_cell: it needs the model's shared recurrent cell (and carries a state).
        space: what the rows of its scoring weight live in (for analysis; `routing_space`).
        presets: experiment variants, suffix -> config keys they set ("" = the plain router);
            `router_presets()` names them "<name>" / "<name>-<suffix>".

    Buffers: `expert_bias` [E] float32 when `router_expert_bias` (else the attribute is None);
    it stays float32 when the model is cast to another dtype.
    """

    name: ClassVar[str]
    uses_cell: ClassVar[bool] = False
    space: ClassVar[str] = "router"
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = MappingProxyType({"": {}})

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter = config.router_jitter
        self.residual = config.router_logit_residual
        self.detach_residual = config.router_detach_residual
        self.score_fn = SCORE_FUNCS.lookup(config.router_score_func)
        self.scale = config.router_scale
        self.capacity_factor = config.capacity_factor
        self.eval_capacity_factor = config.eval_capacity_factor
        self.bias_update_rate = config.router_bias_update_rate
        if config.router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        else:
            self.expert_bias = None
        self._step_load: torch.Tensor | None = None  # expert loads since the last bias update

    @classmethod
    def layer_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        """(parameters, multiply-adds per token) of ONE MoE layer's router, without the cell
        or a module shared by all layers (whose multiply-adds it does include)."""
        raise NotImplementedError

    @classmethod
    def build_shared(cls, config: RMoEConfig) -> nn.Module | None:
        """The module the model owns and hands to every MoE layer's router (`shared`), or None."""
        return None

    @classmethod
    def shared_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        """(parameters, 0) of `build_shared`'s module; its multiply-adds are per layer."""
        return 0, 0

    @classmethod
    def routing_space(cls, config: RMoEConfig) -> str:
        """What the rows of this router's scoring weight live in, e.g. "model width D"."""
        return cls.space

    def compute_logits(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None,
        cell: RecurrentCell | None,
        shared: nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, D] -> (logits [N, E], new state)."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        bias = self.expert_bias
        out = super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = bias.to(device=self.expert_bias.device, dtype=torch.float32)
        return out

    def split_state(
        self, state: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(producer state or None, previous layer's logits [N, E] or None) from a state."""
        if not self.residual or state is None:
            return state, None
        e = self.num_experts
        return (state[..., :-e] if state.shape[-1] > e else None), state[..., -e:]

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        cell: RecurrentCell | None = None,
        shared: nn.Module | None = None,
    ) -> RoutingResult:
        """Route N tokens.

        Args:
            x: [N, D] the normalised FFN input (the same tensor the experts consume).
            state: incoming router state from the previous MoE layer, or None (first layer).
            cell: the model's shared recurrent cell (recurrent router), or None.
            shared: the model's module shared by every layer's router (`build_shared`), or None.
        """
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        inner, prev_logits = self.split_state(state)
        logits, new_state = self.compute_logits(x, inner, cell, shared)
        logits = logits.float()
        if self.residual:
            if prev_logits is not None:
                r = prev_logits.detach() if self.detach_residual else prev_logits
                logits = logits + self.residual * r.float()
            parts = [] if new_state is None else [new_state.float()]
            new_state = torch.cat([*parts, logits], dim=-1)
        scores = self.score_fn.scores(logits)
        weight, idx, dropped = self.select(scores)
        probs = self.score_fn.distribution(scores)
        return RoutingResult(logits, probs, idx, weight, new_state, scores, dropped)

    def select(
        self, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """scores [N, E] -> (weight [N, K], idx [N, K], dropped [N, K] bool or None): top-k of
        the biased scores, then the capacity of this mode (training / eval) if any."""
        weight, idx = select_experts(
            scores,
            self.top_k,
            bias=self.expert_bias,
            norm_topk_prob=self.norm_topk_prob,
            scale=self.scale,
        )
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return weight, idx, None
        cap = expert_capacity(scores.shape[0], self.top_k, self.num_experts, factor)
        keep = capacity_keep(idx, scores.gather(-1, idx), self.num_experts, cap)
        return weight * keep, idx, ~keep

    @torch.no_grad()
    def record_load(self, idx: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add this micro-batch's expert loads (assignments per expert, padding excluded) to
        the step's total; idx [N, K], token_mask [N] or None. Read by `take_load`."""
        w = torch.ones_like(idx, dtype=torch.float32)
        if token_mask is not None:
            w = w * token_mask.reshape(-1, 1).to(w.dtype)
        load = torch.zeros(self.num_experts, device=idx.device).index_add_(
            0, idx.reshape(-1), w.reshape(-1)
        )
        self._step_load = load if self._step_load is None else self._step_load + load

    def take_load(self) -> torch.Tensor:
        """The loads recorded since the last call ([E] float32, zeros if none), then reset."""
        load = self._step_load
        self._step_load = None
        if load is None:
            device = self.expert_bias.device if self.expert_bias is not None else "cpu"
            return torch.zeros(self.num_experts, device=device)
        return load


@ROUTERS.register
class LinearRouter(Router):
    """SMoE: logits = W x. Subclasses swap the scorer (`scorer_cls`) applied to x [N, D]."""

    name = "linear"
    space = "model width D"
    scorer_cls: ClassVar[type[Scorer]] = LinearScorer

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        self.scorer = self.scorer_cls.from_config(config.hidden_size, config)

    @classmethod
    def layer_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        return cls.scorer_cls.counts(config.hidden_size, config)

    def compute_logits(self, x, state, cell, shared):
        return self.scorer(x), state


@ROUTERS.register
class MLPRouter(LinearRouter):
    """SMoE-MLP: a two-layer GELU MLP router."""

    name = "mlp"
    space = "router MLP hidden layer"
    scorer_cls = MLPScorer


@ROUTERS.register
class CosineRouter(LinearRouter):
    """CosineMoE: cosine to expert embeddings over a learnable temperature."""

    name = "cosine"
    space = "expert embeddings (width D)"
    scorer_cls = CosineScorer


@ROUTERS.register
class XMoERouter(LinearRouter):
    """XMoE: down-project to `router_xmoe_dim`, L2-normalise, cosine, temperature."""

    name = "xmoe"
    scorer_cls = XMoEScorer

    @classmethod
    def routing_space(cls, config: RMoEConfig) -> str:
        return f"expert embeddings (width {config.router_xmoe_dim})"


@ROUTERS.register
class RandomRouter(LinearRouter):
    """RandomSMoE: a linear router whose weights stay frozen at their random init.

    The weights are created with requires_grad=False and used detached, so they stay frozen
    even if a loader or user flips requires_grad back on."""

    name = "random"
    space = "model width D (frozen)"

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        for p in self.scorer.parameters():
            p.requires_grad_(False)

    def compute_logits(self, x, state, cell, shared):
        lin = self.scorer.weight
        bias = None if lin.bias is None else lin.bias.detach()
        return F.linear(x, lin.weight.detach(), bias), state


@ROUTERS.register
class SharedRouter(Router):
    """Omni-Router (arXiv 2507.05724): ONE linear router weight W [E, D] shared by every MoE
    layer, logits_i = W x_i. The model owns W (`build_shared`); the layers own nothing."""

    name = "shared"
    space = "model width D (one weight for all layers)"

    @classmethod
    def build_shared(cls, config: RMoEConfig) -> nn.Module:
        return LinearScorer.from_config(config.hidden_size, config)

    @classmethod
    def layer_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        return 0, LinearScorer.counts(config.hidden_size, config)[1]

    @classmethod
    def shared_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        return LinearScorer.counts(config.hidden_size, config)[0], 0

    def compute_logits(self, x, state, cell, shared):
        if shared is None:
            raise ValueError("the shared router needs the model's shared router weight")
        return shared(x), state


def _recurrent_preset(pass_state: bool, detach: bool, scorer: type[Scorer]) -> Mapping[str, Any]:
    return MappingProxyType(
        {
            "router_pass_state": pass_state,
            "router_detach_state": detach,
            "router_scorer": scorer.name,
        }
    )


@ROUTERS.register
class RecurrentRouter(Router):
    """RMoE: Proj_i (D -> P), the shared cell over depth, a per-layer scorer on h_i.

    `router_pass_state=False` (RMoE-NP) starts every layer from h_0 = 0; `router_detach_state`
    passes the state but stops its gradient. Both keep parameters and FLOPs identical to RMoE.
    The paper's other ablations: "NP + r-alpha" (NP with `router_logit_residual=alpha`),
    "detach-r" (the same residual, detached) and "S-proj" (`router_share_proj`: one Proj for
    every layer, owned by the model).

    `router_base_linear` (the retrofit router) adds a per-layer linear base:
    logits_i = W_i x_i + Scorer_i(h_i), W_i = `base` [E, D] (no bias); see
    `rmoe.training.surgery.retrofit_recurrent`.
    """

    name = "recurrent"
    uses_cell = True
    space = "router state P (per-layer scorer on h_i)"
    presets = MappingProxyType(
        {
            "": _recurrent_preset(True, False, LinearScorer),
            "np": _recurrent_preset(False, False, LinearScorer),
            "detach": _recurrent_preset(True, True, LinearScorer),
            "xmoe": _recurrent_preset(True, False, XMoEScorer),
            "np-r0.5": {
                **_recurrent_preset(False, False, LinearScorer),
                "router_logit_residual": 0.5,
            },
            "np-r1": {
                **_recurrent_preset(False, False, LinearScorer),
                "router_logit_residual": 1.0,
            },
            "detach-r": {
                **_recurrent_preset(False, False, LinearScorer),
                "router_logit_residual": 1.0,
                "router_detach_residual": True,
            },
            "sproj": {**_recurrent_preset(True, False, LinearScorer), "router_share_proj": True},
        }
    )

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        d, p = config.hidden_size, config.router_dim
        self.proj = None if config.router_share_proj else RouterLinear.from_config(d, p, config)
        self.scorer = build_scorer(config.router_scorer, config.router_dim, config)
        self.pass_state = config.router_pass_state
        self.detach_state = config.router_detach_state
        # the retrofit router's linear base W_i [E, D] (only built when router_base_linear)
        self.base = (
            RouterLinear.from_config(d, config.num_experts, config, bias=False)
            if config.router_base_linear
            else None
        )

    @classmethod
    def build_shared(cls, config: RMoEConfig) -> nn.Module | None:
        """S-proj: one projector D -> P for every layer when `router_share_proj`."""
        if not config.router_share_proj:
            return None
        return RouterLinear.from_config(config.hidden_size, config.router_dim, config)

    @classmethod
    def _proj_params(cls, config: RMoEConfig) -> int:
        p = config.router_dim
        return config.hidden_size * p + (p if config.router_bias else 0)

    @classmethod
    def layer_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        d, p = config.hidden_size, config.router_dim
        sp, sm = SCORERS.lookup(config.router_scorer).counts(p, config)
        own_proj = 0 if config.router_share_proj else cls._proj_params(config)
        base = d * config.num_experts if config.router_base_linear else 0
        return own_proj + sp + base, d * p + sm + base

    @classmethod
    def shared_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        return (cls._proj_params(config) if config.router_share_proj else 0), 0

    def compute_logits(self, x, state, cell, shared):
        if cell is None:
            raise ValueError("the recurrent router needs the model's shared cell (cell=None)")
        proj = self.proj if self.proj is not None else shared
        if proj is None:
            raise ValueError("router_share_proj: the recurrent router needs the shared projector")
        xp = proj(x)
        if state is None or not self.pass_state:
            prev = cell.zero_state(x.shape[0], xp)
        else:
            prev = state.detach() if self.detach_state else state
        new_state = cell(xp, prev.to(xp.dtype))
        logits = self.scorer(cell.output(new_state))
        if self.base is not None:  # retrofit: W_i x_i + Scorer_i(h_i)
            logits = self.base(x) + logits
        return logits, new_state


def build_router(config: RMoEConfig) -> Router:
    """The router named by `config.router_type` (ValueError naming the choices)."""
    return ROUTERS.lookup(config.router_type)(config)


def build_shared_router(config: RMoEConfig) -> nn.Module | None:
    """The module every MoE layer's router shares (Omni-Router's weight, S-proj's projector),
    owned by the model; None when the router shares nothing."""
    return ROUTERS.lookup(config.router_type).build_shared(config)


def router_presets() -> dict[str, dict[str, Any]]:
    """Every registered router's experiment presets: "<name>" or "<name>-<suffix>" -> the model
    keys it sets (router_type first), in registration order."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in ROUTERS.items():
        for suffix, keys in cls.presets.items():
            out[f"{name}-{suffix}" if suffix else name] = {"router_type": name, **keys}
    return out
