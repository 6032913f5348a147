"""Routing baselines in training (issue 12): the aux-loss-free expert bias moves once per
optimizer step from the step's loads (summed over accumulation, all-reduced over processes),
never through the optimizer, and survives resume and save/load; the global-batch balance loss
is the one-process loss on the global batch; the training log reports drops and bias ranges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_config
from tests.training.router_ddp_worker import AUX_TYPES, one_step

from rmoe import RMoEForCausalLM
from rmoe.data import build_tokenizer
from rmoe.data.examples import Example
from rmoe.loading import load_model
from rmoe.modeling.balancing import GlobalBalance, bias_routers
from rmoe.training import latest_checkpoint, train
from rmoe.training.optim import adamw
from rmoe.training.sft import SFTConfig, finetune
from rmoe.training.step import accumulate_gradients, apply_update, attach_router_step

BIAS = dict(router_type="linear", router_expert_bias=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and steady when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**kw) -> RMoEForCausalLM:
    torch.manual_seed(0)
    return RMoEForCausalLM(tiny_config(**{**BIAS, **kw})).train()


def _windows(n: int, t: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 258, (n, t + 1), generator=g)


def _xy(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return d[:, :-1], d[:, 1:]


def _biases(model) -> list[torch.Tensor]:
    return [r.expert_bias.clone() for r in bias_routers(model)]


# ---------------------------------------------------------------------------------------------
# the update rule and when it runs
# ---------------------------------------------------------------------------------------------
def test_bias_update_is_plus_minus_rate_from_hand_counts():
    model = _model(router_bias_update_rate=0.25)  # a power of two: the update is exact
    opt = adamw(model, lr=1e-2, weight_decay=0.0)
    first, second, third = bias_routers(model)
    first.record_load(torch.tensor([[0, 1]]))  # recorded before the hook: discarded
    attach_router_step(model, opt)
    # loads [2, 1, 1, 0], mean 1: expert 0 over (-), 1 and 2 at the mean (0), 3 under (+)
    first.record_load(torch.tensor([[0, 1], [0, 2]]))
    # loads [3, 2, 1, 0] over two micro-batches (padding ignored), mean 1.5
    second.record_load(torch.tensor([[0, 1], [0, 2]]))
    second.record_load(torch.tensor([[0, 1], [3, 3]]), token_mask=torch.tensor([True, False]))
    opt.step()  # no gradients: only the pre-hook acts
    assert torch.equal(first.expert_bias, torch.tensor([-0.25, 0.0, 0.0, 0.25]))
    assert torch.equal(second.expert_bias, torch.tensor([-0.25, -0.25, 0.25, 0.25]))
    assert torch.equal(third.expert_bias, torch.zeros(4))  # no load recorded: load == mean
    opt.step()  # nothing recorded since the last step: no change
    assert torch.equal(first.expert_bias, torch.tensor([-0.25, 0.0, 0.0, 0.25]))


def test_accumulation_gives_the_big_batch_bias_and_global_counts():
    """4 micro-batches of 1 window == 1 batch of 4 windows: the same expert biases after each
    optimizer step and, after the last micro-batch, the same global-balance counts."""
    kw = dict(router_score_func="sigmoid", router_aux_loss_type="global",
              router_bias_update_rate=0.05)  # fmt: skip
    acc, big = _model(**kw), _model(**kw)
    opts = [adamw(m, lr=1e-3, weight_decay=0.1) for m in (acc, big)]
    for m, o in zip((acc, big), opts):
        attach_router_step(m, o)
    for step in range(2):
        data = _windows(4, seed=step)
        accumulate_gradients(acc, acc.config, iter([_xy(d[None]) for d in data]), 4)
        accumulate_gradients(big, big.config, iter([_xy(data)]), 1)
        gb_acc = [m for m in acc.modules() if isinstance(m, GlobalBalance)]
        gb_big = [m for m in big.modules() if isinstance(m, GlobalBalance)]
        assert len(gb_acc) == 3
        for a, b in zip(gb_acc, gb_big):
            assert torch.equal(a.step_counts, b.step_counts)
            assert a.step_counts.sum() == 4 * 8 * 2  # windows x positions x top-k
        for m, o in zip((acc, big), opts):
            apply_update(o, None, m.parameters())
        assert all(g.step_counts is None for g in gb_acc)  # reset by the step's hook
        for a, b in zip(_biases(acc), _biases(big)):
            assert torch.equal(a, b)
    moved = torch.cat(_biases(acc))
    assert moved.abs().max() > 0
    # two sign updates of 0.05: every entry is one of -0.1, -0.05, 0, 0.05, 0.1
    assert torch.allclose(moved / 0.05, (moved / 0.05).round(), atol=1e-5)


def test_optimizer_and_weight_decay_never_touch_the_bias():
    model = _model(router_bias_update_rate=0.0)
    biases = [r.expert_bias for r in bias_routers(model)]
    params = {id(p) for p in model.parameters()}
    assert biases and not any(id(b) in params for b in biases)
    assert all(not b.requires_grad for b in biases)
    assert sum(".expert_bias" in k for k in model.state_dict()) == 3  # a saved buffer
    opt = adamw(model, lr=1e-2, weight_decay=0.5)
    assert not any(id(b) in {id(p) for g in opt.param_groups for p in g["params"]} for b in biases)
    attach_router_step(model, opt)
    for step in range(3):
        accumulate_gradients(model, model.config, iter([_xy(_windows(2, seed=step))]), 1)
        apply_update(opt, None, model.parameters())
    assert all(torch.equal(b, torch.zeros(4)) for b in biases)  # exactly zero


# ---------------------------------------------------------------------------------------------
# data parallelism: 2 gloo processes vs one process on the same global batch
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_step(tmp_path_factory):
    """Run router_ddp_worker.py as 2 gloo ranks; {aux type: rank 0's step result}."""
    tmp = tmp_path_factory.mktemp("ddp")
    worker = Path(__file__).with_name("router_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp / "rendezvous"), str(tmp / "out.pt")]
    procs = [
        subprocess.Popen([sys.executable, str(worker), str(r), *args], env=env) for r in range(2)
    ]
    codes = [p.wait(timeout=240) for p in procs]
    assert codes == [0, 0]
    return torch.load(tmp / "out.pt", weights_only=True)


@pytest.mark.slow
def test_two_processes_give_the_one_process_bias_and_global_loss(two_process_step):
    for aux in AUX_TYPES:  # the biases: loads all-reduced over ranks, whatever the loss
        one = one_step(aux)
        for a, b in zip(one["biases"], two_process_step[aux]["biases"]):
            assert torch.equal(a, b), aux
        assert torch.cat(one["biases"]).abs().max() > 0
    one, two = one_step("global"), two_process_step["global"]
    for key in ("loss", "lm_loss", "aux_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7), key
    assert set(one["grads"]) == set(two["grads"])
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    # the per-micro-batch Switch loss is nonlinear in (f, P) per process: it does not match
    one, two = one_step("switch"), two_process_step["switch"]
    assert two["lm_loss"] == pytest.approx(one["lm_loss"], rel=1e-6)
    assert abs(two["aux_loss"] - one["aux_loss"]) > 1e-4
    router = [n for n in one["grads"] if ".router." in n]
    assert router and any(
        not torch.allclose(two["grads"][n], one["grads"][n], rtol=1e-3, atol=1e-6) for n in router
    )


# ---------------------------------------------------------------------------------------------
# the trainer: metrics, resume, save/load; fine-tuning
# ---------------------------------------------------------------------------------------------
BASELINE = dict(router_score_func="sigmoid", router_expert_bias=True, capacity_factor=1.0,
                router_bias_update_rate=0.01, router_aux_loss_type="sequence")  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_trainer_runs_sigmoid_bias_capacity_and_logs_drops_and_bias_range(micro_cfg, tmp_path):
    res = train(
        micro_cfg(model=BASELINE, train=dict(max_steps=4)), tmp_path / "run", progress=False
    )
    assert res.status == "completed" and res.step == 4
    assert all(torch.isfinite(torch.tensor(res.losses)))
    recs = _records(tmp_path / "run")
    assert len(recs) == 4
    for rec in recs:
        for key in ("load_cv", "max_violation", "entropy", "aux", "dropped", "bias_range"):
            assert len(rec[f"layer_{key}"]) == 2, key
        assert all(0.0 <= d < 1.0 for d in rec["layer_dropped"])
    assert max(max(r["layer_dropped"]) for r in recs) > 0  # capacity 1.0 drops something
    # step 1 routes with zero biases; after s updates of +-0.01 the range is at most 0.02 s
    assert recs[0]["layer_bias_range"] == [0.0, 0.0]
    for s, rec in enumerate(recs):
        assert all(0.0 <= b <= 0.02 * s + 1e-7 for b in rec["layer_bias_range"])
    assert max(max(r["layer_bias_range"]) for r in recs) > 0


def test_resume_restores_the_bias_bit_exactly_and_loaders_keep_it(micro_cfg, tmp_path):
    # a linear router and a small rate: the biases drift instead of flipping sign every step
    # (the recurrent router's near-flat initial scores would make +-0.01 dominate them)
    model = {**BASELINE, "router_type": "linear", "router_bias_update_rate": 0.001}
    cfg = micro_cfg(model=model, train=dict(max_steps=6, save_interval=2))
    full = train(cfg, tmp_path / "full", progress=False)

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    part = train(cfg, tmp_path / "part", progress=False, on_step=interrupt)
    assert part.status == "interrupted" and latest_checkpoint(tmp_path / "part").name.endswith("3")
    rest = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert part.losses + rest.losses == full.losses
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "model.safetensors"))
    keys = [k for k in wa if k.endswith(".expert_bias")]
    assert len(keys) == 2 and all(wa[k].dtype == torch.float32 for k in keys)
    assert any(wa[k].abs().max() > 0 for k in keys)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    state = load_model(tmp_path / "full", device="cpu").model.state_dict()
    back = RMoEForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    for k in keys:
        assert torch.equal(state[k], wa[k]) and torch.equal(back[k], wa[k]), k


def test_save_pretrained_and_from_pretrained_keep_the_bias(tmp_path):
    model = _model()
    for r in bias_routers(model):
        r.expert_bias.copy_(torch.randn(4) * 1e-3)
    model.save_pretrained(tmp_path / "m")
    back = RMoEForCausalLM.from_pretrained(tmp_path / "m")
    for a, b in zip(_biases(model), _biases(back)):
        assert torch.equal(a, b)


def test_loading_in_bfloat16_keeps_the_bias_float32_and_exact(tmp_path):
    model = _model()
    for r in bias_routers(model):
        r.expert_bias.copy_(torch.tensor([2e-3, -1e-9, 1e-4, 0.3]))
    model.save_pretrained(tmp_path / "m")
    back = RMoEForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    loaded = load_model(tmp_path / "m", device="cpu", dtype="bfloat16", missing_tokenizer="bytes")
    for m in (back, loaded.model):
        assert m.lm_head.weight.dtype == torch.bfloat16
        for a, b in zip(_biases(model), _biases(m)):
            assert b.dtype == torch.float32 and torch.equal(a, b)


def _examples() -> list[Example]:
    return [Example(f"q{i} ->", f" a{i}") for i in range(6)]


@pytest.mark.parametrize("freeze", [False, True])
def test_finetune_updates_the_bias_per_step_unless_the_router_is_frozen(freeze):
    model = _model(router_bias_update_rate=0.125, router_aux_loss_type="global")
    cfg = SFTConfig(steps=2, batch_size=3, max_len=16, generate=False, device="cpu",
                    freeze_router=freeze)  # fmt: skip
    finetune(model, build_tokenizer("bytes"), _examples(), None, cfg)
    biases = torch.cat(_biases(model))
    if freeze:
        assert torch.equal(biases, torch.zeros_like(biases))
    else:  # two steps of +-0.125 each
        assert biases.abs().max() > 0
        assert set((biases / 0.125).tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    assert all(r.take_load().sum() == 0 for r in bias_routers(model))  # closed by the last step
    assert all(m.step_counts is None for m in model.modules() if isinstance(m, GlobalBalance))


def test_progress_bar_shows_the_dropped_share_only_when_something_was_dropped():
    from rmoe.training.step import StepRecord
    from rmoe.training.trainer import progress_postfix

    logged = {"tokens_per_s": 1234.0}
    rec = StepRecord(loss=2.0, lm_loss=2.0, aux_loss=1.0, z_loss=0.0)
    assert progress_postfix(rec, logged) == {"loss": "2.0000", "tok_s": "1,234"}
    rec.routing = {"dropped": [0.0, 0.0]}
    assert "drop" not in progress_postfix(rec, logged)
    rec.routing = {"dropped": [0.01, 0.125]}
    assert progress_postfix(rec, logged)["drop"] == "12.5%"
