"""Where a training step's time goes, and the step's fraction of the dense-matmul ceiling.

Two shapes: the `tiny` preset's training shape (its model, batch 16 x seq 256, bytes vocabulary)
and the step suite's CPU shape (D=512, 4 layers, E=8, k=2, F=512, batch 4 x 128; RMoE with
P = D/8). One step = zero grads, forward with labels (LM loss + aux loss), backward, AdamW step
with `rmoe.training.optim.adamw` (the trainer's optimizer, its "auto" implementation).

* Shares: torch.profiler over a few steps; every op's self time (CPU: self CPU time; CUDA: the
  device time of the kernels it launched) goes to one category by its name (GEMM, attention
  core, elementwise/norms, routing + permutation, loss, memory/layout, autograd engine) unless it
  ran inside the `optimizer` range (zero_grad + step), which is its own category; the ranges'
  own self time (Python between ops) is "python/framework".
* Ceiling: FLOPs per step = 3 x `count_config(cfg).forward_flops_per_token` x tokens (matmuls
  only), divided by the un-profiled step time, over the FLOP/s of one square matmul of
  comparable size (n = cube root of tokens x D x F, a multiple of 64), the two timed side by
  side (A B A B). Target: >= 80 % of the ceiling at the tiny training shape.
* Optimizer: torch's AdamW for-loop, foreach and fused implementations timed side by side on
  the same parameters and gradients (opt.step() only), and which one "auto" picks.

    python -m benchmarks.profile            # both shapes
    python -m benchmarks.profile --quick    # seconds
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.common import (
    base_parser,
    dense_bf16_peak,
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
from benchmarks.step import DEFAULTS, QUICK, StepShape

TARGET_CEILING = 0.80
PHASES = ("zero_grad", "forward", "backward", "optimizer")
CATEGORIES = (
    "GEMM",
    "attention core",
    "elementwise/norms",
    "routing + permutation",
    "loss",
    "memory/layout",
    "autograd engine",
    "optimizer",
    "python/framework",
)

GEMM_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "addmv", "mv", "dot", "matmul",
    "linear", "_scaled_grouped_mm", "_scaled_mm",
}  # fmt: skip
ATTENTION_PARTS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attn")
LOSS_PARTS = ("log_softmax", "nll_loss", "cross_entropy")
ROUTING_OPS = {
    "topk", "sort", "argsort", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_",
    "scatter_reduce", "index_select", "index_add", "index_add_", "index", "index_put_",
    "index_put", "_index_put_impl_", "cumsum", "bincount", "histc", "one_hot", "softmax",
    "_softmax", "_softmax_backward_data", "repeat_interleave", "searchsorted", "argmax",
    "nonzero", "masked_select", "masked_scatter", "unique", "_unique2", "take_along_dim",
    "index_select_backward", "gather_backward", "sort_backward", "topk_backward",
}  # fmt: skip
LAYOUT_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros",
    "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones", "new_full",
    "copy_", "clone", "contiguous", "to", "_to_copy", "cat", "stack", "fill_", "zero_", "t",
    "transpose", "permute", "view", "reshape", "_reshape_alias", "as_strided", "expand",
    "expand_as", "slice", "select", "split", "split_with_sizes", "unsqueeze", "squeeze",
    "narrow", "chunk", "unbind", "detach", "detach_", "alias", "resize_", "set_", "lift_fresh",
    "_unsafe_view", "unflatten", "flatten", "embedding", "embedding_dense_backward",
    "embedding_backward", "_local_scalar_dense", "item", "arange", "numpy_T", "view_as",
    "result_type", "is_nonzero", "_has_compatible_shallow_copy_type", "pad", "constant_pad_nd",
    "select_backward", "slice_backward", "unsqueeze_", "squeeze_", "_efficientzerotensor",
    "movedim", "roll", "tril", "triu", "masked_fill_", "randint", "random_",
}  # fmt: skip


def categorize(name: str) -> str:
    """The category of one profiler event by its name (see the module docstring)."""
    if name.startswith("aten::"):
        op = name[6:]
        if op in GEMM_OPS:
            return "GEMM"
        if any(p in op for p in ATTENTION_PARTS):
            return "attention core"
        if any(p in op for p in LOSS_PARTS):
            return "loss"
        if op in ROUTING_OPS:
            return "routing + permutation"
        if op in LAYOUT_OPS:
            return "memory/layout"
        return "elementwise/norms"
    if name.startswith("step::"):
        return "python/framework"
    if "Backward" in name or name.startswith(("autograd::", "torch::autograd")):
        return "autograd engine"
    return "elementwise/norms" if name.startswith(("prim::", "rmoe::")) else "python/framework"


# ----------------------------------------------------------------------------------------------
# models and steps
# ----------------------------------------------------------------------------------------------
def tiny_preset() -> tuple[Any, int, int]:
    """(RMoEConfig, batch, seq) of the `tiny` preset (bytes tokenizer: vocabulary 258)."""
    from rmoe.training.config import load_config

    cfg = load_config("tiny")
    return cfg.model_config(vocab_size=258), cfg.data.batch_size, cfg.data.seq_len


def step_shape_config(s: StepShape, router_dim: int | None = None) -> Any:
    """The step suite's RMoE (recurrent router, P = D/8 unless given) as an RMoEConfig."""
    from benchmarks.step import build_rmoe

    return build_rmoe(s, "recurrent", router_dim or max(1, s.width // 8)).config


def shapes(quick: bool, device: torch.device) -> list[tuple[str, Any, int, int]]:
    """(label, RMoEConfig, batch, seq) per profiled shape."""
    if quick:
        return [("quick", step_shape_config(QUICK), QUICK.batch, QUICK.seq)]
    tiny, b, t = tiny_preset()
    s = DEFAULTS.get(device.type, DEFAULTS["cpu"])
    return [("tiny preset", tiny, b, t), ("step suite", step_shape_config(s), s.batch, s.seq)]


def make_step(model: torch.nn.Module, ids: torch.Tensor, optimizer: torch.optim.Optimizer):
    """One training step on ids [B, T], its phases inside record_function ranges."""
    from rmoe.modeling import install_router_step_hook

    install_router_step_hook(model, optimizer)
    model.train()

    def step() -> None:
        with record_function("step::zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        with record_function("step::forward"):
            loss = model(input_ids=ids, labels=ids).loss
        with record_function("step::backward"):
            loss.backward()
        with record_function("step::optimizer"):
            optimizer.step()

    return step


def square_matmul(n: int, device: torch.device, dtype: torch.dtype):
    """A zero-argument [n, n] x [n, n] matmul (FLOPs 2 n^3)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def ceiling_size(tokens: int, d: int, f: int) -> int:
    """Side n of the square matmul of comparable size: cube root of tokens x D x F, rounded to a
    multiple of 64 (at least 64)."""
    return max(64, int(round((tokens * d * f) ** (1 / 3) / 64)) * 64)


# ----------------------------------------------------------------------------------------------
# the profile
# ----------------------------------------------------------------------------------------------
def profile_steps(step, device: torch.device, repeats: int) -> dict[str, Any]:
    """Self time per category and per phase over `repeats` steps (one warm-up first)."""
    step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / repeats
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    cuda = device.type == "cuda"

    ranges = sorted(
        (e.time_range.start, e.time_range.end, e.name[6:])
        for e in events
        if e.name.startswith("step::")
    )

    def phase_of(e) -> str:
        root = e
        while root.cpu_parent is not None:
            root = root.cpu_parent
        if root.name.startswith("step::"):
            return root.name[6:]
        start = e.time_range.start  # backward ops on the autograd engine's device threads
        for a, b, name in ranges:
            if a <= start <= b:
                return name
        return "other"

    by_cat: dict[str, float] = defaultdict(float)
    by_phase: dict[str, float] = defaultdict(float)
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if cuda and e.name.startswith("step::"):
            us = 0.0  # device time is the kernels'; ranges launch none themselves
        if us <= 0:
            continue
        phase = phase_of(e)
        cat = "optimizer" if phase in ("optimizer", "zero_grad") else categorize(e.name)
        if e.name.startswith("step::"):
            cat = "python/framework"
        by_cat[cat] += us / repeats
        by_phase[phase] += us / repeats
        by_op[e.name][0] += us / repeats
        by_op[e.name][1] += 1
    total = sum(by_cat.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "profiled_wall_ms_per_step": wall * 1e3,
        "attributed_ms_per_step": total / 1e3,
        "time_basis": "self device time" if cuda else "self CPU time",
        "categories_ms": {c: by_cat.get(c, 0.0) / 1e3 for c in CATEGORIES},
        "categories_share": {c: (by_cat.get(c, 0.0) / total if total else 0.0) for c in CATEGORIES},
        "phases_ms": {p: by_phase.get(p, 0.0) / 1e3 for p in (*PHASES, "other")},
        "top_ops": [
            {
                "op": k,
                "ms_per_step": v[0] / 1e3,
                "calls_per_step": v[1] / repeats,
                "cat": categorize(k),
            }
            for k, v in top
        ],
    }


def optimizer_comparison(
    model: torch.nn.Module, device: torch.device, warmup: int, repeats: int
) -> dict[str, Any]:
    """opt.step() of AdamW for-loop / foreach / fused side by side on `model`'s parameters
    (gradients already set), and the implementation `adamw(..., "auto")` picks."""
    from rmoe.training.optim import adamw, adamw_implementation

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    snapshot = [p.detach().clone() for p in params]
    fns, notes = {}, {}
    for impl in ("for-loop", "foreach", "fused"):
        try:
            opt = adamw(model, 1e-4, 0.1, implementation=impl)
            opt.step()
        except (RuntimeError, ValueError) as exc:  # fused unsupported on this device/dtype
            notes[impl] = f"skipped: {exc}"
            continue
        fns[impl] = opt.step
    times = interleaved(fns, device, warmup, repeats)
    with torch.no_grad():
        for p, s in zip(params, snapshot):
            p.copy_(s)
    base = times.get("for-loop")
    rows = {}
    for name, ts in times.items():
        rows[name] = {**summarize(ts)}
        if base is not None:
            rows[name]["speedup_vs_for_loop"] = ratio_stats(base, ts)
    return {
        "auto_picks": adamw_implementation(params),
        "params": sum(p.numel() for p in params),
        "rows": rows,
        "notes": notes,
    }


def bench_shape(
    label: str,
    cfg: Any,
    batch: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    prof_repeats: int,
) -> dict[str, Any]:
    """Time, profile and compare optimizers for one shape."""
    from rmoe import RMoEForCausalLM
    from rmoe.modeling.accounting import count_config
    from rmoe.training.optim import adamw

    torch.manual_seed(0)
    model = RMoEForCausalLM(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    opt = adamw(model, 1e-4, 0.1)
    step = make_step(model, ids, opt)
    tokens = batch * seq
    n = ceiling_size(tokens, cfg.hidden_size, cfg.moe_intermediate_size)
    mm = square_matmul(n, device, dtype)
    times = interleaved({"step": step, "matmul": mm}, device, warmup, repeats)
    step_s, mm_s = summarize(times["step"]), summarize(times["matmul"])
    counts = count_config(cfg, seq)
    step_flops = 3 * counts.forward_flops_per_token * tokens
    dense_rate = 2 * n**3 / mm_s["median_s"]
    achieved = step_flops / step_s["median_s"]
    per_round = sorted(
        (step_flops / a) / (2 * n**3 / b) for a, b in zip(times["step"], times["matmul"])
    )
    prof = profile_steps(step, device, prof_repeats)
    optim = optimizer_comparison(model, device, warmup, max(3, repeats))
    frac = achieved / dense_rate
    peak = dense_bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {
        "peak_bf16_flops_per_s": peak,
        "mfu_vs_bf16_peak": achieved / peak if peak else None,
        "label": label,
        "shape": {
            "width": cfg.hidden_size,
            "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads,
            "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok,
            "expert_width": cfg.moe_intermediate_size,
            "router_type": cfg.router_type,
            "router_dim": cfg.router_dim,
            "batch": batch,
            "seq": seq,
            "vocab": cfg.vocab_size,
        },
        "step": step_s,
        "tokens_per_s": tokens / step_s["median_s"],
        "matmul_n": n,
        "matmul": mm_s,
        "step_flops": step_flops,
        "flops_breakdown_per_token": counts.breakdown,
        "achieved_flops_per_s": achieved,
        "dense_flops_per_s": dense_rate,
        "ceiling_fraction": frac,
        "ceiling_fraction_min_max": [per_round[0], per_round[-1]],
        "profile": prof,
        "optimizer": optim,
    }


def verdict(res: dict[str, Any]) -> str:
    f = res["ceiling_fraction"]
    ok = f >= TARGET_CEILING
    return (
        f"{'MET' if ok else 'NOT MET'}: step at {f:.0%} of the matmul ceiling "
        f"(target >= {TARGET_CEILING:.0%})"
    )


def markdown(results: list[dict[str, Any]], dtype: torch.dtype) -> str:
    """Three tables: ceiling, shares by category, optimizer implementations."""
    dt = str(dtype).replace("torch.", "")
    labels = [r["label"] for r in results]

    def shp(r):
        s = r["shape"]
        return (
            f"D={s['width']} L={s['layers']} E={s['experts']} k={s['top_k']} "
            f"F={s['expert_width']} {s['router_type']} P={s['router_dim']}, "
            f"{s['batch']}x{s['seq']}"
        )

    rows = []
    for r in results:
        lo, hi = r["ceiling_fraction_min_max"]
        rows.append(
            [
                r["label"],
                shp(r),
                fmt_ms(r["step"]),
                f"{r['tokens_per_s']:,.0f}",
                f"{r['step_flops'] / 1e9:.2f}",
                f"{r['achieved_flops_per_s'] / 1e9:.1f}",
                f"{r['matmul_n']}: {r['dense_flops_per_s'] / 1e9:.1f}",
                f"{r['ceiling_fraction']:.0%} ({lo:.0%}–{hi:.0%})",
            ]
        )
    out = [
        f"Training step vs the dense-matmul ceiling, {dt}. FLOPs = 3 x forward matmul FLOPs "
        "(count_config) x tokens; ceiling = square matmul n x n x n timed side by side.\n",
        md_table(
            [
                "shape",
                "model, batch",
                "ms/step median [IQR]",
                "tokens/s",
                "GFLOP/step",
                "step GFLOP/s",
                "matmul n: GFLOP/s",
                "of ceiling (min–max)",
            ],
            rows,
        ),
        "",
    ]
    out += [f"- **{r['label']}**: {verdict(r)}" for r in results]
    out += [
        f"- **{r['label']}**: MFU {r['mfu_vs_bf16_peak']:.1%} of the device's dense bf16 peak "
        f"({r['peak_bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, data sheet)"
        for r in results
        if r.get("mfu_vs_bf16_peak") is not None
    ]
    basis = results[0]["profile"]["time_basis"]
    out += [
        "",
        f"Share of profiled step time ({basis}, torch.profiler; ms per step in brackets).\n",
    ]
    cat_rows = []
    for c in CATEGORIES:
        cells = [c]
        for r in results:
            p = r["profile"]
            cells.append(f"{p['categories_share'][c]:.1%} ({p['categories_ms'][c]:.1f})")
        cat_rows.append(cells)
    cat_rows.append(
        ["total attributed / profiled wall ms"]
        + [
            f"{r['profile']['attributed_ms_per_step']:.1f} / "
            f"{r['profile']['profiled_wall_ms_per_step']:.1f}"
            for r in results
        ]
    )
    for ph in PHASES:
        cat_rows.append(
            [f"phase: {ph} ms"] + [f"{r['profile']['phases_ms'][ph]:.1f}" for r in results]
        )
    out.append(md_table(["category", *labels], cat_rows))
    out += ["", "Top ops (ms per step):\n"]
    for r in results:
        tops = ", ".join(f"{t['op']} {t['ms_per_step']:.1f}" for t in r["profile"]["top_ops"][:6])
        out.append(f"- {r['label']}: {tops}")
    out += ["", "AdamW implementations, opt.step() only, side by side (median [IQR] ms).\n"]
    orow = []
    for r in results:
        o = r["optimizer"]
        for name, row in o["rows"].items():
            sp = row.get("speedup_vs_for_loop")
            orow.append(
                [
                    r["label"],
                    name + (" (auto)" if name == o["auto_picks"] else ""),
                    fmt_ms(row),
                    f"{sp['median']:.2f} ({sp['min']:.2f}–{sp['max']:.2f})" if sp else "",
                    f"{row['median_s'] / r['step']['median_s']:.1%}",
                ]
            )
        for name, note in o["notes"].items():
            orow.append([r["label"], name, note, "", ""])
    out.append(
        md_table(["shape", "implementation", "ms/step", "× for-loop (min–max)", "of step"], orow)
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write profile.json / profile.md under --out."""
    p = base_parser("profile", __doc__.splitlines()[0])
    p.add_argument("--profile-steps", type=int, default=None, help="profiled steps per shape")
    args = parse_args(p, argv)
    device, dtype = setup(args)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats or (2 if args.quick else 4)
    prof_repeats = args.profile_steps or (1 if args.quick else 2)
    info = machine(device)
    results = []
    for label, cfg, b, t in shapes(args.quick, device):
        print(f"profile: {label} ...", flush=True)
        results.append(bench_shape(label, cfg, b, t, device, dtype, warmup, repeats, prof_repeats))
    payload = {
        "machine": info,
        "settings": {
            "dtype": str(dtype),
            "warmup": warmup,
            "repeats": repeats,
            "profile_steps": prof_repeats,
            "quick": args.quick,
            "target_ceiling_fraction": TARGET_CEILING,
        },
        "results": results,
        "verdicts": {r["label"]: verdict(r) for r in results},
    }
    path = write_results("profile", args, payload, markdown(results, dtype))
    print(f"profile: wrote {path}")
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
