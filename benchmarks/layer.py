"""MoE layer forward+backward tokens/s: rmoe's dispatch backends vs transformers' Mixtral block.

Both sides get the same weights (our linear router and experts are copied into
`MixtralSparseMoeBlock`; outputs are checked to match before timing) and the same input
x [1, N, D] with requires_grad (so backward includes dx, as inside a model). One call =
zero grads, forward, backward with a fixed random upstream gradient. Our block runs with
compute_losses=False (the Mixtral block computes no loss either). transformers' block is timed
with its eager experts (per-expert loop) and, when transformers offers it, its `grouped_mm`
experts implementation (config._experts_implementation).

    python -m benchmarks.layer             # CPU: float32; CUDA: bfloat16
    python -m benchmarks.layer --quick     # smoke run, seconds
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.common import (
    fmt_ms,
    interleaved,
    md_table,
    ratio_stats,
    run_shape_suite,
    summarize,
)


@dataclass(frozen=True)
class Shape:
    """One MoE layer shape: width D, expert width F, experts E, top-k K, tokens N."""

    D: int
    F: int
    E: int
    K: int
    N: int

    def label(self) -> str:
        return f"D={self.D} F={self.F} E={self.E} k={self.K} N={self.N}"


SHAPES = [Shape(256, 512, 8, 2, 2048), Shape(256, 256, 64, 8, 2048)]
LARGER = {"cpu": Shape(512, 1024, 8, 2, 4096), "cuda": Shape(1024, 2048, 8, 2, 16384)}
QUICK = [Shape(64, 128, 4, 2, 128), Shape(64, 64, 16, 4, 128)]


def pick_shapes(args: argparse.Namespace, device: torch.device) -> list[Shape]:
    """--shape D,F,E,K,N (repeatable) if given; else QUICK, or SHAPES + the device's larger one."""
    if args.shape:
        return [Shape(*(int(v) for v in s.split(","))) for s in args.shape]
    return QUICK if args.quick else [*SHAPES, LARGER.get(device.type, LARGER["cpu"])]


def add_shape_arg(p: argparse.ArgumentParser) -> None:
    """The --shape option shared by the layer and flops suites."""
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="D,F,E,K,N",
        help="measure this shape instead of the defaults (repeatable)",
    )


