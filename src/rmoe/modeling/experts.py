"""Routed experts: E SwiGLU FFNs stored as [E, ...] tensors, and the dispatch backends.

Shapes: N tokens, D model width, F expert hidden width, E experts, K experts per token,
S = N*K token-expert assignments.
Weights use nn.Linear's [out, in] layout per expert:
    gate_proj [E, F, D], up_proj [E, F, D], down_proj [E, D, F]
    expert_e(x) = down_e( silu(gate_e x) * up_e x )

A dispatch backend is a function
    backend(x [N, D], idx [N, K], weight [N, K], gate [E, F, D], up [E, F, D], down [E, D, F])
        -> y [N, D],  y_n = sum_k weight[n, k] * expert_{idx[n, k]}(x_n)
registered by name in `DISPATCH_BACKENDS`. Every backend is dropless.

    loop        the readable reference and the test oracle: one `nonzero` per expert.
    sorted      sort the S assignments by expert once, run each expert on its contiguous slice
                (one host sync for the per-expert counts), combine with one scatter-add.
    grouped_mm  the same sort, then one `torch.nn.functional.grouped_mm` (or `torch._grouped_mm`)
                per projection with int32 offsets computed on the device: no host sync. Inner
                sizes are zero-padded where the kernel needs 16-byte aligned strides.

torch.compile. `sorted` and `grouped_mm` trace with fullgraph=True and dynamic token counts:
under compilation they call the custom ops `rmoe::expert_sorted_swiglu` (the per-expert loop
with its host sync inside one opaque op, gradients by hand in `..._backward`) and
`rmoe::expert_grouped_mm` (the kernel with our own fake kernel and autograd); eager calls run
the kernels directly, as before. `loop` (the oracle) is not meant to be compiled.

Probes. A backend also takes `probe=None`, a callable `probe(kind, h, expert_ids, token)` with
kind in {"gate_proj", "up_proj", "down_proj"}, h [S, F_out] that weight's outputs for the S
dispatched rows (before any activation), expert_ids [S] and token [S] (the row of x). When given,
every backend calls it once per weight (the loop backend once per weight and expert) on the real
rows only: no padding rows or columns. `Experts` passes one only when a forward hook is attached
to one of its `ExpertOutputProbe` children (MIGU does that), so ordinary steps pay nothing.

`resolve_backend("auto", x, gate, idx)` picks by device, dtype, torch version and load
(`auto_backend` documents the measured rule); an explicitly requested `grouped_mm` that this
torch/device/dtype cannot run falls back to `sorted`: an `Experts` module logs that once per
reason (its own record, no module-global state); `dispatch_grouped_mm` called directly issues a
`GroupedMMFallbackWarning` (Python's warning filters decide how often it shows).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from functools import cache
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import BACKENDS

logger = logging.getLogger(__name__)

DispatchFn = Callable[..., torch.Tensor]
"""backend(x, idx, weight, gate, up, down, probe=None) -> y (see the module docstring)."""

ProbeFn = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""probe(kind, h [S, F_out], expert_ids [S], token [S]) -> None (see the module docstring)."""

_TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__.split("+")[0])


