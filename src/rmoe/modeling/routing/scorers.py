"""Scorers: in_dim -> E router logits, used on x (plain routers) or on the recurrent state h_i.

Shapes: N tokens, E experts. Registered in `rmoe.registry.SCORERS` by their `name`; each gives
its own parameter / multiply-add count (`counts`). Their linear layers are `RouterLinear`s, so
`router_init` reaches them.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...config import RMoEConfig
from ...registry import SCORERS
from .init import RouterLinear


def _init_kw(config: RMoEConfig) -> dict:
    """`RouterLinear` init keywords from `config` (router_init, router_init_std)."""
    return {"init": config.router_init, "std": config.router_init_std}


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

    def __init__(self, in_dim: int, num_experts: int, bias: bool = False, **init) -> None:
        super().__init__()
        self.weight = RouterLinear(in_dim, num_experts, bias=bias, **init)

    @classmethod
    def from_config(cls, in_dim: int, config: RMoEConfig) -> LinearScorer:
        return cls(in_dim, config.num_experts, bias=config.router_bias, **_init_kw(config))

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

    def __init__(
        self, in_dim: int, hidden: int, num_experts: int, bias: bool = False, **init
    ) -> None:
        super().__init__()
        self.fc1 = RouterLinear(in_dim, hidden, bias=bias, **init)
        self.fc2 = RouterLinear(hidden, num_experts, bias=bias, **init)

    @classmethod
    def from_config(cls, in_dim: int, config: RMoEConfig) -> MLPScorer:
        return cls(
            in_dim,
            config.router_mlp_hidden,
            config.num_experts,
            bias=config.router_bias,
            **_init_kw(config),
        )

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
        self,
        in_dim: int,
        num_experts: int,
        tau_init: float,
        proj_dim: int | None = None,
        **init,
    ) -> None:
        super().__init__()
        self.tau_init = tau_init
        self.down = RouterLinear(in_dim, proj_dim, bias=False, **init) if proj_dim else None
        dim = proj_dim if proj_dim is not None else in_dim
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, dim))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(tau_init)))

    @classmethod
    def from_config(cls, in_dim: int, config: RMoEConfig) -> CosineScorer:
        return cls(in_dim, config.num_experts, config.router_temperature_init, **_init_kw(config))

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
            in_dim,
            config.num_experts,
            config.router_temperature_init,
            config.router_xmoe_dim,
            **_init_kw(config),
        )

    @classmethod
    def counts(cls, in_dim: int, config: RMoEConfig) -> tuple[int, int]:
        e, r = config.num_experts, config.router_xmoe_dim
        return in_dim * r + e * r + 1, in_dim * r + r * e


def build_scorer(kind: str, in_dim: int, config: RMoEConfig) -> Scorer:
    """The registered scorer `kind` on `in_dim` inputs (ValueError naming the choices)."""
    return SCORERS.lookup(kind).from_config(in_dim, config)
