"""Achieved FLOP/s of rmoe's expert computation against this machine's own dense-matmul ceiling.

For each shape, the routed experts (`Experts`, forward+backward: sort, gather, the three expert
GEMMs per expert, SwiGLU, weighted scatter-add, and their gradients w.r.t. x, routing weights
and all expert weights) are timed side by side with a dense SwiGLU FFN doing the same total work:
one [D -> F -> D] SwiGLU applied to S = N*K rows (the same three GEMM shapes, summed over
experts), forward+backward. FLOPs come from `rmoe.modeling.accounting.count_config`
(breakdown["experts"] = 2*3*D*F*K per token, forward) times 3 for forward+backward.
"MFU" = achieved FLOP/s / dense FLOP/s (paired per round). A single [S, D] x [D, F] GEMM's
FLOP/s is reported for context.

    python -m benchmarks.flops           # CPU float32, CUDA bfloat16
    python -m benchmarks.flops --quick
"""

from __future__ import annotations

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
from benchmarks.layer import Shape, add_shape_arg, pick_shapes


def expert_flops(shape: Shape) -> int:
    """Forward+backward FLOPs of the routed experts for N tokens, from the accounting module."""
    from rmoe.config import RMoEConfig
    from rmoe.modeling.accounting import count_config

    cfg = RMoEConfig(
        hidden_size=shape.D,
        moe_intermediate_size=shape.F,
        num_experts=shape.E,
        num_experts_per_tok=shape.K,
        num_hidden_layers=1,
        num_attention_heads=1,
        router_type="linear",
    )
    per_token_fwd = count_config(cfg, seq_len=1).breakdown["experts"]
    assert per_token_fwd == 2 * 3 * shape.D * shape.F * shape.K
    return 3 * per_token_fwd * shape.N


def bench_shape(
    shape: Shape, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int
) -> dict[str, Any]:
    """Experts (each fast backend) vs the dense SwiGLU of equal work, side by side."""
    from rmoe.modeling.experts import DISPATCH_BACKENDS, Experts, auto_backend, swiglu
    from rmoe.modeling.experts import grouped_mm_unsupported_reason as why_not

    d, f, e, k, n = shape.D, shape.F, shape.E, shape.K, shape.N
    experts = Experts(e, d, f).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    probs = torch.softmax(torch.randn(n, e, device=device), dim=-1)
    w, idx = probs.topk(k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).requires_grad_()
    gy = torch.randn(n, d, device=device, dtype=dtype)
    auto = auto_backend(x, experts.gate_proj, idx)

    dense_w = [
        (torch.randn(*sz, device=device, dtype=dtype) * 0.02).requires_grad_()
        for sz in ((f, d), (f, d), (d, f))
    ]
    xs = torch.randn(n * k, d, device=device, dtype=dtype, requires_grad=True)
    gys = torch.randn(n * k, d, device=device, dtype=dtype)
    mm_a = torch.randn(n * k, d, device=device, dtype=dtype)
    mm_b = torch.randn(d, f, device=device, dtype=dtype)

    def run_experts(backend: str):
        def call() -> None:
            x.grad = w.grad = None
            for p in experts.parameters():
                p.grad = None
            experts(x, idx, w, backend=backend).backward(gy)

        return call

    def run_dense() -> None:
        xs.grad = None
        for t in dense_w:
            t.grad = None
        swiglu(xs, *dense_w).backward(gys)

    fns = {}
    notes = {}
    for name in DISPATCH_BACKENDS:
        if name == "loop":
            continue
        if name == "grouped_mm" and (reason := why_not(x, experts.gate_proj)):
            notes[name] = f"skipped: {reason}"
            continue
        fns[f"experts[{name}]"] = run_experts(name)
    fns["dense SwiGLU (same work)"] = run_dense
    fns["single GEMM [S,D]x[D,F]"] = lambda: torch.mm(mm_a, mm_b)
    times = interleaved(fns, device, warmup, repeats)

    flops = expert_flops(shape)
    gemm_flops = 2 * n * k * d * f
    dense_t = times["dense SwiGLU (same work)"]
    rows = []
    for name, ts in times.items():
        st = summarize(ts)
        fl = gemm_flops if name.startswith("single") else flops
        row = {"impl": name, **st, "flops": fl, "flop_per_s": fl / st["median_s"]}
        if name.startswith("experts"):
            row["fraction_of_dense"] = ratio_stats(dense_t, ts)
        rows.append(row)
    return {"shape": shape.__dict__, "auto": auto, "notes": notes, "rows": rows}


def markdown(results: list[dict[str, Any]], dtype: torch.dtype) -> str:
    """One table: rows = shape x candidate."""
    headers = [
        "shape",
        "candidate",
        "ms/call median [IQR]",
        "GFLOP/s",
        "fraction of dense (min–max)",
    ]
    rows = []
    for res in results:
        label = Shape(**res["shape"]).label()
        for r in res["rows"]:
            name = r["impl"] + (" (auto)" if r["impl"] == f"experts[{res['auto']}]" else "")
            fr = r.get("fraction_of_dense")
            rows.append(
                [
                    label,
                    name,
                    fmt_ms(r),
                    f"{r['flop_per_s'] / 1e9:.1f}",
                    f"{fr['median']:.0%} ({fr['min']:.0%}–{fr['max']:.0%})" if fr else "",
                ]
            )
    return (
        f"Expert FLOP/s vs the dense ceiling, forward+backward, "
        f"{str(dtype).replace('torch.', '')}.\n\n" + md_table(headers, rows)
    )


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write flops.json / flops.md under --out."""
    return run_shape_suite(
        "flops",
        __doc__.splitlines()[0],
        argv,
        pick_shapes,
        bench_shape,
        markdown,
        add_shape_arg,
    )


if __name__ == "__main__":
    raise SystemExit(main())
