"""Full training step tokens/s and peak memory: rmoe SMoE vs rmoe RMoE vs MixtralForCausalLM.

All models share width, depth, heads, experts (E, K, F), vocabulary (258, bytes), batch and
sequence length. One step = zero grads, forward with labels (LM loss + 0.01 x load-balancing
loss; Mixtral with output_router_logits=True so it computes its aux loss too), backward,
AdamW step. RMoE (recurrent router, GRU cell) is measured for several router state widths P
and its overhead reported as step time / SMoE step time (paired per round).

Peak memory is what one step adds on top of the resident model + AdamW state, gradients freed
first (so it counts gradients, activations and temporaries); see
`benchmarks.common.peak_memory`: CUDA max_memory_allocated, CPU the resident-set high-water mark
reset through /proc/self/clear_refs with large allocations mmap-backed (tracemalloc cannot see
torch's allocations).

Against Mixtral: rmoe SMoE and RMoE (P = D/8) vs MixtralForCausalLM with each experts
implementation, eager and under torch.compile (the model compiled; backward and AdamW eager),
at the step shape and at the `tiny` preset's training shape (D=192, 4 layers, E=8, k=2, F=384,
batch 16 x seq 256). Target: rmoe step >= 1.25x Mixtral's fastest variant. RMoE vs SMoE: the
main table's paired per-round ratios (>= 15 rounds outside --quick) at P <= D/8, target
<= 1.03x. Compiling (rmoe SMoE and Mixtral[grouped_mm]; --compile-all: every variant) is on outside
--quick (--compile / --no-compile); a model that fails to
compile is reported and left out.

Activation memory: bytes of the tensors autograd saves for backward in one forward
(torch.autograd.graph.saved_tensors_hooks, storages counted once, parameters excluded; exact on
any device; the inputs torch.utils.checkpoint keeps for recomputation are not seen, a small
undercount with checkpointing) with and without activation checkpointing (rmoe: `activation_checkpointing` "moe"
and "layer"; Mixtral: `gradient_checkpointing_enable()`), plus the resident peak step memory.

    python -m benchmarks.step            # CPU: D=512, 4 layers, batch 4 x seq 128, float32
    python -m benchmarks.step --quick    # smoke run
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.common import (
    base_parser,
    fmt_ms,
    interleaved,
    machine,
    md_table,
    parse_args,
    peak_memory,
    ratio_stats,
    setup,
    summarize,
    sync,
    write_results,
)


@dataclass(frozen=True)
class StepShape:
    """Model and batch shape shared by every variant."""

    width: int
    layers: int
    heads: int
    experts: int
    top_k: int
    expert_width: int
    batch: int
    seq: int
    vocab: int = 258


DEFAULTS = {
    "cpu": StepShape(512, 4, 8, 8, 2, 512, 4, 128),
    "cuda": StepShape(512, 4, 8, 8, 2, 512, 16, 512),
}
QUICK = StepShape(64, 2, 4, 4, 2, 64, 2, 32)
TINY_TRAINING = StepShape(192, 4, 4, 8, 2, 384, 16, 256)  # src/rmoe/configs/tiny.yaml
ROUTER_DIMS = [16, 32, 64, 128]
TARGET_VS_MIXTRAL = 1.25
TARGET_RMOE_OVER_SMOE = 1.03


def build_rmoe(
    s: StepShape, router_type: str, router_dim: int = 128, **extra: Any
) -> torch.nn.Module:
    """RMoEForCausalLM: router_type "linear" (SMoE) or "recurrent" (RMoE, GRU, state P);
    `extra` are further RMoEConfig fields (e.g. activation_checkpointing)."""
    from rmoe import RMoEConfig, RMoEForCausalLM

    cfg = RMoEConfig(
        **extra,
        vocab_size=s.vocab,
        hidden_size=s.width,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        moe_intermediate_size=s.expert_width,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        router_type=router_type,
        router_dim=router_dim,
        max_position_embeddings=max(s.seq, 128),
        router_aux_loss_coef=0.01,
    )
    return RMoEForCausalLM(cfg)


def build_mixtral(s: StepShape, experts_impl: str) -> torch.nn.Module:
    """transformers' MixtralForCausalLM of the same shape, with the given experts implementation."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=s.vocab,
        hidden_size=s.width,
        intermediate_size=s.expert_width,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        num_local_experts=s.experts,
        num_experts_per_tok=s.top_k,
        max_position_embeddings=max(s.seq, 128),
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=False,
    )
    cfg._experts_implementation = experts_impl
    cfg._attn_implementation = "sdpa"
    return MixtralForCausalLM(cfg)


