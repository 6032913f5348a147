"""Issue 17: a resume continues metrics.jsonl from the checkpoint's step, each step once."""

import pytest

from rmoe.training import latest_checkpoint, train
from rmoe.training.metrics import read_records, truncate_records


def kinds(run_dir):
    """(step, kind) of every record: "train" for a step record, else the eval corpus."""
    return [
        (r["step"], "train" if "loss" in r else r.get("corpus"))
        for r in read_records(run_dir / "metrics.jsonl")
    ]


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_records(run_dir / "metrics.jsonl") if "loss" in r]


def test_resume_after_crash_drops_replayed_steps(micro_cfg, tmp_path):
    cfg = micro_cfg(train=dict(save_interval=4, max_steps=10, eval_interval=5))
    full = tmp_path / "full"
    train(cfg, full, progress=False)

    def crash(step, loss):
        if step == 7:  # steps 5 and 6 are logged but the last checkpoint is step 4
            raise RuntimeError("simulated kill")

    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="simulated kill"):
        train(cfg, part, progress=False, on_step=crash)
    assert latest_checkpoint(part).name == "step-0000004"
    assert [s for s, k in kinds(part) if k == "train"] == [1, 2, 3, 4, 5, 6]
    res = train(cfg, part, resume=True, progress=False)
    assert res.status == "completed" and res.step == 10
    seq = kinds(part)
    assert len(seq) == len(set(seq)), seq  # each step once
    assert seq == kinds(full)
    assert train_losses(part) == train_losses(full)  # the resume is bit-identical on CPU


def test_resume_with_more_steps_and_resume_of_finished_run(micro_cfg, tmp_path):
    out = tmp_path / "run"
    first = train(micro_cfg(train=dict(max_steps=6, eval_interval=5)), out, progress=False)
    assert first.status == "completed"
    cfg = micro_cfg(train=dict(max_steps=10, eval_interval=5))
    train(cfg, out, resume=True, progress=False)
    seq = kinds(out)
    assert len(seq) == len(set(seq)), seq
    assert [s for s, k in seq if k == "train"] == list(range(1, 11))
    before = (out / "metrics.jsonl").read_bytes()
    again = train(cfg, out, resume=True, progress=False)
    assert again.status == "already_finished" and again.step == 10
    assert (out / "metrics.jsonl").read_bytes() == before  # no further evaluation record
    assert {"loss", "bpb"} <= set(again.final_eval)


def test_truncate_records_drops_later_steps_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 2, "x": 1}\n{"step": 4, "lo')
    assert truncate_records(path, 2) == 2  # step 3 and the torn line
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 2, "x": 1}\n'
    assert truncate_records(path, 2) == 0
    assert truncate_records(tmp_path / "missing.jsonl", 2) == 0
