"""`RouterLinear`: the linear layer of every router, initialised by the config's `router_init`.

`router_init` = "uniform" (the default) is PyTorch's own nn.Linear default,
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias; "normal" draws the weight from
N(0, std) with std = `router_init_std` (None = the model's `initializer_range`: what every other
linear layer gets) and zero biases. The model's weight init calls `init_parameters` on each one.
"""

from __future__ import annotations

import math

from torch import nn

from ...config import RMoEConfig
from ...registry import ROUTER_INITS, check_choice


class RouterLinear(nn.Linear):
    """nn.Linear (weight [out, in]) that carries its own init (`init` in `ROUTER_INITS`, `std`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        init: str = "uniform",
        std: float | None = None,
    ) -> None:
        check_choice("router_init", init, ROUTER_INITS)
        super().__init__(in_features, out_features, bias=bias)
        self.init = init
        self.init_std = std

    @classmethod
    def from_config(
        cls, in_features: int, out_features: int, config: RMoEConfig, bias: bool | None = None
    ) -> RouterLinear:
        """A router linear layer with `config`'s router_init / router_init_std (and
        router_bias unless `bias` is given)."""
        return cls(
            in_features,
            out_features,
            bias=config.router_bias if bias is None else bias,
            init=config.router_init,
            std=config.router_init_std,
        )

    def init_parameters(self, ops, std: float, std_out: float, generator=None) -> None:
        """N(0, init_std or std) weight and zero bias ("normal"), or U(+-1/sqrt(fan_in))
        ("uniform"); `std_out` does not apply."""
        if self.init == "uniform":
            bound = 1.0 / math.sqrt(self.in_features)
            ops.uniform_(self.weight, -bound, bound, generator=generator)
            if self.bias is not None:
                ops.uniform_(self.bias, -bound, bound, generator=generator)
            return
        s = std if self.init_std is None else self.init_std
        ops.normal_(self.weight, mean=0.0, std=s, generator=generator)
        if self.bias is not None:
            ops.zeros_(self.bias)

    def extra_repr(self) -> str:
        std = "" if self.init_std is None else f", std={self.init_std}"
        return f"{super().extra_repr()}, init={self.init}{std}"
