"""Fine-grained experts: layer and step throughput for E = 8 ... 256 at fixed active compute.

Active expert compute per token is held at k x F = 2D: E=8 k=2 F=D, then E in {64, 128, 256}
with k=8 F=D/4, so from E=64 on only the number of experts (and so the tokens per expert)
changes. For each E:

* layer: `benchmarks.layer`'s measurement (same weights, outputs checked equal; fwd+bwd) of
  rmoe's fast dispatch backends (sorted, grouped_mm; not the loop oracle) vs transformers'
  MixtralSparseMoeBlock (eager loop, and grouped_mm
  when transformers offers it);
* step: a 2-layer model's full training step (`benchmarks.step.make_step`): rmoe SMoE vs
  MixtralForCausalLM per experts implementation, side by side.

What grows with E: each candidate's time relative to its own E=8 time; and rmoe's layer (auto
backend) is profiled at the smallest and largest E with the same k and F (k=8, F=D/4), the ops whose self time grows most listed.

    python -m benchmarks.finegrained
    python -m benchmarks.finegrained --quick
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from benchmarks.common import (
    base_parser,
    fmt_ms,
    interleaved,
    machine,
    md_table,
    parse_args,
    ratio_stats,
    setup,
    summarize,
    write_results,
)
from benchmarks.layer import Shape, _BackendView, _caller, build_ours, hf_implementations
from benchmarks.layer import bench_shape as bench_layer
from benchmarks.step import StepShape, build_mixtral, build_rmoe, make_step

EXPERTS = (8, 64, 128, 256)
QUICK_EXPERTS = (8, 64)
FAST = ("sorted", "grouped_mm")  # rmoe's throughput backends (the loop oracle is left out)


def active_shape(e: int, d: int) -> tuple[int, int]:
    """(k, F) with k x F = 2D: E=8 -> (2, D), larger E -> (8, D/4)."""
    return (2, d) if e <= 8 else (8, max(1, d // 4))


def bench_step(
    s: StepShape, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int
) -> dict[str, Any]:
    """rmoe SMoE vs Mixtral (each experts implementation) training step, side by side."""
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
    builders = {"rmoe SMoE": lambda: build_rmoe(s, "linear")}
    for impl in hf_implementations():
        builders[f"Mixtral[{impl}]"] = lambda impl=impl: build_mixtral(s, impl)
    steps = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        steps[name] = make_step(build().to(device=device, dtype=dtype), ids)
    times = interleaved(steps, device, warmup, repeats)
    tokens = s.batch * s.seq
    rows = []
    for name, ts in times.items():
        row = {"variant": name, **summarize(ts), "tokens_per_s": tokens / summarize(ts)["median_s"]}
        for ref in times:
            if ref.startswith("Mixtral"):
                row[f"speedup_vs_{ref}"] = ratio_stats(times[ref], ts)
        rows.append(row)
    return {"shape": asdict(s), "rows": rows}


def growth_hotspots(
    small: Shape, large: Shape, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, Any]:
    """Profile rmoe's layer (auto backend) at two E; the ops whose self time grows most."""
    from benchmarks.layer_profile import profile_call

    prof = {}
    for tag, shape in (("small", small), ("large", large)):
        ours = build_ours(shape, device, dtype)
        x = torch.randn(1, shape.N, shape.D, device=device, dtype=dtype, requires_grad=True)
        call = _caller(_BackendView(ours, "auto"), x, torch.randn_like(x), ours=True)
        prof[tag] = profile_call(call, device, repeats)
    a = {t["op"]: t["self_us"] for t in prof["small"]["top"]}
    b = {t["op"]: t["self_us"] for t in prof["large"]["top"]}
    grow = sorted(
        ((op, b.get(op, 0.0) - a.get(op, 0.0)) for op in set(a) | set(b)), key=lambda kv: -kv[1]
    )
    return {
        "small": asdict(small),
        "large": asdict(large),
        "total_ms": {t: prof[t]["total_us"] / 1e3 for t in prof},
        "growing_ops_ms": [{"op": op, "delta_ms": d / 1e3} for op, d in grow[:5] if d > 0],
        "top_large": prof["large"]["top"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write finegrained.json / finegrained.md under --out."""
    p = base_parser("finegrained", __doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=None, help="model width D")
    p.add_argument("--tokens", type=int, default=None, help="layer tokens N")
    p.add_argument("--no-step", action="store_true", help="layer only")
    args = parse_args(p, argv)
    device, dtype = setup(args)
    cuda = device.type == "cuda"
    d = args.width or (32 if args.quick else (1024 if cuda else 256))
    n = args.tokens or (64 if args.quick else (16384 if cuda else 2048))
    experts = QUICK_EXPERTS if args.quick else EXPERTS
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats or (2 if args.quick else (10 if cuda else 3))
    batch, seq = (2, 32) if args.quick else ((8, 512) if cuda else (4, 128))
    info = machine(device)

    layer, step = [], []
    for e in experts:
        k, f = active_shape(e, d)
        print(f"finegrained: E={e} k={k} F={f} layer ...", flush=True)
        layer.append(bench_layer(Shape(d, f, e, k, n), device, dtype, warmup, repeats, FAST))
        if not args.no_step:
            print(f"finegrained: E={e} step ...", flush=True)
            s = StepShape(d, 2, max(1, d // 64), e, k, f, batch, seq)
            step.append(bench_step(s, device, dtype, warmup, repeats))
    k1, f1 = active_shape(experts[-1], d)
    hot = growth_hotspots(
        Shape(d, f1, experts[0], k1, n),  # same k and F: only E differs
        Shape(d, f1, experts[-1], k1, n),
        device,
        dtype,
        1 if args.quick else 2,
    )
    growth = {"layer": _growth(layer, "impl", "E"), "step": _growth(step, "variant", "experts")}
    payload = {
        "machine": info,
        "settings": {
            "dtype": str(dtype),
            "width": d,
            "layer_tokens": n,
            "step_batch": [batch, seq],
            "experts": list(experts),
            "warmup": warmup,
            "repeats": repeats,
            "quick": args.quick,
        },
        "layer": layer,
        "step": step,
        "growth_vs_first_E": growth,
        "rmoe_layer_hotspots": hot,
    }
    path = write_results("finegrained", args, payload, markdown(payload, dtype))
    print(f"finegrained: wrote {path}")
    print(path.with_suffix(".md").read_text())
    return 0


def _growth(results: list[dict[str, Any]], key: str, e_key: str) -> dict[str, dict[str, float]]:
    """candidate -> {E: median time / the candidate's median time at the first E}."""
    out: dict[str, dict[str, float]] = {}
    if not results:
        return out
    base = {r[key]: r["median_s"] for r in results[0]["rows"]}
    for res in results:
        for r in res["rows"]:
            if r[key] in base:
                out.setdefault(r[key], {})[str(res["shape"][e_key])] = r["median_s"] / base[r[key]]
    return out


def _speed(row: dict[str, Any], ref: str) -> str:
    r = row.get(f"speedup_vs_{ref}")
    return f"{r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})" if r else ""


def markdown(payload: dict[str, Any], dtype: torch.dtype) -> str:
    """Layer table, step table, growth with E, hotspots."""
    dt = str(dtype).replace("torch.", "")
    st = payload["settings"]
    out = [
        f"Fine-grained experts at fixed active compute (k x F = 2D), D={st['width']}, {dt}.\n",
        f"MoE layer forward+backward, N={st['layer_tokens']} tokens:\n",
    ]
    rows = []
    for res in payload["layer"]:
        s = res["shape"]
        for r in res["rows"]:
            auto = " (auto)" if r["impl"] == f"rmoe[{res['auto']}]" else ""
            rows.append(
                [
                    f"E={s['E']} k={s['K']} F={s['F']}",
                    r["impl"] + auto,
                    fmt_ms(r),
                    f"{r['tokens_per_s']:,.0f}",
                    _speed(r, "hf[eager]"),
                    _speed(r, "hf[grouped_mm]"),
                ]
            )
    out.append(
        md_table(
            [
                "experts",
                "impl",
                "ms/call median [IQR]",
                "tokens/s",
                "× hf eager",
                "× hf grouped_mm",
            ],
            rows,
        )
    )
    if payload["step"]:
        b, t = st["step_batch"]
        out += ["", f"Training step, 2 layers, batch {b} x seq {t}:\n"]
        rows = []
        for res in payload["step"]:
            s = res["shape"]
            for r in res["rows"]:
                rows.append(
                    [
                        f"E={s['experts']} k={s['top_k']} F={s['expert_width']}",
                        r["variant"],
                        fmt_ms(r),
                        f"{r['tokens_per_s']:,.0f}",
                        _speed(r, "Mixtral[eager]"),
                        _speed(r, "Mixtral[grouped_mm]"),
                    ]
                )
        out.append(
            md_table(
                [
                    "experts",
                    "variant",
                    "ms/step median [IQR]",
                    "tokens/s",
                    "× Mixtral eager",
                    "× Mixtral grouped_mm",
                ],
                rows,
            )
        )
    experts = st["experts"]
    out += ["", f"Time relative to the same candidate at E={experts[0]} (what grows with E):\n"]
    rows = []
    for part, by in payload["growth_vs_first_E"].items():
        for name, g in by.items():
            rows.append([part, name, *[f"{g.get(str(e), float('nan')):.2f}" for e in experts]])
    out.append(md_table(["part", "candidate", *[f"E={e}" for e in experts]], rows))
    hot = payload["rmoe_layer_hotspots"]
    grow = ", ".join(f"{g['op']} +{g['delta_ms']:.1f} ms" for g in hot["growing_ops_ms"]) or "none"
    out += [
        "",
        f"rmoe layer (auto backend) profile, E={hot['small']['E']} -> E={hot['large']['E']}: "
        f"{hot['total_ms']['small']:.1f} -> {hot['total_ms']['large']:.1f} ms self time; ops "
        f"growing most: {grow}.",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
