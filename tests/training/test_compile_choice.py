"""train.compile: auto (CUDA only), true/false, and bad values refused in one line."""

import pytest

from rmoe.training.config import compile_enabled, from_dict


@pytest.mark.parametrize(
    ("value", "device", "expected"),
    [
        ("auto", "cuda", True),
        ("auto", "cpu", False),
        (True, "cpu", True),
        ("true", "cpu", True),
        ("off", "cuda", False),
        (False, "cuda", False),
    ],
)
def test_compile_enabled(value, device, expected):
    assert compile_enabled(value, device) is expected


def test_default_is_auto_and_validates():
    cfg = from_dict({})
    assert cfg.train.compile == "auto"
    cfg.validate()


def test_bad_compile_value_is_one_clear_error():
    with pytest.raises(ValueError, match="train.compile='sometimes'; expected auto, true or false"):
        from_dict({"train": {"compile": "sometimes"}}).validate()


def test_planned_experiment_runs_stay_eager():
    from rmoe.experiments.plan import plan_runs
    from rmoe.experiments.spec import load_spec

    runs = plan_runs(load_spec("cpu-study-a"))
    assert runs and all(r.config.train.compile is False for r in runs)
