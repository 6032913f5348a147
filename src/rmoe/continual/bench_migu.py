"""Time a training step with and without MIGU (``python -m rmoe.continual.bench_migu``).

The model is a small MoE-free pre-norm transformer (attention + GELU MLP, every projection an
``nn.Linear``); a step is forward, backward, optional ``MIGU.apply_``, AdamW step, zero_grad.
The arms run interleaved in rounds (A B [C] A B [C] ...) on one model and one optimizer: before
an arm's steps its ``MIGU`` is constructed (hooks attached), after them it is removed, both
outside the timed region. Sharing the model keeps memory placement identical across arms
(separate deep copies differed by up to ~4% between two plain copies on a 2-core VM), and the
interleaving spreads machine drift over every arm.

A round's time for an arm is the fastest of its ``steps`` steps (the minimum is the estimate
least disturbed by other processes on a shared machine). The overhead is the median over rounds
of the per-round ratio to ``plain``, with its min and max over rounds, for wall-clock time and
for process CPU time (``time.process_time``, less sensitive to other processes competing for the
cores). The load average is recorded too. Result: a JSON dict (printed by :func:`main`,
optionally written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rmoe.continual.migu import MIGU


class _Block(nn.Module):
    """Pre-norm block: causal self-attention then a 4x GELU MLP; x [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, 4 * d_model, bias=False)
        self.down = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class _TinyLM(nn.Module):
    """tokens [B, T] -> logits [B, T, V]."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(
    *,
    d_model: int = 256,
    n_layers: int = 4,
    n_heads: int = 4,
    vocab: int = 512,
    batch: int = 4,
    seq: int = 128,
    rounds: int = 10,
    steps: int = 3,
    warmup: int = 2,
    freeze: bool = True,
    seed: int = 0,
) -> dict[str, object]:
    """Benchmark the arms ``plain``, ``migu`` (and ``migu+freeze``); return a JSON-ready dict.

    Each round times ``steps`` training steps per arm, in arm order; an arm's time in a round
    is the minimum over its steps.
    """
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be >= 1, got rounds={rounds}, steps={steps}")
    torch.manual_seed(seed)
    model = _TinyLM(vocab, d_model, n_layers, n_heads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    names = ["plain", "migu"] + (["migu+freeze"] if freeze else [])
    covered = len(MIGU(model).covered)

    def attach(name: str) -> MIGU | None:
        if name == "plain":
            return None
        return MIGU(model, ratio=0.7, freeze_masked_rows=name == "migu+freeze", optimizer=opt)

    def step(migu: MIGU | None) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))
        loss.backward()
        if migu is not None:
            migu.apply_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - start_cpu

    def run_arm(name: str, n: int) -> list[tuple[float, float]]:
        migu = attach(name)
        times = [step(migu) for _ in range(n)]
        if migu is not None:
            migu.remove()
        return times

    for name in names:
        run_arm(name, warmup)

    clocks = ("wall", "cpu")
    per_round = {c: {name: [] for name in names} for c in clocks}
    for _ in range(rounds):
        for name in names:
            times = run_arm(name, steps)
            for i, clock in enumerate(clocks):
                per_round[clock][name].append(min(t[i] for t in times))

    result: dict[str, object] = {
        "benchmark": "migu_overhead",
        "config": {
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "vocab": vocab,
            "batch": batch,
            "seq": seq,
            "rounds": rounds,
            "steps_per_round": steps,
            "warmup": warmup,
            "ratio": 0.7,
            "norm": "l1",
            "optimizer": "AdamW(lr=1e-3, weight_decay=0.1)",
            "covered_linears": covered,
        },
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "step_seconds_median_of_round_minima": {
            c: {n: statistics.median(v) for n, v in per_round[c].items()} for c in clocks
        },
        "step_seconds_per_round": per_round,
    }
    overhead: dict[str, dict[str, dict[str, float]]] = {c: {} for c in clocks}
    for clock in clocks:
        base_times = per_round[clock]["plain"]
        for name in names[1:]:
            ratios = [b / a for a, b in zip(base_times, per_round[clock][name], strict=True)]
            overhead[clock][name] = {
                "median": statistics.median(ratios) - 1.0,
                "min": min(ratios) - 1.0,
                "max": max(ratios) - 1.0,
            }
    result["overhead_vs_plain"] = overhead
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the benchmark, print the JSON, optionally save it with ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-freeze", action="store_true", help="skip the migu+freeze arm")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(
        d_model=args.d_model,
        n_layers=args.layers,
        batch=args.batch,
        seq=args.seq,
        rounds=args.rounds,
        steps=args.steps,
        freeze=not args.no_freeze,
    )
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
