"""The time-budget planner (`train.time_budget_s`) and the schedule object it moves."""

from __future__ import annotations

import pytest
import torch

from rmoe.training.budget import StepBudget, describe_plan
from rmoe.training.config import from_dict
from rmoe.training.optim import Schedule, build_scheduler, lr_factor


def _steps(budget: StepBudget, first: int, last: int, per_step: float, t: float) -> float:
    for s in range(first, last + 1):
        t += per_step
        budget.record_step(s, t)
    return t


def test_no_plan_before_calibration_then_the_end_fits_the_budget():
    b = StepBudget(budget_s=100.0, max_steps=1000, start_step=0, t0=0.0, calibration_steps=8)
    t = _steps(b, 1, 5, 0.5, 0.0)
    assert b.plan(5, t, 1000) == 1000  # speed not known yet
    t = _steps(b, 6, 20, 0.5, t)
    # 100 s at 0.5 s/step, 10 s used, a save estimated at 2 steps: 20 + (90 - 1) / 0.5 = 198
    assert b.plan(20, t, 1000) == 198
    assert "ends at step 198 of 1000" in describe_plan(b, 198)


def test_never_beyond_max_steps_and_never_before_now():
    b = StepBudget(budget_s=1e6, max_steps=300, start_step=0, t0=0.0)
    t = _steps(b, 1, 20, 0.1, 0.0)
    assert b.plan(20, t, 300) == 300
    assert "all 300 steps fit" in describe_plan(b, 300)
    late = StepBudget(budget_s=1.0, max_steps=300, start_step=0, t0=0.0)
    t = _steps(late, 1, 20, 0.5, 0.0)  # already past the budget
    assert late.plan(20, t, 300) == 20


def test_a_slower_machine_moves_the_end_earlier_and_overheads_count():
    b = StepBudget(budget_s=100.0, max_steps=1000, start_step=0, t0=0.0, window=10)
    t = _steps(b, 1, 20, 0.2, 0.0)
    fast = b.plan(20, t, 1000)
    t = _steps(b, 21, 40, 0.4, t)  # the machine got busy: the recent window is what counts
    slow = b.plan(40, t, fast)
    assert slow < fast
    assert b.seconds_per_step() == pytest.approx(0.4)
    b.record_overhead("eval", 5.0)  # an evaluation: excluded from the speed, reserved at the end
    t += 5.0
    t = _steps(b, 41, 50, 0.4, t)
    assert b.seconds_per_step() == pytest.approx(0.4)
    left = 100.0 - t - 5.0 - 0.8
    assert abs(b.plan(50, t, slow) - (50 + left / 0.4)) <= 1
    with pytest.raises(ValueError, match="kind"):
        b.record_overhead("other", 1.0)


def test_evaluations_on_the_way_are_reserved():
    plain = StepBudget(budget_s=100.0, max_steps=10_000, start_step=0, t0=0.0)
    every = StepBudget(budget_s=100.0, max_steps=10_000, start_step=0, t0=0.0, eval_interval=50)
    for b in (plain, every):
        _steps(b, 1, 20, 0.1, 0.0)
        b.record_overhead("eval", 2.0)
    assert every.plan(20, 2.0, 10_000) < plain.plan(20, 2.0, 10_000)


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="time_budget_s"):
        StepBudget(budget_s=0.0, max_steps=10, start_step=0, t0=0.0)
    with pytest.raises(ValueError, match="time_budget_s"):
        from_dict({"train": {"time_budget_s": -1}})


def test_schedule_object_matches_lr_factor_and_its_horizon_is_saved():
    cfg = from_dict(
        {"optim": {"warmup_steps": 4, "schedule": "cosine"}, "train": {"max_steps": 20}}
    )
    sched = Schedule.from_config(cfg)
    assert [sched(s) for s in range(25)] == [lr_factor(s, cfg) for s in range(25)]
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    scheduler = build_scheduler(opt, cfg)
    scheduler.lr_lambdas[0].total = 12  # a budget moved the end earlier
    state = scheduler.state_dict()
    fresh = build_scheduler(torch.optim.AdamW(model.parameters(), lr=1.0), cfg)
    assert fresh.lr_lambdas[0].total == 20
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].total == 12
    assert fresh.lr_lambdas[0](12) == pytest.approx(0.1)
