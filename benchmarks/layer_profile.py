"""Where a MoE layer's forward+backward time goes: torch.profiler op table per implementation.

Profiles the same blocks as `benchmarks.layer` (ours per backend, transformers' Mixtral block)
on one shape and reports, per implementation, the share of self time spent in GEMMs
(aten::mm/addmm/bmm/_grouped_mm and their backward kernels) and the top ops.

    python -m benchmarks.layer_profile --shape 256,512,8,2,2048
    python -m benchmarks.layer_profile --quick
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import base_parser, machine, md_table, parse_args, setup, write_results
from benchmarks.layer import (
    Shape,
    _BackendView,
    _caller,
    add_shape_arg,
    build_hf,
    build_ours,
    hf_implementations,
)

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::matmul")


def profile_call(call, device: torch.device, repeats: int) -> dict[str, Any]:
    """Self time by op over `repeats` calls (after one warm-up)."""
    call()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            call()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, attr) / repeats, e.count // repeats) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    gemm = sum(r[1] for r in rows if r[0] in GEMM_OPS)
    return {
        "total_us": total,
        "gemm_us": gemm,
        "gemm_share": gemm / total if total else 0.0,
        "top": [{"op": k, "self_us": t, "calls": c} for k, t, c in rows[:8]],
    }


def main(argv: list[str] | None = None) -> int:
    """Profile each implementation on one shape; write layer_profile.json / .md."""
    p = base_parser("layer_profile", __doc__.splitlines()[0])
    add_shape_arg(p)
    args: argparse.Namespace = parse_args(p, argv)
    device, dtype = setup(args)
    if args.shape:
        shape = Shape(*(int(v) for v in args.shape[0].split(",")))
    else:
        shape = Shape(64, 128, 4, 2, 128) if args.quick else Shape(256, 512, 8, 2, 2048)
    repeats = args.repeats or (1 if args.quick else 3)
    info = machine(device)
    ours = build_ours(shape, device, dtype)
    x = torch.randn(1, shape.N, shape.D, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    calls = {
        f"rmoe[{b}]": _caller(_BackendView(ours, b), x, gy, ours=True)
        for b in ("loop", "sorted", "grouped_mm")
    }
    for impl in hf_implementations():
        calls[f"hf[{impl}]"] = _caller(build_hf(ours, impl), x, gy, ours=False)
    results = {name: profile_call(c, device, repeats) for name, c in calls.items()}

    rows = []
    for name, r in results.items():
        top = ", ".join(f"{t['op']} {t['self_us'] / 1e3:.1f}" for t in r["top"][:4])
        rows.append([name, f"{r['total_us'] / 1e3:.1f}", f"{r['gemm_share']:.0%}", top])
    md = (
        f"Profile of one MoE layer forward+backward, {shape.label()}, "
        f"{str(dtype).replace('torch.', '')} (self time per call, ms).\n\n"
        + md_table(["impl", "total ms", "GEMM share", "top ops (ms)"], rows)
    )
    payload = {
        "machine": info,
        "settings": {"shape": shape.__dict__, "dtype": str(dtype), "repeats": repeats},
        "results": results,
    }
    path = write_results("layer_profile", args, payload, md)
    print(f"layer_profile: wrote {path}")
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
