"""rmoe models in the transformers Trainer: routing logged, eval loss = LM loss, biases move."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import tiny_config
from transformers import Trainer, TrainingArguments

from rmoe import RMoEForCausalLM
from rmoe.integrations.trainer import RMoETrainer, RoutingMeter


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 16, same: bool = False) -> None:
        g = torch.Generator().manual_seed(1)
        base = torch.randint(0, 256, (n, seq), generator=g)
        self.rows = base[:1].expand(n, seq).clone() if same else base

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        logging_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _train_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def test_trainer_logs_router_losses_and_per_layer_routing(tmp_path):
    model = RMoEForCausalLM(tiny_config(router_type="recurrent"))
    trainer = RMoETrainer(model=model, args=_args(tmp_path), train_dataset=_Rows(16))
    trainer.train()
    logs = _train_logs(trainer)
    assert [h["step"] for h in logs] == [2, 4]
    n_moe = model.config.num_hidden_layers
    for h in logs:
        for key in ("lm_loss", "aux_loss", "z_loss"):
            assert math.isfinite(h[key])
        # the Trainer's loss is the LM loss plus the scaled balance loss (same micro-batches)
        expect = h["lm_loss"] + model.config.router_aux_loss_coef * h["aux_loss"]
        assert h["loss"] == pytest.approx(expect, abs=1e-3)
        for i in range(n_moe):
            assert 0.0 <= h[f"layer_entropy/layer{i}"] <= 1.0
            assert h[f"layer_load_cv/layer{i}"] >= 0.0
            assert f"layer_logit_std/layer{i}" in h
        assert f"layer_entropy/layer{n_moe}" not in h
        assert not any(k.startswith("layer_bias_range") for k in h)


def test_eval_loss_is_the_lm_loss(tmp_path):
    model = RMoEForCausalLM(tiny_config(router_aux_loss_coef=0.5))
    data = _Rows(8)
    trainer = RMoETrainer(model=model, args=_args(tmp_path), eval_dataset=data)
    metrics = trainer.evaluate()
    model.eval()
    ids = data.rows
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0  # computed, but not added
    assert torch.equal(out.loss, out.lm_loss)
    assert metrics["eval_loss"] == pytest.approx(out.lm_loss.item(), rel=1e-5)
    model.train()
    out_train = model(input_ids=ids, labels=ids)
    assert out_train.loss.item() == pytest.approx(
        out_train.lm_loss.item() + 0.5 * out_train.aux_loss.item(), rel=1e-6
    )


@pytest.mark.parametrize("trainer_cls", [Trainer, RMoETrainer])
def test_gradient_accumulation_loss_is_a_mean(tmp_path, trainer_cls):
    # every row the same: the first step's logged loss is the model's loss on that row at init,
    # whatever the accumulation (it was accumulation x larger when the Trainer believed the
    # model normalised by num_items_in_batch)
    torch.manual_seed(0)
    model = RMoEForCausalLM(tiny_config())
    data = _Rows(8, same=True)
    model.train()
    with torch.no_grad():
        expected = model(input_ids=data.rows[:2], labels=data.rows[:2]).loss.item()
    args = _args(tmp_path, max_steps=1, logging_steps=1, gradient_accumulation_steps=2)
    trainer = trainer_cls(model=model, args=args, train_dataset=data)
    trainer.train()
    assert _train_logs(trainer)[0]["loss"] == pytest.approx(expected, rel=1e-4)


def test_expert_bias_moves_once_per_optimizer_step(tmp_path):
    cfg = tiny_config(
        router_type="linear",
        router_score_func="sigmoid",
        router_expert_bias=True,
        router_bias_update_rate=0.01,
    )
    model = RMoEForCausalLM(cfg)
    args = _args(tmp_path, max_steps=3, logging_steps=1, gradient_accumulation_steps=2)
    trainer = RMoETrainer(model=model, args=args, train_dataset=_Rows(16))
    trainer.train()
    bias = model.model.layers[0].moe.router.expert_bias
    # sign updates of 0.01 per optimizer step: after 3 steps every entry is a multiple of 0.01
    # no larger than 0.03 in magnitude, and some moved
    assert 0 < bias.abs().max().item() <= 0.03 + 1e-6
    steps = bias / 0.01
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    logs = _train_logs(trainer)
    assert all("layer_bias_range/layer0" in h for h in logs)
    assert logs[-1]["layer_bias_range/layer0"] > 0


def test_plain_trainer_leaves_expert_bias_untouched(tmp_path):
    cfg = tiny_config(router_type="linear", router_score_func="sigmoid", router_expert_bias=True)
    model = RMoEForCausalLM(cfg)
    args = _args(tmp_path, max_steps=2, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=_Rows(8)).train()
    assert torch.count_nonzero(model.model.layers[0].moe.router.expert_bias) == 0


def test_routing_meter_means_and_flattening():
    meter = RoutingMeter()
    meter.add({"lm_loss": torch.tensor(1.0), "aux_loss": torch.tensor(2.0), "z_loss": None})
    meter.add({"lm_loss": torch.tensor(3.0), "aux_loss": torch.tensor(4.0), "z_loss": None})
    meter.set_routing({"load_cv": [0.1, 0.2]})
    out = meter.pop()
    assert out == {
        "lm_loss": 2.0,
        "aux_loss": 3.0,
        "layer_load_cv/layer0": 0.1,
        "layer_load_cv/layer1": 0.2,
    }
    assert meter.pop() == {}