def swiglu(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """One SwiGLU FFN: x [n, D], gate/up [F, D], down [D, F] -> [n, D]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def swiglu_parts(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`swiglu` keeping the projections: (x gate^T [n, F], x up^T [n, F], y [n, D])."""
    g, u = F.linear(x, gate), F.linear(x, up)
    return g, u, F.linear(F.silu(g) * u, down)


# ----------------------------------------------------------------------------------------------
# loop: the oracle
# ----------------------------------------------------------------------------------------------
def dispatch_loop(
    x: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    probe: ProbeFn | None = None,
) -> torch.Tensor:
    """Reference dispatch: for each expert, gather its tokens, run it, scale, scatter-add back."""
    out = torch.zeros_like(x)
    num_experts = gate.shape[0]
    for e in range(num_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        if probe is None:
            y = swiglu(x[tok], gate[e], up[e], down[e])
        else:
            g, u, y = swiglu_parts(x[tok], gate[e], up[e], down[e])
            ids = torch.full_like(tok, e)
            for kind, h in (("gate_proj", g), ("up_proj", u), ("down_proj", y)):
                probe(kind, h, ids, tok)
        out.index_add_(0, tok, y * weight[tok, slot, None].to(y.dtype))
    return out


# ----------------------------------------------------------------------------------------------
# Shared steps of the fast backends: sort the assignments by expert, combine the results
# ----------------------------------------------------------------------------------------------
def sort_by_expert(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the S = N*K assignments by expert (stable, so tokens stay in order per expert).

    Args:
        idx: [N, K] expert of each assignment.

    Returns:
        expert_sorted [S] (expert ids, ascending), order [S] (flat assignment n*K + k of each
        sorted slot), token [S] (its token n = order // K).
    """
    k = idx.shape[1]
    expert_sorted, order = torch.sort(idx.reshape(-1), stable=True)
    token = torch.div(order, k, rounding_mode="floor")
    return expert_sorted, order, token


def combine(
    ys: torch.Tensor, token: torch.Tensor, order: torch.Tensor, weight: torch.Tensor, n: int
) -> torch.Tensor:
    """Scale each sorted expert output by its routing weight and add it to its token.

    Args:
        ys: [S, D] expert outputs in sorted order.
        token: [S] token of each sorted slot.
        order: [S] flat assignment (n*K + k) of each sorted slot.
        weight: [N, K] routing weights (any float dtype; cast to ys.dtype).
        n: number of tokens N.

    Returns:
        [N, D] in ys.dtype.
    """
    ws = weight.reshape(-1).index_select(0, order).to(ys.dtype)
    out = ys.new_zeros(n, ys.shape[1])
    return out.index_add_(0, token, ys * ws[:, None])


# ----------------------------------------------------------------------------------------------
# sorted: one sort, one host sync, one small GEMM chain per non-empty expert
# ----------------------------------------------------------------------------------------------
def dispatch_sorted(
    x: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    probe: ProbeFn | None = None,
) -> torch.Tensor:
    """Sort assignments by expert, run each expert on its contiguous slice, scatter-add back.

    One host sync (the per-expert counts). Slices come from `split` and per-expert weights from
    `unbind`, whose backward passes write one gradient tensor each instead of one zero-filled
    full-size tensor per expert (what `xs[a:b]` / `gate[e]` would cost in backward).
    """
    n, num_experts = x.shape[0], gate.shape[0]
    if idx.numel() == 0:
        return torch.zeros_like(x)
    expert_sorted, order, token = sort_by_expert(idx)
    if torch.compiler.is_compiling() and probe is None:  # one opaque op: no graph break
        counts_t = torch.bincount(expert_sorted, minlength=num_experts)
        xs = x.index_select(0, token)
        ys = _sorted_swiglu_op(xs, counts_t, gate, up, down)
        return combine(ys, token, order, weight, n)
    counts = torch.bincount(expert_sorted, minlength=num_experts).tolist()
    xs = x.index_select(0, token)
    slices = [
        (x_e, g_e, u_e, d_e)
        for x_e, g_e, u_e, d_e, c in zip(
            xs.split(counts), gate.unbind(0), up.unbind(0), down.unbind(0), counts
        )
        if c
    ]
    if probe is None:
        outs = [swiglu(*sl) for sl in slices]
        ys = torch.cat(outs) if len(outs) > 1 else outs[0]
    else:
        gs, us, outs = zip(*(swiglu_parts(*sl) for sl in slices))
        ys = torch.cat(outs) if len(outs) > 1 else outs[0]
        # the probes only read g and u: concatenate them outside the autograd graph
        g, u = (torch.cat([t.detach() for t in ts]) for ts in (gs, us))
        for kind, h in (("gate_proj", g), ("up_proj", u), ("down_proj", ys)):
            probe(kind, h, expert_sorted, token)
    return combine(ys, token, order, weight, n)


# ----------------------------------------------------------------------------------------------
# grouped_mm: one grouped GEMM per projection, offsets on the device
# ----------------------------------------------------------------------------------------------
# torch.nn.functional.grouped_mm (torch >= 2.10) or torch._grouped_mm (2.8, 2.9), or None: a
# constant of the installed torch (a plain lookup, so torch.compile traces it without warnings).
_GROUPED_MM: Callable[..., torch.Tensor] | None = getattr(F, "grouped_mm", None) or getattr(
    torch, "_grouped_mm", None
)


def _grouped_mm_fn() -> Callable[..., torch.Tensor] | None:
    """torch.nn.functional.grouped_mm (torch >= 2.10) or torch._grouped_mm (2.8, 2.9), or None."""
    return _GROUPED_MM


@cache
def _cuda_capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def grouped_mm_unsupported_reason(x: torch.Tensor, gate: torch.Tensor) -> str | None:
    """Why the grouped_mm backend cannot run on x's device/dtype with this torch, or None.

    CPU: torch >= 2.9 (2.8 has no CPU kernel), fp32/bf16/fp16; the 16-byte stride rule is met by
    padding (see `dispatch_grouped_mm`). CUDA: bf16 on compute capability >= 8.0 with
    torch >= 2.9 (torch 2.8: capability 9.x only). Other devices: not used.
    """
    if _grouped_mm_fn() is None:
        return f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm"
    if x.dtype != gate.dtype:
        return f"input dtype {x.dtype} differs from expert weight dtype {gate.dtype}"
    dev = x.device.type
    if dev == "cpu":
        if _TORCH_VERSION < "2.9":
            return f"torch {torch.__version__} has no CPU grouped_mm kernel (needs >= 2.9)"
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"dtype {x.dtype} is not supported by the CPU grouped_mm kernel"
        return None
    if dev == "cuda":
        if x.dtype != torch.bfloat16:
            return f"CUDA grouped_mm needs bfloat16, got {x.dtype}"
        cap = _cuda_capability(x.device.index if x.device.index is not None else 0)
        if _TORCH_VERSION < "2.9":
            return (
                None if cap[0] == 9 else f"torch 2.8 grouped_mm needs sm90, got sm{cap[0]}{cap[1]}"
            )
        return None if cap >= (8, 0) else f"grouped_mm needs sm80+, got sm{cap[0]}{cap[1]}"
    return f"grouped_mm is not used on device type {dev!r}"


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def _aligned(t: torch.Tensor) -> bool:
    """Every non-unit stride and the first element's address are multiples of 16 bytes.

    Eager: the address is read (`data_ptr`; weights loaded from a file can be views of an
    unaligned buffer). Under torch.compile, which cannot trace `data_ptr`, only the strides are
    checked: the weights there are the graph's parameter inputs, and the compiled path passes
    them to `_grouped_mm_op`, whose kernel call sees the real tensors.
    """
    es = t.element_size()
    address_ok = torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
    return address_ok and all(
        (s * es) % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1
    )


def dispatch_grouped_mm(
    x: torch.Tensor,
    idx: torch.Tensor,
    weight: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    probe: ProbeFn | None = None,
) -> torch.Tensor:
    """Sort assignments by expert, then one grouped GEMM per projection; no host sync.

    Offsets (int32 [E], the end of each expert's rows) come from `searchsorted` on the sorted
    expert ids, on the device. Where D or F times the element size is not a multiple of 16 bytes
    (the kernel's stride rule), x and the weights are zero-padded to the next aligned size; the
    padded hidden units are silu(0) * 0 = 0, so the result is unchanged.
    Falls back to `dispatch_sorted` where `grouped_mm_unsupported_reason` says so.
    """
    reason = grouped_mm_unsupported_reason(x, gate)
    if reason is not None:
        warnings.warn(_fallback_message(reason), GroupedMMFallbackWarning, stacklevel=2)
        return dispatch_sorted(x, idx, weight, gate, up, down, probe)
    n, d = x.shape
    num_experts, f = gate.shape[0], gate.shape[1]
    if idx.numel() == 0:
        return torch.zeros_like(x)
    expert_sorted, order, token = sort_by_expert(idx)
    ids = torch.arange(num_experts, device=idx.device, dtype=expert_sorted.dtype)
    offs = torch.searchsorted(expert_sorted, ids, right=True).to(torch.int32)
    xs = x.index_select(0, token)

    step = max(1, 16 // x.element_size())
    dp, fp = -(-d // step) * step, -(-f // step) * step
    w_gate, w_up, w_down = gate.transpose(1, 2), up.transpose(1, 2), down.transpose(1, 2)
    if (dp, fp) != (d, f) or not all(_aligned(t) for t in (w_gate, w_up, w_down)):
        xs = _pad_last(xs, dp)
        # [E, D, F] views -> padded contiguous [E, Dp, Fp] / [E, Fp, Dp]
        w_gate = F.pad(w_gate, (0, fp - f, 0, dp - d))
        w_up = F.pad(w_up, (0, fp - f, 0, dp - d))
        w_down = F.pad(w_down, (0, dp - d, 0, fp - f))
    # under torch.compile: our custom op (its fake kernel traces every dtype); eager: the kernel
    gmm = _grouped_mm_op if torch.compiler.is_compiling() else _grouped_mm_fn()
    assert gmm is not None  # checked by grouped_mm_unsupported_reason
    g, u = gmm(xs, w_gate, offs=offs), gmm(xs, w_up, offs=offs)
    ys = gmm(F.silu(g) * u, w_down, offs=offs)
    if dp != d:
        ys = ys[:, :d]
    if probe is not None:  # the real hidden units only (padding columns are 0)
        for kind, h in (("gate_proj", g[:, :f]), ("up_proj", u[:, :f]), ("down_proj", ys)):
            probe(kind, h, expert_sorted, token)
    return combine(ys, token, order, weight, n)


# ----------------------------------------------------------------------------------------------
# torch.compile: the data-dependent expert GEMMs as opaque custom ops
# ----------------------------------------------------------------------------------------------
# Under torch.compile the two fast backends call these ops instead of the raw kernels: their
# output shapes depend only on the input shapes ([S, D] for S assignments), so one graph serves
# every token count (no host sync inside the graph, no graph break), and their fake kernels are
# ours (torch 2.13's meta kernel of `_grouped_mm` accepts bf16 only, so fp32 on CPU would not
# trace). Eager calls skip them: the same kernels run directly, at the same speed.
@torch.library.custom_op("rmoe::expert_grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [S, K] (rows sorted by group) @ b [E, K, M] per group (offs [E] int32 row ends)
    -> [S, M]; or a [K, S] @ b [S, M] per group of S -> [E, K, M] (the weight gradient)."""
    gmm = _grouped_mm_fn()
    assert gmm is not None
    # the real tensors: copy an operand whose address the kernel would reject (a view of an
    # unaligned buffer); strides were made aligned by the caller
    a, b = (t if t.data_ptr() % 16 == 0 else t.clone() for t in (a, b))
    return gmm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    # only the 2-D x 3-D form is differentiated (the forward of the experts)
    grad_a = _grouped_mm_op(grad, b.transpose(1, 2).contiguous(), offs)
    grad_b = _grouped_mm_op(a.t(), grad, offs)
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


@torch.library.custom_op("rmoe::expert_sorted_swiglu", mutates_args=())
def _sorted_swiglu_op(
    xs: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """The `sorted` backend's expert step: xs [S, D] sorted by expert, counts [E] (int64) rows
    per expert -> [S, D], each slice through its expert's SwiGLU."""
    sizes = counts.tolist()
    outs = [
        swiglu(x_e, g_e, u_e, d_e)
        for x_e, g_e, u_e, d_e, c in zip(xs.split(sizes), gate, up, down, sizes)
        if c
    ]
    if not outs:
        return xs.new_zeros(xs.shape[0], down.shape[1])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


@_sorted_swiglu_op.register_fake
def _(xs, counts, gate, up, down):
    return xs.new_empty(xs.shape[0], down.shape[1])


@torch.library.custom_op("rmoe::expert_sorted_swiglu_backward", mutates_args=())
def _sorted_swiglu_backward_op(
    grad: torch.Tensor,
    xs: torch.Tensor,
    counts: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (xs, gate, up, down) of `_sorted_swiglu_op`, per expert by hand:
    g = x Wg^T, u = x Wu^T, a = silu(g) u, y = a Wd^T;
    da = dy Wd, dWd = dy^T a, dg = da u silu'(g), du = da silu(g),
    dx = dg Wg + du Wu, dWg = dg^T x, dWu = du^T x."""
    sizes = counts.tolist()
    grad_x = torch.zeros_like(xs)
    grad_gate, grad_up, grad_down = (torch.zeros_like(w) for w in (gate, up, down))
    start = 0
    for e, c in enumerate(sizes):
        if not c:
            continue
        x_e, dy = xs[start : start + c], grad[start : start + c]
        g, u = F.linear(x_e, gate[e]), F.linear(x_e, up[e])
        sg = torch.sigmoid(g)
        silu_g = g * sg
        da = dy @ down[e]
        grad_down[e] = dy.t() @ (silu_g * u)
        dg = da * u * (sg * (1 + g * (1 - sg)))
        du = da * silu_g
        grad_x[start : start + c] = dg @ gate[e] + du @ up[e]
        grad_gate[e] = dg.t() @ x_e
        grad_up[e] = du.t() @ x_e
        start += c
    return grad_x, grad_gate, grad_up, grad_down


@_sorted_swiglu_backward_op.register_fake
def _(grad, xs, counts, gate, up, down):
    return (
        torch.empty_like(xs),
        torch.empty_like(gate),
        torch.empty_like(up),
        torch.empty_like(down),
    )


def _sorted_swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _sorted_swiglu_backward(ctx, grad):
    xs, counts, gate, up, down = ctx.saved_tensors
    gx, gg, gu, gd = _sorted_swiglu_backward_op(grad.contiguous(), xs, counts, gate, up, down)
    return gx, None, gg, gu, gd


_sorted_swiglu_op.register_autograd(_sorted_swiglu_backward, setup_context=_sorted_swiglu_setup)


class GroupedMMFallbackWarning(UserWarning):
    """`dispatch_grouped_mm` cannot run on this torch/device/dtype and used `sorted` instead."""


def _fallback_message(reason: str) -> str:
    return f"experts backend grouped_mm unavailable ({reason}); using 'sorted'"


DISPATCH_BACKENDS: MappingProxyType[str, DispatchFn] = MappingProxyType(
    {"loop": dispatch_loop, "sorted": dispatch_sorted, "grouped_mm": dispatch_grouped_mm}
)
"""Backend name -> dispatch function: the one place the names are spelled; registered in
`rmoe.registry.BACKENDS` (which `RMoEConfig.experts_backend` is validated against)."""
for _name, _fn in DISPATCH_BACKENDS.items():
    BACKENDS.add(_name, _fn)


def auto_backend(
    x: torch.Tensor, gate: torch.Tensor | None = None, idx: torch.Tensor | None = None
) -> str:
    """The backend "auto" picks for x's device and dtype with this torch (measured rule).

    "grouped_mm" wherever `grouped_mm_unsupported_reason` allows it (CUDA: bf16 on sm80+ with
    torch >= 2.9, sm90 with 2.8; CPU: torch >= 2.9, fp32/bf16/fp16), except on CPU when there
    are fewer assignments than experts (N*K < E, e.g. decoding one token with many experts),
    where "sorted" only touches the experts in use. Everything else: "sorted".
    Why: grouped_mm needs no host sync and writes each weight gradient once as [E, ...]; on a
    2-core CPU (torch 2.13, fp32) it tied with "sorted" at E=8 and was 5-20 % faster at E=64
    (benchmarks/RESULTS.md), and it loses only when most experts are empty.

    Args:
        x: [N, D] tokens.
        gate: [E, F, D] expert weights (their dtype must match x for grouped_mm), or None.
        idx: [N, K] chosen experts, or None (then the N*K < E rule is not applied).
    """
    w = gate if gate is not None else x
    if grouped_mm_unsupported_reason(x, w) is not None:
        return "sorted"
    if x.device.type == "cpu" and idx is not None and gate is not None:
        if idx.numel() < gate.shape[0]:
            return "sorted"
    return "grouped_mm"


def resolve_backend(
    name: str,
    x: torch.Tensor,
    gate: torch.Tensor | None = None,
    idx: torch.Tensor | None = None,
) -> DispatchFn:
    """The dispatch function for backend `name` on x's device and dtype ("auto" picks).

    Args:
        name: "auto" or a key of `DISPATCH_BACKENDS`.
        x: [N, D] the tokens to dispatch (device and dtype decide "auto").
        gate: the [E, F, D] expert weights, if known (their dtype and E also decide).
        idx: the [N, K] chosen experts, if known (N*K decides on CPU).
    """
    if name == "auto":
        name = auto_backend(x, gate, idx)
    if name not in DISPATCH_BACKENDS:
        raise ValueError(
            f"experts backend {name!r} is not available here; choose one of "
            f"{sorted(DISPATCH_BACKENDS)} or 'auto'"
        )
    return DISPATCH_BACKENDS[name]


class ExpertOutputProbe(nn.Module):
    """Identity module that shows a forward hook the per-expert outputs of a 3-D expert weight.

    The contract MIGU (`rmoe.continual.migu`) looks for: a child module with attributes
    ``migu_param`` (the attribute name, on the parent, of an ``[E, F_out, D_in]`` or
    ``[E, D_in, F_out]`` weight), ``migu_out_dim`` (1 or 2: the dimension indexing output units)
    and optionally ``migu_bias`` (the name of an ``[E, F_out]`` bias), called by the parent as
    ``h = probe(h, expert_ids, token_index)``. It returns its input and costs one module call
    (or nothing, when the parent skips it while no hook is attached, as `Experts` does).

    Args:
        param_name: attribute name, on the module that owns this probe, of the expert weight.
        out_dim: 1 if the weight is ``[E, F_out, D_in]``, 2 if it is ``[E, D_in, F_out]``.
        bias_name: optional attribute name of an ``[E, F_out]`` bias on the same module.
    """

    def __init__(self, param_name: str, out_dim: int, bias_name: str | None = None) -> None:
        super().__init__()
        if out_dim not in (1, 2):
            raise ValueError(
                f"out_dim must be 1 ([E, F_out, D_in]) or 2 ([E, D_in, F_out]), got {out_dim}"
            )
        self.migu_param = param_name
        self.migu_out_dim = out_dim
        self.migu_bias = bias_name

    def forward(
        self,
        h: torch.Tensor,
        expert_ids: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``h``: ``[n, F_out]`` rows with ``expert_ids [n]`` and ``token_index [n]``
        (the flattened token of each row, or None), or ``[E, C, F_out]`` per-expert batches."""
        return h

    @property
    def hooked(self) -> bool:
        """Whether any forward (pre-)hook is attached, i.e. whether calling it has an effect."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def extra_repr(self) -> str:
        return f"param={self.migu_param!r}, out_dim={self.migu_out_dim}"


class Experts(nn.Module):
    """E routed SwiGLU experts with weights as [E, ...] tensors (see module docstring).

    Three `ExpertOutputProbe` children (``gate_probe``, ``up_probe``, ``down_probe``; no
    parameters, nothing in the state dict) expose each weight's outputs on the dispatched rows to
    forward hooks; MIGU finds and hooks them. Without a hook they are never called.

    An explicitly requested "grouped_mm" that cannot run here falls back to "sorted", logged
    once per reason by this module (so once per MoE layer).
    """

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
        self.gate_probe = ExpertOutputProbe("gate_proj", out_dim=1)
        self.up_probe = ExpertOutputProbe("up_proj", out_dim=1)
        self.down_probe = ExpertOutputProbe("down_proj", out_dim=1)
        self._fallbacks_logged: set[str] = set()

    def init_parameters(self, ops, std: float, std_out: float, generator=None) -> None:
        """gate_proj, up_proj ~ N(0, std); down_proj (a residual output) ~ N(0, std_out)."""
        ops.normal_(self.gate_proj, mean=0.0, std=std, generator=generator)
        ops.normal_(self.up_proj, mean=0.0, std=std, generator=generator)
        ops.normal_(self.down_proj, mean=0.0, std=std_out, generator=generator)

    def _backend_name(self, requested: str, x: torch.Tensor) -> str:
        """`requested`, or "sorted" (logged once per reason) for a grouped_mm that cannot run."""
        if requested != "grouped_mm":
            return requested
        reason = grouped_mm_unsupported_reason(x, self.gate_proj)
        if reason is None:
            return requested
        if reason not in self._fallbacks_logged:
            self._fallbacks_logged.add(reason)
            logger.warning(_fallback_message(reason))
        return "sorted"

    def forward(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        weight: torch.Tensor,
        backend: str | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [N, D], idx [N, K], weight [N, K] -> [N, D] = sum_k weight * expert_idx(x).

        `backend` overrides the module's backend for this call ("auto", "loop", "sorted",
        "grouped_mm"). `token_index` [N] (long), when x is a subset of a batch's tokens (GW-MoE's
        broadcast call), gives each row's index in the full flattened batch; the probes report
        that index, so a per-token mask on the full batch still applies.
        """
        name = self._backend_name(backend or self.backend, x)
        fn = resolve_backend(name, x, self.gate_proj, idx)
        probe = None
        if self.gate_probe.hooked or self.up_probe.hooked or self.down_probe.hooked:
            probes = {"gate_proj": self.gate_probe, "up_proj": self.up_probe}
            probes["down_proj"] = self.down_probe

            def probe(kind: str, h: torch.Tensor, ids: torch.Tensor, tok: torch.Tensor) -> None:
                module = probes[kind]
                if module.hooked:
                    module(h, ids, tok if token_index is None else token_index[tok])

        return fn(x, idx, weight, self.gate_proj, self.up_proj, self.down_proj, probe=probe)

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e alone on every token: x [N, D] -> [N, D] (oracle and analysis)."""
        return swiglu(x, self.gate_proj[e], self.up_proj[e], self.down_proj[e])


class OutputProjection(nn.Linear):
    """A linear layer whose output is added to the residual stream (attention `o_proj`, the
    dense FFN's `down_proj`): initialised with std_out = initializer_range / sqrt(2 L)."""

    def init_parameters(self, ops, std: float, std_out: float, generator=None) -> None:
        """weight ~ N(0, std_out); bias = 0."""
        ops.normal_(self.weight, mean=0.0, std=std_out, generator=generator)
        if self.bias is not None:
            ops.zeros_(self.bias)


class DenseMLP(nn.Module):
    """A dense SwiGLU FFN (dense layers and shared experts): D -> F -> D.

    `residual_out`: `down_proj` is an `OutputProjection` (scaled init). The dense layers' FFN
    uses it; the shared experts do not (their down_proj keeps the plain std init).
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, residual_out: bool = False
    ) -> None:
        super().__init__()
        down = OutputProjection if residual_out else nn.Linear
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = down(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
