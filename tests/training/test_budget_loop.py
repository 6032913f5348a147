"""`train.time_budget_s` in the loop: the run ends where the budget says, the schedule decays
to that step, and the CLI says how the run ended; SIGTERM stops like Ctrl-C."""

from __future__ import annotations

import pytest

from rmoe.training import load_config, train
from rmoe.training.budget import StepBudget

TINY = [
    "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.moe_intermediate_size=32", "model.router_dim=8", "model.max_position_embeddings=32",
    "data.seq_len=16", "data.batch_size=2", "train.eval_batches=2", "train.log_interval=5",
    "train.eval_interval=0", "train.save_interval=0", "train.threads=1", "train.time_limit_s=0",
    "optim.warmup_steps=2",
]  # fmt: skip


def test_the_budget_moves_the_end_and_the_schedule_decays_to_it(tmp_path, monkeypatch):
    """A planner that always answers 'end at step 12' (the real one is tested on its own):
    the loop stops there, the lr reaches min_lr_ratio at that step, the result says so."""
    monkeypatch.setattr(StepBudget, "plan", lambda self, step, now, end: max(step, 12))
    cfg = load_config("tiny", [*TINY, "train.max_steps=40", "train.time_budget_s=100"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.status == "completed"
    assert result.step == result.end_step == 12
    assert len(result.losses) == 12


def test_without_a_budget_all_steps_run(tmp_path):
    cfg = load_config("tiny", [*TINY, "train.max_steps=6"])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.step == result.end_step == 6


def test_cli_says_how_the_run_ended(tmp_path, capsys, monkeypatch):
    from rmoe.cli.main import main

    monkeypatch.setattr(StepBudget, "plan", lambda self, step, now, end: max(step, 5))
    argv = ["train", "tiny", "--out", str(tmp_path / "r"), "--no-progress"]
    sets = [
        x for kv in [*TINY, "train.max_steps=9", "train.time_budget_s=50"] for x in ("--set", kv)
    ]
    assert main([*argv, *sets]) == 0
    err = capsys.readouterr().err
    assert "step 5 of max_steps 9" in err and "time_budget_s" in err


def test_bad_inputs_give_one_line(tmp_path, capsys):
    from rmoe.cli.main import main

    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert main(["train", "tiny", "--out", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["train", str(empty), "--out", str(tmp_path / "e")]) == 2
    assert "is empty" in capsys.readouterr().err
    long = ["--set", "data.seq_len=512", "--set", "model.max_position_embeddings=256"]
    assert main(["train", "tiny", "--out", str(tmp_path / "s"), *long]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len=512" in err and "max_position_embeddings=256" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_sigterm_stops_like_ctrl_c(tmp_path):
    import os
    import signal

    cfg = load_config("tiny", [*TINY, "train.max_steps=50"])

    def on_step(step: int, loss: float) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(cfg, tmp_path / "run", progress=False, on_step=on_step)
    assert result.status == "interrupted" and result.step == 3
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(
        signal.getsignal(signal.SIGTERM)
    )
    resumed = train(load_config("tiny", [*TINY, "train.max_steps=5"]), tmp_path / "run",
                    resume=True, progress=False)  # fmt: skip
    assert resumed.step == 5


@pytest.mark.parametrize("budget", [0.0, 30.0])
def test_resume_keeps_or_resets_the_horizon(tmp_path, budget):
    cfg = load_config("tiny", [*TINY, "train.max_steps=4", f"train.time_budget_s={budget}"])
    train(cfg, tmp_path / "run", progress=False)
    more = load_config("tiny", [*TINY, "train.max_steps=8", f"train.time_budget_s={budget}"])
    result = train(more, tmp_path / "run", resume=True, progress=False)
    assert result.step == 8 and result.end_step == 8
