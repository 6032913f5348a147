"""Soak test of exact resume: kill a tiny run N times at random moments, resume it each time,
and compare the final model and the loss log with an uninterrupted run.

    python -m benchmarks.soak --kills 15 --seed 0 --out benchmarks/out/soak

Each attempt is a real ``python -m rmoe.cli.main train`` process, SIGKILLed at a random moment
after it has started stepping (while it steps, evaluates or writes a checkpoint), then continued
with ``--resume`` (or started afresh when no checkpoint exists yet). After every kill the run's
checkpoints are verified against their manifests and each one is compared with the same step of
the uninterrupted run; a resume counts as exact when every loss it logged equals the
uninterrupted run's at that step. Writes ``OUT/soak.json``; not part of ``make test``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.path[0].endswith("benchmarks"):
    sys.path.pop(0)  # run as a script: benchmarks/profile.py must not shadow the stdlib's

import argparse
import json
import os
import pydoc_data.topics
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def tiny_config(out: Path, steps: int, save_interval: int) -> Path:
    """A tiny CPU run as a YAML file (one thread, checkpoints every `save_interval` steps)."""
    corpus = out / "topics.txt"
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    corpus.write_text(text[:100_000])
    cfg = {
        "model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      router_type="recurrent", router_dim=8),
        "data": dict(corpus=f"text:{corpus}", seq_len=32, batch_size=4,
                     cache_dir=str(out / "cache")),
        "optim": dict(lr=3e-3, warmup_steps=2, schedule="cosine"),
        "train": dict(max_steps=steps, save_interval=save_interval, keep_last=10_000,
                      log_interval=1, eval_interval=max(steps // 4, 1), eval_batches=1,
                      seed=0, threads=1, device="cpu"),
    }  # fmt: skip
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(cfg: Path, run: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "rmoe.cli.main", "train", str(cfg), "--out", str(run)]
    return cmd + ["--no-progress"] + (["--resume"] if resume else [])


def losses(run: Path) -> dict[int, float]:
    """{step: loss}, the last record of a step winning (a resume may replay steps)."""
    path = run / "metrics.jsonl"
    out: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            if "loss" in rec and "step" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def n_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def attempt(cfg: Path, run: Path, rng: random.Random, step_s: float, log) -> dict:
    """One process: start (resume when a checkpoint exists), kill it at a random moment."""
    from rmoe.training.checkpoint import latest_checkpoint

    resume = latest_checkpoint(run) is not None
    left = stale(run) if run.exists() else []  # what the previous kill left inside a save
    if not resume and run.exists():
        shutil.rmtree(run)  # killed before its first checkpoint: start again
    start_lines = n_logged(run)
    proc = subprocess.Popen(train_cmd(cfg, run, resume), stdout=log, stderr=log)
    while proc.poll() is None and n_logged(run) <= start_lines:
        time.sleep(0.02)  # wait until it steps (imports take seconds)
    delay = rng.uniform(0.0, 12 * step_s)
    deadline = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    return {"resume": resume, "stale_before": len(left), "killed": killed,
            "delay_s": round(delay, 3), "rc": rc, "stale_after": len(stale(run))}  # fmt: skip


def stale(run: Path) -> list[str]:
    """Temporaries of an interrupted save: checkpoints/.tmp-step-* and RUN/.<name>.tmp."""
    found = [*(run / "checkpoints").glob(".tmp-step-*"), *run.glob(".*.tmp")]
    return sorted(p.name for p in found)


def check_after(run: Path, base: Path, base_losses: dict[int, float]) -> dict:
    """Checkpoints intact and equal to the uninterrupted run's; logged losses equal."""
    from rmoe.training.integrity import checkpoint_dirs, verify_dir

    ckpts = checkpoint_dirs(run)
    intact = [c for c in ckpts if verify_dir(c, use_cache=False).ok]
    equal = [c for c in intact if same_weights(c, base / "checkpoints" / c.name)]
    got = losses(run)
    bad_steps = sorted(s for s, v in got.items() if base_losses.get(s) != v)
    return {"checkpoints": len(ckpts), "intact": len(intact), "equal_to_uninterrupted":
            len(equal), "steps_logged": len(got), "loss_mismatch_steps": bad_steps}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs to inflict (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--out", default="benchmarks/out/soak", help="work and result folder")
    p.add_argument("--steps", type=int, default=200, help="steps of the tiny run (default 200)")
    p.add_argument("--save-interval", type=int, default=3, help="steps between checkpoints")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = tiny_config(out, args.steps, args.save_interval)
    log = open(out / "train.log", "w")
    base, run = out / "uninterrupted", out / "soaked"
    t0 = time.perf_counter()
    subprocess.run(train_cmd(cfg, base, False), stdout=log, stderr=log, check=True)
    base_s = time.perf_counter() - t0
    base_losses = losses(base)
    recs = [json.loads(x) for x in (base / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if "loss" in r and "elapsed_s" in r][-1]
    step_s = max(last["elapsed_s"] / max(last["step"], 1), 0.01)
    rng = random.Random(args.seed)
    attempts = []
    kills = 0
    while kills < args.kills:
        a = attempt(cfg, run, rng, step_s, log)
        a.update(check_after(run, base, base_losses))
        attempts.append(a)
        kills += a["killed"]
        print(json.dumps(a), flush=True)
        if not a["killed"]:
            break  # the run finished before the kill
    final = subprocess.run(train_cmd(cfg, run, True), stdout=log, stderr=log).returncode
    exact = sum(not a["loss_mismatch_steps"] for a in attempts if a["resume"])
    result = {
        "kills": kills,
        "attempts": len(attempts) + 1,
        "resumes": sum(a["resume"] for a in attempts) + 1,
        "exact_resumes": exact,
        "step_s": round(step_s, 4),
        "final_rc": final,
        "final_losses_equal": losses(run) == base_losses,
        "final_weights_equal": same_weights(run, base),
        "all_checkpoints_intact": all(a["intact"] == a["checkpoints"] for a in attempts),
        "kills_inside_a_save": sum(a["stale_after"] > 0 for a in attempts),
        "stale_left": stale(run),
        "uninterrupted_s": round(base_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "attempt_log": attempts,
    }
    result["exact_resumes"] += int(result["final_losses_equal"] and result["final_weights_equal"])
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    keys = ("kills", "resumes", "exact_resumes", "final_losses_equal", "final_weights_equal",
            "all_checkpoints_intact", "kills_inside_a_save", "stale_left", "total_s")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}))
    ok = result["final_losses_equal"] and result["final_weights_equal"] and final == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
