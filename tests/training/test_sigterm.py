"""Issue 17: SIGTERM (what SLURM sends before a preemption) stops, saves and exits like Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import yaml
from tests.conftest import micro_raw

from rmoe.training import latest_checkpoint
from rmoe.training.metrics import read_records


def write_config(path, corpus_file, cache_dir, max_steps):
    raw = micro_raw(
        corpus_file, cache_dir, optim={"schedule": "constant"}, train={"max_steps": max_steps}
    )
    path.write_text(yaml.safe_dump(raw))
    return path


def start_trainer(config, out):
    """`rmoe train CONFIG --out OUT` in a subprocess (its own process group)."""
    cmd = [sys.executable, "-m", "rmoe.cli.main", "train", str(config), "--out", str(out),
           "--no-progress"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc, out, n, timeout=120.0):
    """Wait until the trainer has logged `n` step records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = [r for r in read_records(out / "metrics.jsonl") if "loss" in r]
        if len(recs) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("trainer logged no steps in time")


def test_sigterm_saves_a_checkpoint_and_resume_continues(corpus_file, tmp_path):
    config = write_config(tmp_path / "run.yaml", corpus_file, tmp_path / "cache", 100_000)
    out = tmp_path / "run"
    proc = start_trainer(config, out)
    wait_for_steps(proc, out, 3)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # exactly like Ctrl-C
    assert "SIGTERM" in err and "--resume" in err
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    step = int(ckpt.name.split("-")[1])
    assert step >= 3
    assert not (out / ".lock").exists()  # the lock went with the process
    from rmoe.cli.main import main

    again = write_config(tmp_path / "more.yaml", corpus_file, tmp_path / "cache", step + 2)
    assert main(["train", str(again), "--out", str(out), "--resume", "--no-progress"]) == 0
    steps = [r["step"] for r in read_records(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, step + 3))
