"""Fit a run into a wall-clock budget (`train.time_budget_s`).

A fixed step count makes a run's outcome depend on the machine: on a slow or busy machine a
hard time limit cuts the run long before its learning-rate schedule has decayed, and the model
is left at a high learning rate mid-schedule. With a time budget the trainer instead measures its
own speed as it goes and moves the *end of the run* — the step at which the schedule reaches
``min_lr_ratio``, the progress bar's total and the final evaluation — to the step that fits the
budget, never beyond ``train.max_steps``. The plan is revised every step from the recent speed,
so a machine that gets busier mid-run still ends on time.

What is reserved for after the last step: the final evaluation and the final save, each
estimated from the last one measured in this run (before any was measured, from the step time).
Evaluations at ``eval_interval`` still to come are counted too.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class StepBudget:
    """Plans the last step of a run from its measured speed.

    Args:
        budget_s: seconds for the whole run from `t0` (training, evaluations, the final save).
        max_steps: the plan never goes beyond this step.
        start_step: the step the run (or this resume) started at.
        t0: the clock reading (``time.perf_counter()``) at `start_step`.
        eval_interval: steps between evaluations (0 = only the final one).
        calibration_steps: steps measured before the first plan (the first steps are slower:
            allocation, caches).
        window: how many recent steps the speed is measured over.
        eval_cost_steps: an evaluation's cost in training steps, used until one is measured
            (an evaluation batch costs about a third of a training micro-batch: forward only).
    """

    budget_s: float
    max_steps: int
    start_step: int
    t0: float
    eval_interval: int = 0
    calibration_steps: int = 8
    window: int = 50
    eval_cost_steps: float = 0.0
    eval_s: float | None = None
    save_s: float | None = None
    announced: int | None = None  # the end last reported in the log
    _marks: deque = field(default_factory=deque, repr=False)
    _overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if self.budget_s <= 0:
            raise ValueError(f"train.time_budget_s={self.budget_s}: expected > 0 (0 = off)")
        self._marks = deque(maxlen=self.window + 1)

    def record_step(self, step: int, now: float) -> None:
        """Note that `step` finished at clock time `now` (excluding nothing: call it right
        after the optimizer step, before any evaluation or save of that step)."""
        self._marks.append((step, now - self._overhead_s))

    def record_overhead(self, kind: str, seconds: float) -> None:
        """An evaluation (`kind` = "eval") or a save ("save") took `seconds`."""
        self._overhead_s += seconds
        if kind == "eval":
            self.eval_s = seconds
        elif kind == "save":
            self.save_s = seconds
        else:
            raise ValueError(f"StepBudget.record_overhead: kind {kind!r}; expected eval or save")

    def seconds_per_step(self) -> float | None:
        """Training seconds per step over the recent window (evaluations and saves excluded),
        or None before `calibration_steps` steps were measured."""
        if len(self._marks) < 2 or self._marks[-1][0] - self.start_step < self.calibration_steps:
            return None
        (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
        return max(t1 - t0, 1e-9) / max(s1 - s0, 1)

    def plan(self, step: int, now: float, current_end: int) -> int:
        """The step the run should end at, given that `step` steps are done at time `now`.

        Returns `current_end` until the speed is known; afterwards the largest end step
        (between `step` and `max_steps`) whose remaining steps, the evaluations at
        `eval_interval` on the way, the final evaluation and the final save fit in what is
        left of the budget."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return current_end
        eval_s = self.eval_s if self.eval_s is not None else self.eval_cost_steps * per_step
        save_s = self.save_s if self.save_s is not None else 2.0 * per_step
        left = self.budget_s - (now - self.t0) - eval_s - save_s
        end = step + max(0, math.floor(left / per_step))
        if self.eval_interval and eval_s:
            # evaluations at multiples of eval_interval in (step, end) take time too
            for _ in range(3):
                between = (end - 1) // self.eval_interval - step // self.eval_interval
                end = step + max(0, math.floor((left - max(0, between) * eval_s) / per_step))
        return max(step, min(self.max_steps, end))


def describe_plan(budget: StepBudget, end: int) -> str:
    """One line for the log: the measured speed and where the run will end."""
    per_step = budget.seconds_per_step() or float("nan")
    if end >= budget.max_steps:
        return (
            f"time budget {budget.budget_s:.0f} s: {per_step:.3f} s/step here, "
            f"all {budget.max_steps} steps fit"
        )
    return (
        f"time budget {budget.budget_s:.0f} s: {per_step:.3f} s/step here, so the run ends at "
        f"step {end} of {budget.max_steps} (the learning-rate schedule decays to that step)"
    )