def build_ours(shape: Shape, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """An rmoe MoEBlock with a linear (SMoE) router, N(0, 0.02)-initialised."""
    from rmoe.config import RMoEConfig
    from rmoe.modeling.moe import MoEBlock

    cfg = RMoEConfig(
        hidden_size=shape.D,
        moe_intermediate_size=shape.F,
        num_experts=shape.E,
        num_experts_per_tok=shape.K,
        router_type="linear",
        norm_topk_prob=True,
        num_hidden_layers=1,
        num_attention_heads=1,
    )
    block = MoEBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(device=device, dtype=dtype).train()


def hf_implementations() -> list[str]:
    """transformers' experts implementations we time: eager, plus grouped_mm if offered."""
    impls = ["eager"]
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        if "grouped_mm" in ALL_EXPERTS_FUNCTIONS:
            impls.append("grouped_mm")
    except ImportError:
        pass
    return impls


def build_hf(ours: torch.nn.Module, impl: str) -> torch.nn.Module:
    """transformers' MixtralSparseMoeBlock holding a copy of `ours`' router and expert weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    ex = ours.experts
    e, f, d = ex.gate_proj.shape
    cfg = MixtralConfig(
        hidden_size=d,
        intermediate_size=f,
        num_local_experts=e,
        num_experts_per_tok=ours.config.num_experts_per_tok,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    p = ex.gate_proj
    block = block.to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.scorer.weight.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ex.gate_proj, ex.up_proj], dim=1))
        block.experts.down_proj.copy_(ex.down_proj)
    return block.train()


def _caller(block: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, ours: bool):
    params = list(block.parameters())

    def call() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        y = block(x, compute_losses=False).hidden if ours else block(x)
        y.backward(gy)

    return call


def check_match(
    ours: torch.nn.Module, hf: torch.nn.Module, x: torch.Tensor
) -> dict[str, float | bool]:
    """Forward outputs of the two blocks on x: max abs difference and whether they match."""
    with torch.no_grad():
        a = ours(x, compute_losses=False).hidden.float()
        b = hf(x).float()
    diff = (a - b).abs()
    scale = float(b.abs().max().clamp_min(1e-12))
    tol = 1e-4 if x.dtype == torch.float32 else 3e-2
    # bf16: router logits rounded differently can flip a near-tie top-k choice for a few tokens
    frac_ok = float((diff.amax(-1) <= tol * scale).float().mean())
    return {
        "max_abs_diff": float(diff.max()),
        "rel_max": float(diff.max()) / scale,
        "tokens_matching": frac_ok,
        "match": frac_ok >= (1.0 if tol < 1e-3 else 0.99),
    }


def bench_shape(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    backends: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Time every candidate on one shape, side by side (rmoe's `backends`, default all)."""
    from rmoe.modeling.experts import DISPATCH_BACKENDS, auto_backend

    ours = build_ours(shape, device, dtype)
    x = torch.randn(1, shape.N, shape.D, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(1, shape.N, shape.D, device=device, dtype=dtype)
    idx_like = torch.zeros(shape.N, shape.K, dtype=torch.long, device=device)
    auto = auto_backend(x.view(shape.N, shape.D), ours.experts.gate_proj, idx_like)

    fns, notes = {}, {}
    for name in DISPATCH_BACKENDS:
        if backends is not None and name not in backends:
            continue
        if name == "grouped_mm":
            from rmoe.modeling.experts import grouped_mm_unsupported_reason

            reason = grouped_mm_unsupported_reason(x.view(shape.N, shape.D), ours.experts.gate_proj)
            if reason:
                notes[f"rmoe[{name}]"] = f"skipped: {reason}"
                continue
        ours_b = _BackendView(ours, name)
        fns[f"rmoe[{name}]"] = _caller(ours_b, x, gy, ours=True)
    match = {}
    for impl in hf_implementations():
        hf = build_hf(ours, impl)
        match[impl] = check_match(ours, hf, x.detach())
        if not match[impl]["match"]:
            raise RuntimeError(f"rmoe and Mixtral[{impl}] outputs differ on {shape}: {match[impl]}")
        fns[f"hf[{impl}]"] = _caller(hf, x, gy, ours=False)

    times = interleaved(fns, device, warmup, repeats)
    base = {k: times.get(k) for k in ("hf[eager]", "hf[grouped_mm]")}
    rows = []
    for name, ts in times.items():
        row: dict[str, Any] = {"impl": name, **summarize(ts)}
        row["tokens_per_s"] = shape.N / row["median_s"]
        for bname, bts in base.items():
            if bts is not None:
                row[f"speedup_vs_{bname}"] = ratio_stats(bts, ts)
        rows.append(row)
    return {"shape": asdict(shape), "auto": auto, "match": match, "notes": notes, "rows": rows}


class _BackendView(torch.nn.Module):
    """Calls `block` with its experts switched to one backend for the duration of the call."""

    def __init__(self, block: torch.nn.Module, backend: str) -> None:
        super().__init__()
        self.block = block
        self.backend = backend

    def forward(self, x: torch.Tensor, **kw: Any) -> Any:
        saved = self.block.experts.backend
        self.block.experts.backend = self.backend
        try:
            return self.block(x, **kw)
        finally:
            self.block.experts.backend = saved


def markdown(results: list[dict[str, Any]], dtype: torch.dtype) -> str:
    """One table: rows = shape x implementation."""
    headers = [
        "shape",
        "impl",
        "ms/call median [IQR]",
        "min–max ms",
        "tokens/s",
        "× hf eager (min–max)",
        "× hf grouped_mm",
    ]
    rows = []
    for res in results:
        label = Shape(**res["shape"]).label()
        for r in res["rows"]:
            impl = r["impl"] + (" (auto)" if r["impl"] == f"rmoe[{res['auto']}]" else "")
            e = r.get("speedup_vs_hf[eager]")
            g = r.get("speedup_vs_hf[grouped_mm]")
            rows.append(
                [
                    label,
                    impl,
                    fmt_ms(r),
                    f"{r['min_s'] * 1e3:.1f}–{r['max_s'] * 1e3:.1f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{e['median']:.2f} ({e['min']:.2f}–{e['max']:.2f})" if e else "",
                    f"{g['median']:.2f}" if g else "",
                ]
            )
    return f"MoE layer forward+backward, {str(dtype).replace('torch.', '')}.\n\n" + md_table(
        headers, rows
    )


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write layer.json / layer.md under --out."""
    return run_shape_suite(
        "layer",
        __doc__.splitlines()[0],
        argv,
        pick_shapes,
        bench_shape,
        markdown,
        add_shape_arg,
    )


if __name__ == "__main__":
    raise SystemExit(main())
