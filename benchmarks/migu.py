"""MIGU's cost per training step: plain vs MIGU (linear layers only, + expert weights) vs random mask.

A step is what `rmoe finetune` does per optimizer step: zero_grad, forward with labels, backward,
the masker's `apply_()` (MIGU: mask the gradient rows from the statistics its hooks gathered;
random mask: draw and mask), AdamW step. The model is an `RMoEForCausalLM` (recurrent router,
SwiGLU experts dispatched by the default backend), so MIGU's forward hooks run on every
`nn.Linear` (attention, router projections, the LM head) and its probes on every expert weight.
A dense `--model dense` variant (attention + GELU MLP, all `nn.Linear`) is the any-PyTorch-model
case.

Arms share one model and one optimizer; a masker is attached before its arm's steps and removed
after them, outside the timed region. Rounds run the arms in rotating order; an arm's figure for
a round is the fastest of its `--steps` steps (least disturbed by other processes on a shared
machine), and the overhead is the median over rounds of the paired per-round ratio to `plain`
(min-max alongside), for wall-clock time and for process CPU time. The target is <= 1.15
(a masked step at most 15 % slower than a plain one).

Shapes (`--shape`): `demo` is the `rmoe continual` demonstration model (D=64, 2 layers, 8
experts of width 96, top-2) on an SFT batch of 32 x 64 tokens; `tiny` is the `tiny` preset
(D=192, 4 layers, 8 experts of width 384) on 8 x 256 tokens.

    python -m benchmarks.migu                 # both shapes, rmoe model
    python -m benchmarks.migu --shape demo --threads 1 --repeats 12
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import base_parser, machine, md_table, parse_args, setup, sync, write_results
from benchmarks.step import StepShape
from benchmarks.step import build_rmoe as build_step_model
from rmoe.continual.migu import MIGU, RandomMask


@dataclass(frozen=True)
class Shape(StepShape):
    """The step suite's shape plus the recurrent router's state size P."""

    router_dim: int = 32


SHAPES = {
    "demo": Shape(64, 2, 4, 8, 2, 96, 32, 64, router_dim=16),
    "tiny": Shape(192, 4, 4, 8, 2, 384, 8, 256, router_dim=32),
}
QUICK = Shape(32, 2, 2, 4, 2, 32, 2, 16, router_dim=8)
TARGET = 1.15


def build_rmoe(s: Shape) -> nn.Module:
    """RMoEForCausalLM of shape `s` with the recurrent (GRU) router (as the step suite builds)."""
    return build_step_model(s, "recurrent", s.router_dim)


class _DenseBlock(nn.Module):
    """Pre-norm block: causal attention then a 4x GELU MLP, every projection an nn.Linear."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class DenseLM(nn.Module):
    """A MoE-free LM of the same width and depth (the any-PyTorch-model case)."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.width)
        self.blocks = nn.ModuleList(_DenseBlock(s.width, s.heads) for _ in range(s.layers))
        self.norm = nn.LayerNorm(s.width)
        self.lm_head = nn.Linear(s.width, s.vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        """input_ids [B, T] -> an object with .loss (next-token cross-entropy)."""
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return argparse.Namespace(loss=loss)


def _is_linear(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def arms(model: nn.Module, opt: torch.optim.Optimizer, is_moe: bool) -> dict[str, Any]:
    """name -> zero-argument factory of the masker (None for plain)."""
    out: dict[str, Any] = {"plain": lambda: None}
    if is_moe:
        out["migu linear only"] = lambda: MIGU(model, 0.7, targets=_is_linear)
    out["migu" + (" (linear + experts)" if is_moe else "")] = lambda: MIGU(model, 0.7)
    out["migu + freeze"] = lambda: MIGU(model, 0.7, freeze_masked_rows=True, optimizer=opt)
    out["random mask"] = lambda: RandomMask(model, 0.7, seed=0)
    return out


def measure(
    model: nn.Module,
    ids: torch.Tensor,
    device: torch.device,
    factories: dict[str, Any],
    opt: torch.optim.Optimizer,
    warmup: int,
    repeats: int,
    steps: int,
) -> dict[str, dict[str, list[float]]]:
    """clock ("wall", "cpu") -> arm -> per-round fastest step seconds."""
    model.train()

    def step(masker: Any) -> tuple[float, float]:
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if masker is not None:
            masker.apply_()
        opt.step()
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0

    def run_arm(name: str, n: int) -> list[tuple[float, float]]:
        masker = factories[name]()
        times = [step(masker) for _ in range(n)]
        if masker is not None:
            masker.remove()
        return times

    names = list(factories)
    for name in names:
        run_arm(name, warmup)
    per_round: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times = run_arm(name, steps)
            for i, clock in enumerate(("wall", "cpu")):
                per_round[clock].setdefault(name, []).append(min(t[i] for t in times))
    return per_round


def overheads(per_round: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """arm -> median / min / max over rounds of (arm time / plain time)."""
    base = per_round["plain"]
    out = {}
    for name, ts in per_round.items():
        if name == "plain":
            continue
        r = sorted(b / a for a, b in zip(base, ts, strict=True))
        out[name] = {"median": statistics.median(r), "min": r[0], "max": r[-1]}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write migu.json / migu.md under --out."""
    args = parse(argv)
    device, dtype = setup(args)
    names = ["quick"] if args.quick else (list(SHAPES) if args.shape == "all" else [args.shape])
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats or (2 if args.quick else 10)
    steps = 1 if args.quick else args.steps
    info = machine(device)
    results = []
    for shape_name in names:
        s = QUICK if shape_name == "quick" else SHAPES[shape_name]
        torch.manual_seed(args.seed)
        is_moe = args.model == "rmoe"
        model = (build_rmoe(s) if is_moe else DenseLM(s)).to(device=device, dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        ids = torch.randint(0, s.vocab, (s.batch, s.seq), device=device)
        factories = arms(model, opt, is_moe)
        covered = {}
        for name, factory in factories.items():
            masker = factory()
            if masker is not None:
                covered[name] = len(masker.covered)
                masker.remove()
        per_round = measure(model, ids, device, factories, opt, warmup, repeats, steps)
        results.append(
            {
                "shape_name": shape_name,
                "shape": asdict(s),
                "model": args.model,
                "covered_weights": covered,
                "step_seconds_median": {
                    c: {n: statistics.median(v) for n, v in pr.items()}
                    for c, pr in per_round.items()
                },
                "step_seconds_per_round": per_round,
                "overhead_vs_plain": {c: overheads(pr) for c, pr in per_round.items()},
            }
        )
    payload = {
        "machine": info,
        "settings": {
            "dtype": str(dtype),
            "warmup_steps_per_arm": warmup,
            "rounds": repeats,
            "steps_per_round": steps,
            "ratio": 0.7,
            "norm": "l1",
            "optimizer": "AdamW(lr=1e-4, weight_decay=0)",
            "target_max_ratio": TARGET,
        },
        "results": results,
    }
    path = write_results("migu", args, payload, markdown(results, dtype))
    print(f"migu: wrote {path}")
    print(path.with_suffix(".md").read_text())
    return 0


def markdown(results: list[dict[str, Any]], dtype: torch.dtype) -> str:
    """One table per shape: step time and overhead per arm, wall and CPU clocks."""
    parts = []
    for res in results:
        s = Shape(**res["shape"])
        head = (
            f"### {res['shape_name']}: {res['model']} D={s.width}, {s.layers} layers, "
            f"E={s.experts}, k={s.top_k}, F={s.expert_width}, batch {s.batch} x seq {s.seq}, "
            f"{str(dtype).replace('torch.', '')}\n\n"
        )
        rows = []
        for name, wall in res["step_seconds_median"]["wall"].items():
            cells = [name, str(res["covered_weights"].get(name, "")), f"{wall * 1e3:.1f}"]
            for clock in ("wall", "cpu"):
                o = res["overhead_vs_plain"][clock].get(name)
                if o is None:
                    cells.append("1")
                else:
                    ok = "✓" if o["median"] <= TARGET else "✗"
                    cells.append(f"{o['median']:.3f} ({o['min']:.3f}–{o['max']:.3f}) {ok}")
            rows.append(cells)
        headers = [
            "arm",
            "covered weights",
            "ms/step (wall, median)",
            "× plain, wall",
            "× plain, CPU",
        ]
        parts.append(head + md_table(headers, rows))
    note = (
        f"\n\nTarget: × plain ≤ {TARGET} (median of per-round paired ratios, min–max in brackets)."
    )
    return "\n\n".join(parts) + note


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser("migu", __doc__.splitlines()[0])
    p.add_argument("--shape", default="all", choices=[*SHAPES, "all"])
    p.add_argument("--model", default="rmoe", choices=["rmoe", "dense"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm per round")
    return parse_args(p, argv)


if __name__ == "__main__":
    raise SystemExit(main())
