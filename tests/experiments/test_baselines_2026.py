"""The shipped `baselines-2026` spec (one arm per router option of issue 12) and arms that
combine a `router:` preset with `set:` keys."""

from __future__ import annotations

import pytest
import torch

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.experiments import format_plan, load_spec, plan_runs, quick_spec, spec_from_dict
from rmoe.experiments.report import write_report
from rmoe.experiments.spec import ROUTER_VARIANTS

_LOSS_FREE = {
    "model.router_score_func": "sigmoid",
    "model.router_expert_bias": True,
    "model.router_aux_loss_coef": 0.0,
}


def _models(runs) -> dict[str, dict]:
    return {r.arm: r.config.model for r in runs if r.seed == 0}


def test_baselines_2026_covers_every_new_option():
    spec = load_spec("baselines-2026")
    runs = plan_runs(spec)
    assert spec.reference == "smoe" and sorted({r.seed for r in runs}) == [0, 1]
    assert len(runs) == 2 * len(spec.arms) and len({r.run_id for r in runs}) == len(runs)
    m = _models(runs)
    base = m["smoe"]
    assert (base["num_hidden_layers"], base["hidden_size"], base["num_experts"]) == (8, 128, 8)
    assert base["router_type"] == "linear" and runs[0].max_steps == 500
    cpu = _models(plan_runs(load_spec("cpu-mechanism")))["smoe"]
    cpu.pop("router_init")  # cpu-mechanism pins the old default for its recorded results
    assert base == cpu  # the cpu-mechanism model and budget
    assert m["shared"]["router_type"] == "shared"
    assert m["rmoe-np-r0.5"]["router_logit_residual"] == 0.5
    assert m["rmoe-np-r0.5"]["router_pass_state"] is False
    assert m["rmoe-np-r1"]["router_logit_residual"] == 1.0
    assert m["rmoe-detach-r"]["router_detach_residual"] is True
    assert m["rmoe-sproj"]["router_share_proj"] is True
    for arm, router in (("smoe-sigmoid", "linear"), ("rmoe-sigmoid", "recurrent")):
        assert (m[arm]["router_type"], m[arm]["router_score_func"]) == (router, "sigmoid")
    for arm, router in (("smoe-lossfree", "linear"), ("rmoe-lossfree", "recurrent")):
        got = {k: m[arm][k.split(".", 1)[1]] for k in _LOSS_FREE}
        assert got == _LOSS_FREE
        assert m[arm]["router_type"] == router
    dsv3 = m["smoe-dsv3"]
    assert dsv3["router_expert_bias"] and dsv3["router_aux_loss_type"] == "sequence"
    assert dsv3["router_aux_loss_coef"] == 1e-4 and dsv3["router_scale"] == 2.5
    assert m["smoe-seq"]["router_aux_loss_type"] == "sequence"
    assert m["smoe-global"]["router_aux_loss_type"] == "global"
    assert (m["smoe-cap1.25"]["capacity_factor"], m["smoe-cap1.25"]["eval_capacity_factor"]) == (
        1.25,
        2.0,
    )
    assert (m["rmoe-normal"]["router_type"], m["rmoe-normal"]["router_init"]) == (
        "recurrent",
        "normal",
    )
    # every new preset has an arm
    presets = {"shared", "recurrent-np-r0.5", "recurrent-np-r1", "recurrent-detach-r"}
    assert presets | {"recurrent-sproj"} <= {a.router for a in spec.arms}


def test_baselines_2026_quick_keeps_the_settings():
    spec = load_spec("baselines-2026")
    q = quick_spec(spec)
    runs = plan_runs(q)
    assert all(r.config.model["hidden_size"] == 32 for r in runs)
    m = _models(runs)
    assert m["smoe-dsv3"]["router_aux_loss_coef"] == 1e-4
    assert m["smoe-cap1.25"]["capacity_factor"] == 1.25
    assert m["rmoe-lossfree"]["router_expert_bias"] is True
    line = next(ln for ln in format_plan(runs) if ln.startswith("smoe-lossfree-"))
    assert "set: model.router_score_func=sigmoid" in line
    assert "model.router_aux_loss_coef=0" in line


