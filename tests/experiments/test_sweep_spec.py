"""The tuning sweep in a spec: every arm runs every setting, as `family@setting`."""

from __future__ import annotations

import pytest

from rmoe.experiments import plan_runs, spec_from_dict


def _sweep_spec(spec_dict, **extra):
    spec_dict["overrides"]["train"]["max_steps"] = 200  # enough steps to see the FLOP match
    spec_dict["budget"] = {"flops_reference": "rmoe"}
    spec_dict["arms"] = [
        {"name": "smoe", "router": "linear", "match": "flops", "set": {"optim.lr": 0.004}},
        {"name": "rmoe", "router": "recurrent"},
    ]
    spec_dict["sweep"] = [
        {"name": "paper", "set": {"model.router_init": "normal"}},
        {"name": "fast", "set": {"optim.router_lr_mult": 4.0, "optim.lr": 0.001}},
    ]
    spec_dict.update(extra)
    return spec_from_dict(spec_dict)


def test_every_arm_runs_every_setting_with_the_settings_keys_last(spec_dict):
    spec = _sweep_spec(spec_dict)
    assert [a.name for a in spec.arms] == ["smoe@paper", "smoe@fast", "rmoe@paper", "rmoe@fast"]
    assert spec.families() == ["smoe", "rmoe"]
    fast = spec.arm_for("smoe", "fast")
    assert fast.family == "smoe" and fast.setting == "fast"
    assert fast.set == {"optim.lr": 0.001, "optim.router_lr_mult": 4.0}  # the setting wins
    runs = {r.run_id: r for r in plan_runs(spec)}
    assert set(runs) == {
        f"{a}-L2-s0" for a in ("smoe@paper", "smoe@fast", "rmoe@paper", "rmoe@fast")
    }
    assert runs["smoe@fast-L2-s0"].config.optim.router_lr_mult == 4.0
    assert runs["smoe@paper-L2-s0"].config.model["router_init"] == "normal"
    # FLOP matching against the reference family at the same setting: same steps per setting
    assert runs["smoe@paper-L2-s0"].max_steps == runs["smoe@fast-L2-s0"].max_steps
    assert runs["smoe@paper-L2-s0"].max_steps > runs["rmoe@paper-L2-s0"].max_steps
    assert {r.arm for r in plan_runs(spec, ["rmoe"])} == {"rmoe@paper", "rmoe@fast"}


@pytest.mark.parametrize(
    "extra,msg",
    [
        ({"sweep": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"sweep": [{"set": {}}]}, "name"),
        ({"sweep": [{"name": "bad/name"}]}, "sweep setting"),
        ({"compare": {"select_on": "test", "report_on": "test"}}, "another split"),
        ({"compare": {"margin": 0.0}}, "margin"),
        ({"compare": {"marg": 0.1}}, "nearest: 'margin'"),
    ],
)
def test_bad_sweeps_and_comparisons_are_rejected(spec_dict, extra, msg):
    with pytest.raises(ValueError, match=msg):
        _sweep_spec(spec_dict, **extra)


def test_reference_names_a_family(spec_dict):
    spec = _sweep_spec(spec_dict)
    assert spec.reference == "smoe" and spec.compare.select_on == "valid"
    with pytest.raises(ValueError, match="not an arm"):
        _sweep_spec(spec_dict, reference="smoe@paper")
