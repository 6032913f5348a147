"""Routers: scores and a choice of experts per token.

Shapes: N flattened tokens (B*T), D model width, E experts, K top-k, P router state width.

Every router maps (x [N, D], state, cell) -> `RoutingResult`. Plain routers ("linear", "mlp",
"cosine", "xmoe", "random") apply one scorer to x, ignore the state and pass it on. The
recurrent router (RMoE, arXiv 2408.06793) computes, per MoE layer i,

    x'_i = Proj_i(x_i)              Proj_i: D -> P (per layer)
    h_i  = Cell(x'_i, h_{i-1})      ONE cell shared by all MoE layers, h_0 = 0
    logits_i = Scorer_i(h_i)        per-layer scorer P -> E (linear by default)

The state is per token and carried over depth only; the model threads it explicitly from layer
to layer (it is never stored on a module). Routing math is float32 whatever the model dtype:
softmax over all E experts, top-K, renormalise when `norm_topk_prob`.

Routers, scorers and cells are registered by name (`rmoe.registry`: ROUTERS, SCORERS, CELLS):
a new one is ONE class here with the class attribute `name`, its parameter / multiply-add count
(`layer_counts` / `counts`, read by `rmoe.modeling.accounting`) and, when it owns parameters
other than nn.Linear children, `init_parameters` (read by the model's weight init).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RMoEConfig
from ..registry import CELLS, ROUTERS, SCORERS


@dataclass
class RoutingResult:
    """What a router returns for one MoE layer.

    Attributes:
        logits: [N, E] float32 router logits.
        probs: [N, E] float32 softmax over all experts.
        topk_idx: [N, K] int64 chosen experts (highest probability first).
        topk_weight: [N, K] float32 combine weights (renormalised if `norm_topk_prob`).
        state: router state to hand to the next MoE layer ([N, P], or [N, 2P] for an LSTM
            cell holding (h, c)); the incoming state unchanged for stateless routers.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    state: torch.Tensor | None


