"""Spec loading, arm expansion, FLOP matching, identical batches and non-router init."""

from __future__ import annotations

import pytest
import torch

from rmoe.experiments import load_spec, matched_steps, plan_runs, quick_spec, spec_from_dict
from rmoe.experiments.spec import ROUTER_VARIANTS, spec_names
from rmoe.modeling import RMoEForCausalLM
from rmoe.modeling.accounting import count_config

SHIPPED = [
    "baselines-2026",
    "cpu-mechanism",
    "cpu-study-a",
    "cpu-study-b",
    "cpu-study-c",
    "gpu-10min",
    "paper-depth",
    "paper-enwik8-medium",
]


def test_shipped_specs_load_and_plan():
    assert set(SHIPPED) <= set(spec_names())
    for name in SHIPPED:
        spec = load_spec(name)
        runs = plan_runs(spec)
        assert runs and len({r.run_id for r in runs}) == len(runs)
        q = quick_spec(spec)
        assert all(r.config.model["hidden_size"] == 32 for r in plan_runs(q))


def test_cpu_mechanism_matches_the_issue():
    spec = load_spec("cpu-mechanism")
    runs = plan_runs(spec)
    m = runs[0].config.model
    assert (m["num_hidden_layers"], m["hidden_size"], m["num_experts"]) == (8, 128, 8)
    assert (m["num_experts_per_tok"], m["router_dim"]) == (2, 32)
    assert {r.router for r in runs} == {"linear", "recurrent", "recurrent-np", "recurrent-detach"}
    assert sorted({r.seed for r in runs}) == [0, 1]
    assert runs[0].config.data.corpus == "python-stdlib"


def test_gpu_spec_matches_the_issue():
    spec = load_spec("gpu-10min")
    runs = plan_runs(spec)
    c = runs[0].config
    assert (c.model["num_hidden_layers"], c.model["hidden_size"], c.model["num_experts"]) == (
        12,
        384,
        16,
    )
    assert (c.data.seq_len, c.data.batch_size, c.train.dtype, c.optim.lr) == (
        512,
        64,
        "bfloat16",
        7e-4,
    )
    names = sorted(r.run_id for r in runs)
    assert names == sorted(
        [
            "smoe-L12-s0",
            "smoe-L12-s1",
            "rmoe-L12-s0",
            "rmoe-L12-s1",
            "rmoe-np-L12-s0",
            "smoe-flops-L12-s0",
            "smoe-dsv3-L12-s0",
            "shared-L12-s0",
        ]
    )
    by_id = {r.run_id: r.config.model for r in runs}
    assert {m["router_init"] for m in by_id.values()} == {"uniform"}
    assert by_id["smoe-dsv3-L12-s0"]["router_score_func"] == "sigmoid"
    assert by_id["smoe-dsv3-L12-s0"]["router_expert_bias"] is True


def test_router_variants_set_the_model_keys(spec_dict):
    spec_dict["arms"] = [{"name": v.replace("-", "_"), "router": v} for v in ROUTER_VARIANTS]
    spec_dict["reference"] = None
    runs = {r.router: r.config.model for r in plan_runs(spec_from_dict(spec_dict))}
    assert runs["linear"]["router_type"] == "linear"
    assert runs["recurrent-np"]["router_pass_state"] is False
    assert runs["recurrent-detach"]["router_detach_state"] is True
    assert runs["recurrent-xmoe"]["router_scorer"] == "xmoe"
    for r, model in runs.items():
        model_cfg = RMoEForCausalLM(
            __import__("rmoe").RMoEConfig(**{**model, "vocab_size": 258})
        ).config
        assert model_cfg.router_type == ROUTER_VARIANTS[r]["router_type"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"arms": [{"name": "a", "router": "recurent"}]}, "nearest: 'recurrent'"),
        ({"reference": "nope"}, "is not an arm"),
        ({"arms": [{"name": "a", "router": "linear", "match": "flops"}]}, "flops_reference"),
        ({"evall": {}}, "nearest: 'eval'"),
        ({"arms": [{"name": "a b", "router": "linear"}]}, "arm name"),
    ],
)
def test_bad_specs_raise_clear_errors(spec_dict, bad, message):
    spec_dict.update(bad)
    if "arms" in bad:
        spec_dict["reference"] = None
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec_from_dict(spec_dict)


def test_matched_steps_arithmetic():
    assert matched_steps(100, 3.0, 2.0) == 150
    assert matched_steps(100, 2.0, 2.0) == 100
    assert matched_steps(100, 3.0, 3.0, ref_tokens_per_step=2, tokens_per_step=1) == 200
    assert matched_steps(1, 1.0, 1000.0) == 1
    with pytest.raises(ValueError):
        matched_steps(10, 1.0, 0.0)


