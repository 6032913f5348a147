"""2-process DDP and FSDP on CPU (gloo) match the 1-process run with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file


def _torchrun(args, env, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), "-m", "rmoe.cli.main", *args]
    subprocess.run(cmd, check=True, env=env, timeout=300)


def _lm_losses(d):
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return [r["lm_loss"] for r in recs if "lm_loss" in r]


@pytest.mark.slow
def test_ddp_and_fsdp_two_processes_match_single_process(micro_cfg, tmp_path):
    # The Switch balance loss is computed per process (nonlinear in f and P), so with it on the
    # runs differ by design; without it DDP/FSDP must reproduce the 1-process run to rounding.
    cfg = micro_cfg(
        model=dict(router_aux_loss_coef=0.0),
        optim=dict(schedule="constant", warmup_steps=0),
        train=dict(max_steps=4, log_interval=1, eval_batches=1, save_interval=2),
    )
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RMOE_DEBUG": "1"}
    base = ["train", str(cfg_path), "--no-progress"]
    subprocess.run(
        [sys.executable, "-m", "rmoe.cli.main", *base, "--out", str(tmp_path / "one")],
        check=True,
        env=env,
        timeout=300,
    )
    _torchrun([*base, "--out", str(tmp_path / "ddp")], env, 29517)
    # FSDP: 2 steps, then resume to 4 (checkpoints gather the sharded states)
    _torchrun(
        [
            *base,
            "--out",
            str(tmp_path / "fsdp"),
            "--set",
            "train.fsdp=true",
            "--set",
            "train.max_steps=2",
        ],
        env,
        29518,
    )
    _torchrun(
        [*base, "--out", str(tmp_path / "fsdp"), "--set", "train.fsdp=true", "--resume"], env, 29519
    )

    one = _lm_losses(tmp_path / "one")
    assert len(one) == 4
    wa = load_file(str(tmp_path / "one" / "model.safetensors"))
    for name in ("ddp", "fsdp"):
        other = _lm_losses(tmp_path / name)
        assert len(other) == 4, name
        for a, b in zip(one, other):
            assert abs(a - b) < 1e-5, name
        wb = load_file(str(tmp_path / name / "model.safetensors"))
        assert set(wa) == set(wb)
        for k in wa:
            # atol 1e-5: Adam's m / sqrt(v) amplifies the all-reduce's float32 rounding on
            # elements whose gradient is near zero (seen: 1 of 4096 elements off by 5e-6)
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
