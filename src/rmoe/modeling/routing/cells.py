"""The recurrent cell shared by all MoE layers of an RMoE model (GRU, RNN, LSTM).

Registered in `rmoe.registry.CELLS` by `name`. Shapes: N tokens, P state width, G gates.

Each cell has two forwards: `reference_forward`, the gate-by-gate oracle (two `F.linear` then
the cell's `step` written out in Python), and `forward`, the fused path: torch's native cell op
(`torch.gru_cell`, `torch.rnn_tanh_cell`, `torch.lstm_cell`; one ATen call whose elementwise
gate math is a single fused kernel on CUDA, and fewer autograd nodes on CPU). Tests hold the two
equal; on a 2-core CPU (torch 2.13, fp32, N = 4096, P = 64) the fused GRU took 11.2 ms vs 13.9 ms
for forward + backward (median of 15, A/B interleaved).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config import RMoEConfig
from ...registry import CELLS, ROUTERS


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

    def __init__(self, dim: int, fused: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.fused = fused  # forward through torch's native cell op (`router_cell_fused`)
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
        """One step: x [N, P], state [N, state_dim] -> new state [N, state_dim] (the fused
        path where a subclass has one; equal to `reference_forward`)."""
        return self.reference_forward(x, state)

    def _fusable(self, x: torch.Tensor, state: torch.Tensor) -> bool:
        """Whether to take the fused path: `fused` on, and 2-D inputs of the weights' dtype
        (what torch's native cell ops take)."""
        return self.fused and x.dim() == 2 and x.dtype == state.dtype == self.weight_ih.dtype

    def reference_forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The oracle step, gate by gate: x [N, P], state [N, state_dim] -> [N, state_dim]."""
        h = state[..., : self.dim]
        gi = F.linear(x, self.weight_ih, self.bias_ih)
        gh = F.linear(h, self.weight_hh, self.bias_hh)
        return self.step(gi, gh, h, state)


@CELLS.register
class GRURouterCell(RecurrentCell):
    """GRU: r, z, n gates (torch.nn.GRUCell)."""

    name = "gru"
    gates = 3

    def forward(self, x, state):
        if not self._fusable(x, state):
            return self.reference_forward(x, state)
        return torch.gru_cell(x, state, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

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

    def forward(self, x, state):
        if not self._fusable(x, state):
            return self.reference_forward(x, state)
        return torch.rnn_tanh_cell(
            x, state, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        )

    def step(self, gi, gh, h, state):
        return torch.tanh(gi + gh)


@CELLS.register
class LSTMRouterCell(RecurrentCell):
    """LSTM: i, f, g, o gates (torch.nn.LSTMCell); the state is concat(h, c)."""

    name = "lstm"
    gates = 4
    state_factor = 2

    def forward(self, x, state):
        if not self._fusable(x, state):
            return self.reference_forward(x, state)
        h, c = state[..., : self.dim], state[..., self.dim :]
        h_new, c_new = torch.lstm_cell(
            x, (h, c), self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        )
        return torch.cat([h_new, c_new], dim=-1)

    def step(self, gi, gh, h, state):
        c = state[..., self.dim :]
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return torch.cat([h_new, c_new], dim=-1)


def build_cell(kind: str, dim: int, fused: bool = True) -> RecurrentCell:
    """The registered cell `kind` ("gru", ...) of width `dim` (ValueError naming the choices);
    `fused`: forward through torch's native cell op (else the gate-by-gate reference)."""
    return CELLS.lookup(kind)(dim, fused=fused)


def build_router_cell(config: RMoEConfig) -> RecurrentCell | None:
    """The one shared cell when `config.router_type` uses one (the recurrent router), else None."""
    if not ROUTERS.lookup(config.router_type).uses_cell:
        return None
    return build_cell(config.router_cell, config.router_dim, config.router_cell_fused)