def test_flop_matching_gives_the_cheaper_arm_extra_steps(spec_dict):
    spec_dict["overrides"]["train"]["max_steps"] = 1000
    spec_dict["overrides"]["model"]["router_dim"] = 32  # make the router cost visible
    spec_dict["budget"] = {"flops_reference": "rmoe"}
    spec_dict["seeds"] = [0, 1]
    spec_dict["depths"] = [2, 4]
    spec_dict["arms"].append({"name": "smoe-flops", "router": "linear", "match": "flops"})
    runs = {r.run_id: r for r in plan_runs(spec_from_dict(spec_dict))}
    for depth in (2, 4):
        for seed in (0, 1):
            smoe, rmoe_, matched = (
                runs[f"{a}-L{depth}-s{seed}"] for a in ("smoe", "rmoe", "smoe-flops")
            )
            f_s = count_config(smoe.config.model_config(vocab_size=258), 32).forward_flops_per_token
            f_r = count_config(
                rmoe_.config.model_config(vocab_size=258), 32
            ).forward_flops_per_token
            assert f_r > f_s
            assert smoe.max_steps == rmoe_.max_steps == 1000
            assert matched.max_steps == round(1000 * f_r / f_s) > 1000
            # steps x FLOPs/token x tokens/step equals the reference's to within one step
            per_step = 3 * f_s * matched.tokens_per_step
            assert abs(matched.train_flops - rmoe_.train_flops) <= per_step / 2
            assert matched.config.model == smoe.config.model


def test_only_restricts_the_runs(spec_dict):
    spec = spec_from_dict(spec_dict)
    assert {r.arm for r in plan_runs(spec, ["rmoe"])} == {"rmoe"}
    with pytest.raises(ValueError, match="no arm 'rmo'"):
        plan_runs(spec, ["rmo"])


def test_arms_of_one_seed_see_identical_batches_and_non_router_init(
    spec_dict, tmp_path, monkeypatch
):
    """Train each arm through the real trainer, recording every batch it draws and its weights
    right after the trainer's seeded initialisation; compare across arms."""
    import rmoe.training.trainer as trainer

    spec_dict["seeds"] = [0, 1]
    spec_dict["overrides"]["train"]["max_steps"] = 3
    spec_dict["arms"] += [
        {"name": "np", "router": "recurrent-np"},
        {"name": "xmoe", "router": "xmoe"},
        {"name": "mlp", "router": "mlp"},
    ]
    runs = plan_runs(spec_from_dict(spec_dict))
    record: dict[str, dict] = {}
    current: dict = {}
    real_get_batch = trainer.get_batch
    real_init = RMoEForCausalLM.init_weights_seeded

    def get_batch(tokens, starts, seq_len, device=None):
        x, y = real_get_batch(tokens, starts, seq_len, device)
        current["batches"].append(x.clone())
        return x, y

    def init_weights_seeded(self, seed):
        real_init(self, seed)
        current["init"] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    monkeypatch.setattr(trainer, "get_batch", get_batch)
    monkeypatch.setattr(RMoEForCausalLM, "init_weights_seeded", init_weights_seeded)
    for run in runs:
        current = {"batches": []}
        trainer.train(run.config, tmp_path / run.run_id, progress=False)
        record[run.run_id] = current

    def is_router(name: str) -> bool:
        return ".router." in name or "router_cell" in name

    for seed in (0, 1):
        ref = record[f"smoe-L2-s{seed}"]
        assert len(ref["batches"]) >= 3
        for arm in ("rmoe", "np", "xmoe", "mlp"):
            other = record[f"{arm}-L2-s{seed}"]
            assert len(other["batches"]) == len(ref["batches"])
            for a, b in zip(ref["batches"], other["batches"]):
                assert torch.equal(a, b)
            shared = {k for k in ref["init"] if not is_router(k)}
            assert shared == {k for k in other["init"] if not is_router(k)}
            for k in shared:
                assert torch.equal(ref["init"][k], other["init"][k]), k
            assert {k for k in ref["init"] if is_router(k)} != {
                k for k in other["init"] if is_router(k)
            }
    # the check has teeth: another seed changes both the batches and the weights
    a, b = record["smoe-L2-s0"], record["smoe-L2-s1"]
    assert not torch.equal(a["batches"][0], b["batches"][0])
    k = "model.embed_tokens.weight"
    assert not torch.equal(a["init"][k], b["init"][k])
