"""Routers: scores and a choice of experts per token.

Shapes: N flattened tokens (B*T), D model width, E experts, K top-k, P router state width.

Every router maps (x [N, D], state, cell) -> `RoutingResult`. Plain routers ("linear", "mlp",
"cosine", "xmoe", "random") ignore the state and pass it on. The recurrent router (RMoE,
arXiv 2408.06793) computes, per MoE layer i,

    x'_i = Proj_i(x_i)              Proj_i: D -> P (per layer)
    h_i  = Cell(x'_i, h_{i-1})      ONE cell shared by all MoE layers, h_0 = 0
    logits_i = Scorer_i(h_i)        per-layer scorer P -> E (linear by default)

The state is per token and carried over depth only; the model threads it explicitly from layer
to layer (it is never stored on a module). Routing math is float32 whatever the model dtype:
softmax over all E experts, top-K, renormalise when `norm_topk_prob`.

A new router is one class registered in `ROUTERS` at the bottom of this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RMoEConfig


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
class LinearScorer(nn.Module):
    """logits = W x (+ b). W: [E, in_dim]."""

    def __init__(self, in_dim: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Linear(in_dim, num_experts, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, E]."""
        return self.weight(x)


class MLPScorer(nn.Module):
    """Two-layer GELU MLP router (the paper's SMoE-MLP): W2 gelu(W1 x)."""

    def __init__(self, in_dim: int, hidden: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, num_experts, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, E]."""
        return self.fc2(F.gelu(self.fc1(x)))


class CosineScorer(nn.Module):
    """Cosine between the L2-normalised input and L2-normalised expert embeddings, over a
    learnable temperature: logits = cos(x, e_j) / tau. Optional down-projection first (XMoE)."""

    def __init__(
        self, in_dim: int, num_experts: int, tau_init: float, proj_dim: int | None = None
    ) -> None:
        super().__init__()
        self.down = nn.Linear(in_dim, proj_dim, bias=False) if proj_dim is not None else None
        dim = proj_dim if proj_dim is not None else in_dim
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, dim))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(tau_init)))

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


def build_scorer(kind: str, in_dim: int, config: RMoEConfig) -> nn.Module:
    """A scorer of `kind` ("linear", "mlp", "cosine", "xmoe") on `in_dim` inputs."""
    e = config.num_experts
    if kind == "linear":
        return LinearScorer(in_dim, e, bias=config.router_bias)
    if kind == "mlp":
        return MLPScorer(in_dim, config.router_mlp_hidden, e, bias=config.router_bias)
    if kind == "cosine":
        return CosineScorer(in_dim, e, config.router_temperature_init)
    if kind == "xmoe":
        return CosineScorer(in_dim, e, config.router_temperature_init, config.router_xmoe_dim)
    raise ValueError(f"unknown scorer {kind!r}; expected linear, mlp, cosine or xmoe")


# ----------------------------------------------------------------------------------------------
# The shared recurrent cell
# ----------------------------------------------------------------------------------------------
_GATES = {"gru": 3, "rnn": 1, "lstm": 4}


class RecurrentCell(nn.Module):
    """The recurrent cell shared by all MoE layers of an RMoE model (input width = state width = P).

    Weights follow `torch.nn.GRUCell` / `RNNCell` (tanh) / `LSTMCell` layout and gate order, so
    this cell equals them given the same weights:
    weight_ih, weight_hh: [G*P, P], bias_ih, bias_hh: [G*P], G = 3 (gru), 1 (rnn), 4 (lstm).
    The state is [N, P]; for "lstm" it is [N, 2P] = concat(h, c), and `output` returns h.
    """

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        if kind not in _GATES:
            raise ValueError(f"unknown router_cell {kind!r}; expected one of {list(_GATES)}")
        self.kind = kind
        self.dim = dim
        g = _GATES[kind]
        self.weight_ih = nn.Parameter(torch.empty(g * dim, dim))
        self.weight_hh = nn.Parameter(torch.empty(g * dim, dim))
        self.bias_ih = nn.Parameter(torch.empty(g * dim))
        self.bias_hh = nn.Parameter(torch.empty(g * dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default recurrent init: U(-1/sqrt(P), 1/sqrt(P)) for every tensor."""
        bound = 1.0 / math.sqrt(self.dim)
        with torch.no_grad():
            for p in (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh):
                p.uniform_(-bound, bound)

    @property
    def state_dim(self) -> int:
        """Width of the carried state: P, or 2P for an LSTM (h and c)."""
        return 2 * self.dim if self.kind == "lstm" else self.dim

    def zero_state(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """h_0 = 0: [n, state_dim] with like's dtype and device."""
        return like.new_zeros(n, self.state_dim)

    def output(self, state: torch.Tensor) -> torch.Tensor:
        """The cell output h ([N, P]) from a state ([N, state_dim])."""
        return state[..., : self.dim]

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One step: x [N, P], state [N, state_dim] -> new state [N, state_dim]."""
        p = self.dim
        h = state[..., :p]
        gi = F.linear(x, self.weight_ih, self.bias_ih)
        gh = F.linear(h, self.weight_hh, self.bias_hh)
        if self.kind == "gru":
            i_r, i_z, i_n = gi.chunk(3, dim=-1)
            h_r, h_z, h_n = gh.chunk(3, dim=-1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            return (1.0 - z) * n + z * h
        if self.kind == "rnn":
            return torch.tanh(gi + gh)
        c = state[..., p:]
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return torch.cat([h_new, c_new], dim=-1)


def build_router_cell(config: RMoEConfig) -> RecurrentCell | None:
    """The one shared cell for a recurrent-router model, else None."""
    if config.router_type != "recurrent":
        return None
    return RecurrentCell(config.router_cell, config.router_dim)


# ----------------------------------------------------------------------------------------------
# Routers
# ----------------------------------------------------------------------------------------------
class Router(nn.Module):
    """Base router: subclasses implement `compute_logits`; this class adds jitter, the float32
    softmax, top-k and renormalisation."""

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter = config.router_jitter

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


class LinearRouter(Router):
    """SMoE: logits = W x."""

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        self.scorer = build_scorer("linear", config.hidden_size, config)

    def compute_logits(self, x, state, cell):
        return self.scorer(x), state


class MLPRouter(LinearRouter):
    """SMoE-MLP: a two-layer GELU MLP router."""

    def __init__(self, config: RMoEConfig) -> None:
        Router.__init__(self, config)
        self.scorer = build_scorer("mlp", config.hidden_size, config)


class CosineRouter(LinearRouter):
    """CosineMoE: cosine to expert embeddings over a learnable temperature."""

    def __init__(self, config: RMoEConfig) -> None:
        Router.__init__(self, config)
        self.scorer = build_scorer("cosine", config.hidden_size, config)


class XMoERouter(LinearRouter):
    """XMoE: down-project to `router_xmoe_dim`, L2-normalise, cosine, temperature."""

    def __init__(self, config: RMoEConfig) -> None:
        Router.__init__(self, config)
        self.scorer = build_scorer("xmoe", config.hidden_size, config)


class RandomRouter(LinearRouter):
    """RandomSMoE: a linear router whose weights stay frozen at their random init.

    The weights are created with requires_grad=False and used detached, so they stay frozen
    even if a loader or user flips requires_grad back on."""

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        for p in self.scorer.parameters():
            p.requires_grad_(False)

    def compute_logits(self, x, state, cell):
        lin = self.scorer.weight
        bias = None if lin.bias is None else lin.bias.detach()
        return F.linear(x, lin.weight.detach(), bias), state


class RecurrentRouter(Router):
    """RMoE: Proj_i (D -> P), the shared cell over depth, a per-layer scorer on h_i.

    `router_pass_state=False` (RMoE-NP) starts every layer from h_0 = 0; `router_detach_state`
    passes the state but stops its gradient. Both keep parameters and FLOPs identical to RMoE.
    """

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.router_dim, bias=config.router_bias)
        self.scorer = build_scorer(config.router_scorer, config.router_dim, config)
        self.pass_state = config.router_pass_state
        self.detach_state = config.router_detach_state

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


ROUTERS = MappingProxyType(
    {
        "linear": LinearRouter,
        "mlp": MLPRouter,
        "cosine": CosineRouter,
        "xmoe": XMoERouter,
        "random": RandomRouter,
        "recurrent": RecurrentRouter,
    }
)


def build_router(config: RMoEConfig) -> Router:
    """The router named by `config.router_type`."""
    try:
        cls = ROUTERS[config.router_type]
    except KeyError:
        raise ValueError(
            f"unknown router_type {config.router_type!r}; expected one of {list(ROUTERS)}"
        ) from None
    return cls(config)