def select_topk(
    logits: torch.Tensor, k: int, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over all experts in float32, then top-k, then optional renormalisation.

    Args:
        logits: [N, E].
        k: experts per token.
        norm_topk_prob: divide the k selected probabilities by their sum.

    Returns:
        probs [N, E] float32, topk_weight [N, K] float32, topk_idx [N, K] int64.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weight, idx = torch.topk(probs, k, dim=-1)
    if norm_topk_prob:
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return probs, weight, idx


# ----------------------------------------------------------------------------------------------
# Scorers: in_dim -> E logits. Used directly on x (plain routers) or on h_i (recurrent router).
# ----------------------------------------------------------------------------------------------
class Scorer(nn.Module):
    """Base scorer: x [N, in_dim] -> logits [N, E], registered in `SCORERS` by `name`.

    `on_state`: whether it may score the recurrent router's state (`router_scorer` choices).
    """

    name: ClassVar[str]
    on_state: ClassVar[bool] = True

    @classmethod
    def from_config(cls, in_dim: int, config: RMoEConfig) -> Scorer:
        """The scorer on `in_dim` inputs with `config`'s experts and router settings."""
        raise NotImplementedError

    @classmethod
    def counts(cls, in_dim: int, config: RMoEConfig) -> tuple[int, int]:
        """(parameters, multiply-adds per token) of one such scorer on `in_dim` inputs."""
        raise NotImplementedError


@SCORERS.register
class LinearScorer(Scorer):
    """logits = W x (+ b). W: [E, in_dim]."""

    name = "linear"

    def __init__(self, in_dim: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Linear(in_dim, num_experts, bias=bias)

    @classmethod
    def from_config(cls, in_dim: int, config: RMoEConfig) -> LinearScorer:
        return cls(in_dim, config.num_experts, bias=config.router_bias)

    @classmethod
    def counts(cls, in_dim: int, config: RMoEConfig) -> tuple[int, int]:
        e = config.num_experts
        return in_dim * e + (e if config.router_bias else 0), in_dim * e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, E]."""
        return self.weight(x)


@SCORERS.register
class MLPScorer(Scorer):
    """Two-layer GELU MLP router (the paper's SMoE-MLP): W2 gelu(W1 x), hidden width Hm."""

    name = "mlp"
    on_state = False

    def __init__(self, in_dim: int, hidden: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, num_experts, bias=bias)

    @classmethod
    def from_config(cls, in_dim: int, config: RMoEConfig) -> MLPScorer:
        return cls(in_dim, config.router_mlp_hidden, config.num_experts, bias=config.router_bias)

    @classmethod
    def counts(cls, in_dim: int, config: RMoEConfig) -> tuple[int, int]:
        e, hm = config.num_experts, config.router_mlp_hidden
        macs = in_dim * hm + hm * e
        return macs + ((hm + e) if config.router_bias else 0), macs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, E]."""
        return self.fc2(F.gelu(self.fc1(x)))


@SCORERS.register
class CosineScorer(Scorer):
    """Cosine between the L2-normalised input and L2-normalised expert embeddings, over a
    learnable temperature: logits = cos(x, e_j) / tau. Optional down-projection first (XMoE).

    expert_embeddings: [E, in_dim] (or [E, proj_dim]); log_temperature: scalar.
    """

    name = "cosine"

    def __init__(
        self, in_dim: int, num_experts: int, tau_init: float, proj_dim: int | None = None
    ) -> None:
        super().__init__()
        self.tau_init = tau_init
        self.down = nn.Linear(in_dim, proj_dim, bias=False) if proj_dim is not None else None
        dim = proj_dim if proj_dim is not None else in_dim
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, dim))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(tau_init)))

    @classmethod
    def from_config(cls, in_dim: int, config: RMoEConfig) -> CosineScorer:
        return cls(in_dim, config.num_experts, config.router_temperature_init)

    @classmethod
    def counts(cls, in_dim: int, config: RMoEConfig) -> tuple[int, int]:
        e = config.num_experts
        return e * in_dim + 1, in_dim * e

    def init_parameters(self, ops, std: float, std_out: float, generator=None) -> None:
        """Expert embeddings ~ N(0, std); temperature back to `tau_init` (`down` is a Linear)."""
        ops.normal_(self.expert_embeddings, mean=0.0, std=std, generator=generator)
        ops.constant_(self.log_temperature, math.log(self.tau_init))

    @property
    def temperature(self) -> torch.Tensor:
        """Current temperature tau (scalar), clamped to >= 0.01."""
        return self.log_temperature.exp().clamp_min(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, E]."""
        if self.down is not None:
            x = self.down(x)
        x = F.normalize(x.float(), dim=-1)
        e = F.normalize(self.expert_embeddings.float(), dim=-1)
        return (x @ e.t()) / self.temperature


@SCORERS.register
class XMoEScorer(CosineScorer):
    """XMoE: down-project to r = `router_xmoe_dim`, then the cosine scorer in r dimensions."""

    name = "xmoe"

    @classmethod
    def from_config(cls, in_dim: int, config: RMoEConfig) -> XMoEScorer:
        return cls(
            in_dim, config.num_experts, config.router_temperature_init, config.router_xmoe_dim
        )

    @classmethod
    def counts(cls, in_dim: int, config: RMoEConfig) -> tuple[int, int]:
        e, r = config.num_experts, config.router_xmoe_dim
        return in_dim * r + e * r + 1, in_dim * r + r * e


def build_scorer(kind: str, in_dim: int, config: RMoEConfig) -> Scorer:
    """The registered scorer `kind` on `in_dim` inputs (ValueError naming the choices)."""
    return SCORERS.lookup(kind).from_config(in_dim, config)


# ----------------------------------------------------------------------------------------------
# The shared recurrent cell
# ----------------------------------------------------------------------------------------------
class RecurrentCell(nn.Module):
    """The recurrent cell shared by all MoE layers of an RMoE model (input width = state width = P).

    Subclasses (registered in `CELLS`) follow `torch.nn.GRUCell` / `RNNCell` (tanh) /
    `LSTMCell` weight layout and gate order, so they equal them given the same weights:
    weight_ih, weight_hh: [G*P, P], bias_ih, bias_hh: [G*P], G = `gates`.
    The state is [N, state_dim]: [N, P], or [N, 2P] = concat(h, c) for the LSTM; `output`
    returns h.
    """

    name: ClassVar[str]
    gates: ClassVar[int]
    state_factor: ClassVar[int] = 1

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        g = self.gates
        self.weight_ih = nn.Parameter(torch.empty(g * dim, dim))
        self.weight_hh = nn.Parameter(torch.empty(g * dim, dim))
        self.bias_ih = nn.Parameter(torch.empty(g * dim))
        self.bias_hh = nn.Parameter(torch.empty(g * dim))
        self.reset_parameters()

    @classmethod
    def counts(cls, dim: int) -> tuple[int, int]:
        """(parameters, multiply-adds per token per step): both products are always counted."""
        g = cls.gates
        return 2 * g * dim * dim + 2 * g * dim, 2 * g * dim * dim

    def init_parameters(self, ops, std: float, std_out: float, generator=None) -> None:
        """PyTorch's default recurrent init: U(-1/sqrt(P), 1/sqrt(P)) for every tensor
        (`std` / `std_out` do not apply)."""
        bound = 1.0 / math.sqrt(self.dim)
        for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
            ops.uniform_(p, -bound, bound, generator=generator)

    def reset_parameters(self) -> None:
        """`init_parameters` with torch.nn.init and the global random stream."""
        self.init_parameters(nn.init, 0.0, 0.0)

    @property
    def state_dim(self) -> int:
        """Width of the carried state: P, or 2P for an LSTM (h and c)."""
        return self.state_factor * self.dim

    def zero_state(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """h_0 = 0: [n, state_dim] with like's dtype and device."""
        return like.new_zeros(n, self.state_dim)

    def output(self, state: torch.Tensor) -> torch.Tensor:
        """The cell output h ([N, P]) from a state ([N, state_dim])."""
        return state[..., : self.dim]

    def step(
        self, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, state: torch.Tensor
    ) -> torch.Tensor:
        """New state [N, state_dim] from the input and hidden products gi, gh [N, G*P], the
        output h [N, P] and the whole state [N, state_dim]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One step: x [N, P], state [N, state_dim] -> new state [N, state_dim]."""
        h = state[..., : self.dim]
        gi = F.linear(x, self.weight_ih, self.bias_ih)
        gh = F.linear(h, self.weight_hh, self.bias_hh)
        return self.step(gi, gh, h, state)


@CELLS.register
class GRURouterCell(RecurrentCell):
    """GRU: r, z, n gates (torch.nn.GRUCell)."""

    name = "gru"
    gates = 3

    def step(self, gi, gh, h, state):
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1.0 - z) * n + z * h


@CELLS.register
class RNNRouterCell(RecurrentCell):
    """Elman RNN with tanh (torch.nn.RNNCell)."""

    name = "rnn"
    gates = 1

    def step(self, gi, gh, h, state):
        return torch.tanh(gi + gh)


@CELLS.register
class LSTMRouterCell(RecurrentCell):
    """LSTM: i, f, g, o gates (torch.nn.LSTMCell); the state is concat(h, c)."""

    name = "lstm"
    gates = 4
    state_factor = 2

    def step(self, gi, gh, h, state):
        c = state[..., self.dim :]
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return torch.cat([h_new, c_new], dim=-1)


def build_cell(kind: str, dim: int) -> RecurrentCell:
    """The registered cell `kind` ("gru", ...) of width `dim` (ValueError naming the choices)."""
    return CELLS.lookup(kind)(dim)


def build_router_cell(config: RMoEConfig) -> RecurrentCell | None:
    """The one shared cell when `config.router_type` uses one (the recurrent router), else None."""
    if not ROUTERS.lookup(config.router_type).uses_cell:
        return None
    return build_cell(config.router_cell, config.router_dim)


# ----------------------------------------------------------------------------------------------
# Routers (logits producers)
# ----------------------------------------------------------------------------------------------
class Router(nn.Module):
    """Base router: subclasses implement `compute_logits`; this class adds jitter, the float32
    softmax, top-k and renormalisation.

    Class attributes of a registered router:
        name: its `router_type`.
        uses_cell: it needs the model's shared recurrent cell (and carries a state).
        space: what the rows of its scoring weight live in (for analysis; `routing_space`).
        presets: experiment variants, suffix -> config keys they set ("" = the plain router);
            `router_presets()` names them "<name>" / "<name>-<suffix>".
    """

    name: ClassVar[str]
    uses_cell: ClassVar[bool] = False
    space: ClassVar[str] = "router"
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = MappingProxyType({"": {}})

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter = config.router_jitter

    @classmethod
    def layer_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        """(parameters, multiply-adds per token) of ONE MoE layer's router, without the cell."""
        raise NotImplementedError

    @classmethod
    def routing_space(cls, config: RMoEConfig) -> str:
        """What the rows of this router's scoring weight live in, e.g. "model width D"."""
        return cls.space

    def compute_logits(
        self, x: torch.Tensor, state: torch.Tensor | None, cell: RecurrentCell | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, D] -> (logits [N, E], new state)."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        cell: RecurrentCell | None = None,
    ) -> RoutingResult:
        """Route N tokens.

        Args:
            x: [N, D] the normalised FFN input (the same tensor the experts consume).
            state: incoming router state from the previous MoE layer (recurrent router), or None.
            cell: the model's shared recurrent cell (recurrent router), or None.
        """
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise
        logits, new_state = self.compute_logits(x, state, cell)
        probs, weight, idx = select_topk(logits, self.top_k, self.norm_topk_prob)
        return RoutingResult(logits.float(), probs, idx, weight, new_state)


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

    def compute_logits(self, x, state, cell):
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

    def compute_logits(self, x, state, cell):
        lin = self.scorer.weight
        bias = None if lin.bias is None else lin.bias.detach()
        return F.linear(x, lin.weight.detach(), bias), state


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
        }
    )

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.router_dim, bias=config.router_bias)
        self.scorer = build_scorer(config.router_scorer, config.router_dim, config)
        self.pass_state = config.router_pass_state
        self.detach_state = config.router_detach_state

    @classmethod
    def layer_counts(cls, config: RMoEConfig) -> tuple[int, int]:
        d, p = config.hidden_size, config.router_dim
        sp, sm = SCORERS.lookup(config.router_scorer).counts(p, config)
        return d * p + (p if config.router_bias else 0) + sp, d * p + sm

    def compute_logits(self, x, state, cell):
        if cell is None:
            raise ValueError("the recurrent router needs the model's shared cell (cell=None)")
        xp = self.proj(x)
        if state is None or not self.pass_state:
            prev = cell.zero_state(x.shape[0], xp)
        else:
            prev = state.detach() if self.detach_state else state
        new_state = cell(xp, prev.to(xp.dtype))
        return self.scorer(cell.output(new_state)), new_state


def build_router(config: RMoEConfig) -> Router:
    """The router named by `config.router_type` (ValueError naming the choices)."""
    return ROUTERS.lookup(config.router_type)(config)


def router_presets() -> dict[str, dict[str, Any]]:
    """Every registered router's experiment presets: "<name>" or "<name>-<suffix>" -> the model
    keys it sets (router_type first), in registration order."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in ROUTERS.items():
        for suffix, keys in cls.presets.items():
            out[f"{name}-{suffix}" if suffix else name] = {"router_type": name, **keys}
    return out
