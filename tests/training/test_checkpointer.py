"""The checkpointer and the metrics writer on their own."""

from __future__ import annotations

import json

import torch

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.data import WindowSampler, build_tokenizer
from rmoe.training.checkpoint import Checkpointer, latest_checkpoint, list_checkpoints, load_state
from rmoe.training.metrics import MetricsWriter


def _parts(tmp_path):
    torch.manual_seed(0)
    model = RMoEForCausalLM(
        RMoEConfig(vocab_size=258, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                   router_dim=8, max_position_embeddings=32)
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sampler = WindowSampler(1000, 16, 2, seed=3)
    ck = Checkpointer(tmp_path, model, opt, sched, sampler, build_tokenizer("bytes"),
                      {"train": {"seed": 3}}, keep_last=2)  # fmt: skip
    return model, opt, sched, sampler, ck


def test_checkpointer_round_trip_and_pruning(tmp_path):
    model, opt, sched, sampler, ck = _parts(tmp_path)
    model(torch.randint(0, 258, (1, 8)), labels=torch.randint(0, 258, (1, 8))).loss.backward()
    opt.step()
    sched.step()
    next(sampler)
    for step in (1, 2, 3):
        path = ck.save(step)
        assert path is not None and path.name == f"step-{step:07d}"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000003"]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    state = load_state(latest_checkpoint(tmp_path))
    assert state["config"] == {"train": {"seed": 3}} and state["step"] == 3
    expected_next = next(sampler)
    _, opt2, sched2, sampler2, ck2 = _parts(tmp_path)
    assert ck2.restore(state) == 3
    assert sched2.last_epoch == sched.last_epoch
    assert torch.equal(torch.as_tensor(next(sampler2)), torch.as_tensor(expected_next))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(
        torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1
    )


def test_checkpointer_non_main_writes_nothing(tmp_path):
    *_, ck = _parts(tmp_path)
    ck.is_main = False
    assert ck.save(1) is None
    assert not (tmp_path / "checkpoints").exists()


def test_metrics_writer_appends_flushed_records(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write({"step": 1, "loss": 2.5, "layer_cv": [0.1, 0.2]})
        # flushed per record: readable before close
        assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write({"step": 2, "loss": 2.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    off = MetricsWriter(tmp_path / "other", enabled=False)
    off.write({"step": 1})
    off.close()
    assert not (tmp_path / "other").exists()