def variants(s: StepShape, quick: bool) -> dict[str, Any]:
    """name -> zero-argument builder."""
    from benchmarks.layer import hf_implementations

    out: dict[str, Any] = {"rmoe SMoE": lambda: build_rmoe(s, "linear")}
    for p in ROUTER_DIMS[:1] if quick else ROUTER_DIMS:
        out[f"rmoe RMoE P={p}"] = lambda p=p: build_rmoe(s, "recurrent", p)
    for impl in hf_implementations():
        out[f"Mixtral[{impl}]"] = lambda impl=impl: build_mixtral(s, impl)
    return out


def make_step(model: torch.nn.Module, ids: torch.Tensor):
    """One AdamW training step on ids [B, T] (labels = ids)."""
    from rmoe.modeling import install_router_step_hook

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    install_router_step_hook(model, opt)  # expert-bias update / global-loss reset (rmoe only)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def compare_with_mixtral(
    s: StepShape,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
    compile_models: bool,
    compile_all: bool,
) -> dict[str, Any]:
    """rmoe SMoE / RMoE (P = D/8) vs Mixtral per experts implementation, eager and compiled,
    side by side; the verdict against the target (rmoe >= 1.25x Mixtral's fastest)."""
    import time

    from benchmarks.layer import hf_implementations

    p = max(1, s.width // 8)
    builders: dict[str, Any] = {
        "rmoe SMoE": lambda: build_rmoe(s, "linear"),
        f"rmoe RMoE P={p}": lambda: build_rmoe(s, "recurrent", p),
    }
    impls = hf_implementations()
    for impl in impls:
        builders[f"Mixtral[{impl}]"] = lambda impl=impl: build_mixtral(s, impl)
    compiled = []
    if (
        compile_models
    ):  # Mixtral's eager experts loop is data-dependent: compiled only with --compile-all
        fastest_hf = "grouped_mm" if "grouped_mm" in impls else "eager"
        compiled = [
            n for n in builders if compile_all or n == "rmoe SMoE" or n == f"Mixtral[{fastest_hf}]"
        ]
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
    steps, notes, compile_s = {}, {}, {}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build().to(device=device, dtype=dtype)
        steps[name] = make_step(model, ids)
        if name in compiled:
            torch.manual_seed(0)
            cmodel = build().to(device=device, dtype=dtype)
            try:
                fn = make_step(torch.compile(cmodel), ids)
                t0 = time.perf_counter()
                fn()  # compiles
                sync(device)
                compile_s[f"{name} +compile"] = time.perf_counter() - t0
                steps[f"{name} +compile"] = fn
            except Exception as exc:  # noqa: BLE001 - report any compile failure and go on
                notes[f"{name} +compile"] = (
                    f"compile failed: {type(exc).__name__}: {str(exc)[:200]}"
                )
    times = interleaved(steps, device, warmup, repeats)
    tokens = s.batch * s.seq
    med = {n: summarize(t)["median_s"] for n, t in times.items()}
    hf = [n for n in times if n.startswith("Mixtral")]
    fastest = min(hf, key=med.__getitem__) if hf else None
    rows = []
    for name, ts in times.items():
        row: dict[str, Any] = {"variant": name, **summarize(ts), "tokens_per_s": tokens / med[name]}
        if name in compile_s:
            row["compile_s"] = compile_s[name]
        if fastest:
            row["speedup_vs_fastest_mixtral"] = ratio_stats(times[fastest], ts)
        rows.append(row)
    verdicts = {}
    if fastest:
        for base in [n for n in times if n.startswith("rmoe")]:
            x = med[fastest] / med[base]
            ok = x >= TARGET_VS_MIXTRAL
            verdicts[base] = (
                f"{'MET' if ok else 'NOT MET'}: {base} {x:.2f}x {fastest} "
                f"(target >= {TARGET_VS_MIXTRAL}x)"
            )
    return {
        "shape": asdict(s),
        "fastest_mixtral": fastest,
        "rows": rows,
        "notes": notes,
        "verdicts": verdicts,
    }


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in one training forward (each storage
    once, parameters excluded); the graph is then freed by a backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def memory_table(s: StepShape, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Saved-activation bytes and peak step memory, with and without activation checkpointing:
    rmoe SMoE and RMoE (P = D/8) with activation_checkpointing none/moe/layer, Mixtral (its
    fastest experts implementation) without and with gradient_checkpointing_enable()."""
    from benchmarks.layer import hf_implementations

    p = max(1, s.width // 8)
    impl = "grouped_mm" if "grouped_mm" in hf_implementations() else "eager"
    ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
    builders: dict[str, Any] = {}
    notes = {}
    for label, rt, rd in (("rmoe SMoE", "linear", 128), (f"rmoe RMoE P={p}", "recurrent", p)):
        for mode in ("none", "moe", "layer"):
            builders[f"{label} ckpt={mode}"] = lambda rt=rt, rd=rd, mode=mode: (
                build_rmoe(s, rt, rd)
                if mode == "none"
                else build_rmoe(s, rt, rd, activation_checkpointing=mode)
            )

    def mixtral_ckpt():
        m = build_mixtral(s, impl)
        if hasattr(m, "activation_checkpointing_enable"):  # transformers 5
            m.activation_checkpointing_enable({"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable({"use_reentrant": False})
        return m

    builders[f"Mixtral[{impl}] ckpt=none"] = lambda: build_mixtral(s, impl)
    builders[f"Mixtral[{impl}] ckpt=layer"] = mixtral_ckpt
    rows, method = [], None
    for name, build in builders.items():
        try:
            torch.manual_seed(0)
            model = build().to(device=device, dtype=dtype)
        except (TypeError, ValueError) as exc:  # the field is missing in this checkout
            notes[name] = f"skipped: {exc}"[:200]
            continue
        saved = saved_activation_bytes(model, ids)
        fn = make_step(model, ids)
        fn()
        peak, method = peak_memory(
            fn, device, prepare=lambda fn=fn: fn.optimizer.zero_grad(set_to_none=True)
        )
        rows.append({"variant": name, "saved_activation_bytes": saved, "peak_step_bytes": peak})
        del model, fn
    return {"shape": asdict(s), "rows": rows, "notes": notes, "peak_method": method}


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write step.json / step.md under --out."""
    args = parse(argv)
    device, dtype = setup(args)
    base = QUICK if args.quick else DEFAULTS.get(device.type, DEFAULTS["cpu"])
    over = {k: getattr(args, k) for k in ("batch", "seq", "width", "layers") if getattr(args, k)}
    s = StepShape(**{**asdict(base), **over})
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats or (2 if args.quick else 15)
    info = machine(device)

    from rmoe.modeling.accounting import count_config
    from rmoe.registry import ROUTERS

    ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
    builders = variants(s, args.quick)
    models = {n: b().to(device=device, dtype=dtype) for n, b in builders.items()}
    steps = {n: make_step(m, ids) for n, m in models.items()}
    print(f"step: main table, {len(steps)} variants x {repeats} rounds ...", flush=True)
    times = interleaved(steps, device, warmup, repeats)
    memory, mem_method = {}, None
    for n, fn in steps.items():  # after timing: the CPU method changes allocation costs
        free_grads = lambda fn=fn: fn.optimizer.zero_grad(set_to_none=True)  # noqa: E731
        memory[n], mem_method = peak_memory(fn, device, prepare=free_grads)

    tokens = s.batch * s.seq
    smoe = times["rmoe SMoE"]
    refs = {n: t for n, t in times.items() if n.startswith("Mixtral")}
    rows = []
    for n, ts in times.items():
        m = models[n]
        row: dict[str, Any] = {
            "variant": n,
            **summarize(ts),
            "tokens_per_s": tokens / summarize(ts)["median_s"],
            "peak_step_memory_bytes": memory[n],
            "params": sum(p.numel() for p in m.parameters()),
            "time_vs_smoe": ratio_stats(ts, smoe),
        }
        for rn, rts in refs.items():
            row[f"speedup_vs_{rn}"] = ratio_stats(rts, ts)
        cfg = getattr(m, "config", None)
        if n.startswith("rmoe"):
            c = count_config(cfg, s.seq)
            row["router_flops_share"] = c.router_flops_per_token / c.forward_flops_per_token
            row["width_over_router_dim"] = (
                s.width / cfg.router_dim if ROUTERS[cfg.router_type].uses_cell else None
            )
        rows.append(row)
    del models, steps
    rmoe_verdicts = {}
    for r in rows:
        ratio = r.get("width_over_router_dim")
        if ratio is not None and ratio >= 8:
            t = r["time_vs_smoe"]
            ok = t["median"] <= TARGET_RMOE_OVER_SMOE
            rmoe_verdicts[r["variant"]] = (
                f"{'MET' if ok else 'NOT MET'}: {r['variant']} / SMoE = {t['median']:.3f} "
                f"({t['min']:.3f}–{t['max']:.3f}) over {repeats} paired rounds "
                f"(target <= {TARGET_RMOE_OVER_SMOE})"
            )
    compile_models = args.compile if args.compile is not None else not args.quick
    cmp_shapes = [s] if args.quick or over else [TINY_TRAINING, s]
    cmp_repeats = args.repeats or (2 if args.quick else 5)
    comparisons = []
    for cs in cmp_shapes:
        print(f"step: vs Mixtral at {cs} (compile={compile_models}) ...", flush=True)
        comparisons.append(
            compare_with_mixtral(
                cs, device, dtype, min(warmup, 1), cmp_repeats, compile_models, args.compile_all
            )
        )
    print("step: activation memory ...", flush=True)
    mem = memory_table(s, device, dtype)
    payload = {
        "machine": info,
        "settings": {
            "shape": asdict(s),
            "dtype": str(dtype),
            "warmup": warmup,
            "repeats": repeats,
            "memory_method": mem_method,
            "quick": args.quick,
        },
        "rows": rows,
        "rmoe_vs_smoe_verdicts": rmoe_verdicts,
        "vs_mixtral": comparisons,
        "memory": mem,
    }
    md = markdown(rows, s, dtype, mem_method)
    md += "\n\n" + (
        "\n".join(f"- {v}" for v in rmoe_verdicts.values())
        or f"- RMoE vs SMoE: no RMoE variant with P <= D/8 in this run (target <= {TARGET_RMOE_OVER_SMOE})"
    )
    md += "\n\n" + markdown_extra(comparisons, mem, dtype)
    path = write_results("step", args, payload, md)
    print(f"step: wrote {path}")
    print(path.with_suffix(".md").read_text())
    return 0


def markdown(rows: list[dict[str, Any]], s: StepShape, dtype: torch.dtype, mem: str | None) -> str:
    """One table of variants."""
    refs = [k.removeprefix("speedup_vs_") for k in rows[0] if k.startswith("speedup_vs_")]
    headers = [
        "variant",
        "ms/step median [IQR]",
        "tokens/s",
        "peak step MiB",
        "params (M)",
        "time / SMoE (min–max)",
        "router FLOPs share",
        *[f"× {r}" for r in refs],
    ]
    body = []
    for r in rows:
        t = r["time_vs_smoe"]
        share = r.get("router_flops_share")
        body.append(
            [
                r["variant"],
                fmt_ms(r),
                f"{r['tokens_per_s']:,.0f}",
                f"{r['peak_step_memory_bytes'] / 2**20:.1f}",
                f"{r['params'] / 1e6:.2f}",
                f"{t['median']:.3f} ({t['min']:.3f}–{t['max']:.3f})",
                f"{share:.1%}" if share is not None else "",
                *[f"{r[f'speedup_vs_{x}']['median']:.2f}" for x in refs],
            ]
        )
    title = (
        f"Training step, {str(dtype).replace('torch.', '')}: D={s.width}, {s.layers} layers, "
        f"{s.heads} heads, E={s.experts}, k={s.top_k}, F={s.expert_width}, batch {s.batch} x "
        f"seq {s.seq}. Peak memory: {mem}.\n\n"
    )
    return title + md_table(headers, body)


def markdown_extra(
    comparisons: list[dict[str, Any]], mem: dict[str, Any], dtype: torch.dtype
) -> str:
    """The vs-Mixtral tables (one per shape) with verdicts, and the memory table."""
    out = []
    for c in comparisons:
        s = StepShape(**c["shape"])
        out.append(
            f"vs MixtralForCausalLM, D={s.width}, {s.layers} layers, E={s.experts}, "
            f"k={s.top_k}, F={s.expert_width}, batch {s.batch} x seq {s.seq}; fastest Mixtral: "
            f"{c['fastest_mixtral']}.\n"
        )
        rows = []
        for r in c["rows"]:
            x = r.get("speedup_vs_fastest_mixtral")
            rows.append(
                [
                    r["variant"],
                    fmt_ms(r),
                    f"{r['tokens_per_s']:,.0f}",
                    f"{x['median']:.2f} ({x['min']:.2f}–{x['max']:.2f})" if x else "",
                    f"{r['compile_s']:.0f}" if "compile_s" in r else "",
                ]
            )
        for name, note in c["notes"].items():
            rows.append([name, note, "", "", ""])
        out.append(
            md_table(
                [
                    "variant",
                    "ms/step median [IQR]",
                    "tokens/s",
                    "× fastest Mixtral (min–max)",
                    "compile s",
                ],
                rows,
            )
        )
        out.append("")
        out += [f"- {v}" for v in c["verdicts"].values()]
        out.append("")
    out.append(
        f"Activation memory, {str(dtype).replace('torch.', '')}: bytes autograd saves for "
        "backward (saved_tensors_hooks, parameters excluded) and peak step memory "
        f"({mem['peak_method']}).\n"
    )
    rows = [
        [
            r["variant"],
            f"{r['saved_activation_bytes'] / 2**20:.1f}",
            f"{r['peak_step_bytes'] / 2**20:.1f}",
        ]
        for r in mem["rows"]
    ]
    rows += [[n, note, ""] for n, note in mem["notes"].items()]
    out.append(md_table(["variant", "saved activations MiB", "peak step MiB"], rows))
    return "\n".join(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser("step", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile'd models vs Mixtral (default: on outside --quick)",
    )
    p.add_argument(
        "--compile-all",
        action="store_true",
        help="also compile RMoE and Mixtral's eager experts loop (slow to compile)",
    )
    return parse_args(p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
