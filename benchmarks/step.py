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
ROUTER_DIMS = [16, 32, 64, 128]


def build_rmoe(s: StepShape, router_type: str, router_dim: int = 128) -> torch.nn.Module:
    """RMoEForCausalLM: router_type "linear" (SMoE) or "recurrent" (RMoE, GRU, state P)."""
    from rmoe import RMoEConfig, RMoEForCausalLM

    cfg = RMoEConfig(
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


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write step.json / step.md under --out."""
    args = parse(argv)
    device, dtype = setup(args)
    base = QUICK if args.quick else DEFAULTS.get(device.type, DEFAULTS["cpu"])
    over = {k: getattr(args, k) for k in ("batch", "seq", "width", "layers") if getattr(args, k)}
    s = StepShape(**{**asdict(base), **over})
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats or (2 if args.quick else 10)
    info = machine(device)

    from rmoe.modeling.accounting import count_config
    from rmoe.registry import ROUTERS

    ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
    builders = variants(s, args.quick)
    models = {n: b().to(device=device, dtype=dtype) for n, b in builders.items()}
    steps = {n: make_step(m, ids) for n, m in models.items()}
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
    }
    path = write_results("step", args, payload, markdown(rows, s, dtype, mem_method))
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser("step", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    return parse_args(p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
