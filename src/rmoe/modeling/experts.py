"""Routed experts: E SwiGLU FFNs stored as [E, ...] tensors, and the dispatch backends.

Shapes: N tokens, D model width, F expert hidden width, E experts, K experts per token.
Weights use nn.Linear's [out, in] layout per expert:
    gate_proj [E, F, D], up_proj [E, F, D], down_proj [E, D, F]
    expert_e(x) = down_e( silu(gate_e x) * up_e x )

A dispatch backend is a function
    backend(x [N, D], idx [N, K], weight [N, K], gate [E, F, D], up [E, F, D], down [E, D, F])
        -> y [N, D],  y_n = sum_k weight[n, k] * expert_{idx[n, k]}(x_n)
registered by name in `DISPATCH_BACKENDS`. Every backend is dropless. "loop" is the readable
reference and the test oracle; faster backends must agree with it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

DispatchFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    torch.Tensor,
]


def swiglu(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """One SwiGLU FFN: x [n, D], gate/up [F, D], down [D, F] -> [n, D]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def dispatch_loop(
    x: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Reference dispatch: for each expert, gather its tokens, run it, scale, scatter-add back."""
    out = torch.zeros_like(x)
    num_experts = gate.shape[0]
    for e in range(num_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        y = swiglu(x[tok], gate[e], up[e], down[e])
        out.index_add_(0, tok, y * weight[tok, slot, None].to(y.dtype))
    return out


def dispatch_sorted(
    x: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """Sort token-assignments by expert once, run each expert on its contiguous slice, combine
    with one scatter-add. One host sync (the per-expert counts)."""
    n, k = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    xs = x[tok]
    counts = torch.bincount(flat, minlength=gate.shape[0]).tolist()
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c:
            outs.append(swiglu(xs[start : start + c], gate[e], up[e], down[e]))
        start += c
    ys = torch.cat(outs, dim=0) if outs else xs.new_zeros(0, x.shape[1])
    ys = ys * weight.reshape(-1)[order, None].to(ys.dtype)
    out = torch.zeros_like(x)
    out.index_add_(0, tok, ys)
    return out


DISPATCH_BACKENDS: MappingProxyType[str, DispatchFn] = MappingProxyType(
    {"loop": dispatch_loop, "sorted": dispatch_sorted}
)


def resolve_backend(name: str, x: torch.Tensor) -> DispatchFn:
    """The dispatch function for backend `name` on x's device and dtype ("auto" picks)."""
    if name == "auto":
        name = "sorted"
    if name not in DISPATCH_BACKENDS:
        raise ValueError(
            f"experts backend {name!r} is not available here; choose one of "
            f"{sorted(DISPATCH_BACKENDS)} or 'auto'"
        )
    return DISPATCH_BACKENDS[name]


class Experts(nn.Module):
    """E routed SwiGLU experts with weights as [E, ...] tensors (see module docstring)."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        e, d, f = num_experts, hidden_size, intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, backend: str | None = None
    ) -> torch.Tensor:
        """x [N, D], idx [N, K], weight [N, K] -> [N, D] = sum_k weight * expert_idx(x)."""
        fn = resolve_backend(backend or self.backend, x)
        return fn(x, idx, weight, self.gate_proj, self.up_proj, self.down_proj)

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e alone on every token: x [N, D] -> [N, D] (oracle and analysis)."""
        return swiglu(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e])


class DenseMLP(nn.Module):
    """A dense SwiGLU FFN (dense layers and shared experts): D -> F -> D."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