def test_any_preset_composes_with_set_keys(spec_dict):
    """Every router variant plus sigmoid + expert bias without aux loss plans, validates and
    builds; `set:` wins over the preset's own keys."""
    spec_dict["reference"] = None
    spec_dict["arms"] = [
        {"name": v, "router": v, "set": dict(_LOSS_FREE)} for v in ROUTER_VARIANTS
    ] + [{"name": "np-passing", "router": "recurrent-np", "set": {"model.router_pass_state": True}}]
    runs = plan_runs(spec_from_dict(spec_dict))
    for r in runs:
        model = r.config.model
        if r.arm == "np-passing":
            assert model["router_pass_state"] is True
            continue
        for key, value in ROUTER_VARIANTS[r.router].items():
            assert model[key] == value, (r.arm, key)
        assert model["router_score_func"] == "sigmoid" and model["router_expert_bias"] is True
        assert r.summary()["settings"] == _LOSS_FREE
        assert r.summary()["preset"] == dict(ROUTER_VARIANTS[r.router])
        built = RMoEForCausalLM(RMoEConfig(**{**model, "vocab_size": 258}))
        assert built.config.router_score_func == "sigmoid"


def test_new_arms_share_the_non_router_init(spec_dict):
    """The seeded init gives every arm of a seed the same non-router weights, also for the arms
    whose router adds a module the model owns (shared router, S-proj) or a bias buffer."""
    spec_dict["reference"] = None
    spec_dict["arms"] = [
        {"name": "smoe", "router": "linear"},
        {"name": "shared", "router": "shared"},
        {"name": "sproj", "router": "recurrent-sproj"},
        {"name": "lossfree", "router": "recurrent", "set": dict(_LOSS_FREE)},
        {"name": "uniform", "router": "recurrent", "set": {"model.router_init": "uniform"}},
    ]
    states = {}
    for r in plan_runs(spec_from_dict(spec_dict)):
        model = RMoEForCausalLM(r.config.model_config(vocab_size=258))
        model.init_weights_seeded(r.seed)
        states[r.arm] = {k: v for k, v in model.state_dict().items() if "router" not in k}
    ref = states.pop("smoe")
    for arm, state in states.items():
        assert state.keys() == ref.keys(), arm
        for k in ref:
            assert torch.equal(state[k], ref[k]), (arm, k)


def test_summary_lists_each_arms_settings(spec_dict, tmp_path):
    spec_dict["arms"].append(
        {"name": "dsv3", "router": "linear", "label": "DSV3", "set": dict(_LOSS_FREE)}
    )
    spec = spec_from_dict(spec_dict)
    write_report(spec, plan_runs(spec), tmp_path)  # nothing trained yet: the plan only
    summary = (tmp_path / "summary.md").read_text()
    assert "## Arms" in summary
    row = next(ln for ln in summary.splitlines() if ln.startswith("| DSV3 |"))
    assert "router_type=linear" in row
    assert "model.router_score_func=sigmoid, model.router_expert_bias=true" in row
    assert "model.router_aux_loss_coef=0" in row


def test_evaluation_reports_max_violation_and_the_dropped_share():
    """`collect_routing` keeps each layer's dropped assignments (eval capacity) and
    `load_summary` turns them and the loads into MaxVio and the dropped share."""
    import numpy as np

    from rmoe.experiments.evaluate import collect_routing, load_summary

    kw = dict(
        vocab_size=258,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        router_type="linear",
    )
    tokens = np.random.default_rng(0).integers(0, 256, 2000)
    for capacity in (None, 0.5):
        torch.manual_seed(0)
        model = RMoEForCausalLM(RMoEConfig(**kw, eval_capacity_factor=capacity)).eval()
        sample = collect_routing(model, tokens, seq_len=16, batch_size=4, max_tokens=128)
        assert [p.shape for p in sample.probs] == [(128, 4)] * 2
        got = load_summary(sample, 4)
        counts = [np.bincount(t.ravel(), minlength=4) for t in sample.topk]
        want = [c.max() / c.mean() - 1 for c in counts]
        assert got["layer_max_violation"] == pytest.approx(want)
        assert got["max_violation"] == pytest.approx(np.mean(want))
        if capacity is None:
            assert got["dropped_share"] is None and got["layer_dropped_share"] == [None, None]
        else:  # per forward of 4 x 16 tokens: capacity ceil(0.5 * 64 * 2 / 4) = 16 slots for
            # the 32 assignments an expert gets on average
            assert all(d.shape == (128, 2) for d in sample.dropped)
            assert got["dropped_share"] >= 0.5


def test_training_routing_from_the_training_log():
    from rmoe.experiments.evaluate import training_routing

    assert training_routing([{"step": 1, "loss": 1.0}]) == {
        "train_dropped_share": None,
        "final_bias_range": None,
    }
    records = [
        {"step": 1, "layer_dropped": [0.1, 0.3], "layer_bias_range": [0.001, 0.002]},
        {"step": 2, "layer_dropped": [0.0, 0.2], "layer_bias_range": [0.004, 0.003]},
    ]
    got = training_routing(records)
    assert got["train_dropped_share"] == pytest.approx(0.15)
    assert got["final_bias_range"] == pytest.approx(0.004)


def _fake_results(step: int, dropped: float, bias: float | None, eval_drop: float | None):
    split = {
        "loss": 2.0,
        "bpb": 3.0,
        "tokens_per_byte": 1.0,
        "batch_loss_sum": [64.0, 66.0],
        "batch_tokens": [32, 32],
    }
    routing = {k: 1.0 for k in ("inner_balance", "outer_balance", "entropy", "mi_mean")}
    routing.update(mi_adjacent=0.5, max_violation=0.25, dropped_share=eval_drop)
    return {
        "step": step,
        "splits": {"valid": split, "test": split},
        "routing": routing,
        "tokens_per_s": 100.0,
        "train_dropped_share": dropped,
        "final_bias_range": bias,
    }


def test_summary_shows_the_router_stage_columns_only_when_used(spec_dict, tmp_path):
    import json

    from rmoe.experiments import run_dir_of

    spec_dict["arms"].append({"name": "cap", "router": "linear", "label": "CAP"})
    spec = spec_from_dict(spec_dict)
    runs = plan_runs(spec)
    values = {"smoe": (0.0, None, None), "rmoe": (0.0, 0.01, None), "cap": (0.07, None, 0.0)}
    for r in runs:
        d = run_dir_of(tmp_path, r)
        d.mkdir(parents=True)
        results = _fake_results(r.max_steps, *values[r.arm])
        (d / "arm_results.json").write_text(json.dumps(results))
    write_report(spec, runs, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    head = next(ln for ln in summary.splitlines() if ln.startswith("| arm | L |"))
    assert "MaxVio | dropped (train) | dropped (eval) | bias range |" in head
    cap = next(ln for ln in summary.splitlines() if ln.startswith("| CAP | 2 |"))
    assert cap.endswith("| 0.250 | 0.070 | 0.000 | – |")
    # without capacity or bias, the columns are left out
    values = {a: (0.0, None, None) for a in values}
    for r in runs:
        (run_dir_of(tmp_path, r) / "arm_results.json").write_text(
            json.dumps(_fake_results(r.max_steps, *values[r.arm]))
        )
    write_report(spec, runs, tmp_path)
    head = next(
        ln
        for ln in (tmp_path / "summary.md").read_text().splitlines()
        if ln.startswith("| arm | L |")
    )
    assert head.endswith("| MaxVio |")
