"""The training loop: one process by default, DDP (or FSDP on GPUs) under torchrun/accelerate.

:func:`train` composes the parts: :func:`~rmoe.training.prepare.prepare_run` (resume or fresh,
tokenizer, data, model, optimizer), the step (:mod:`rmoe.training.step`), the
:class:`~rmoe.training.checkpoint.Checkpointer` and the
:class:`~rmoe.training.metrics.MetricsWriter`. The trainer knows nothing about a particular
router: the loss is composed by the model's own rule and the per-layer routing statistics come
from :mod:`rmoe.analysis.routing`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import get_batch
from ..evaluation import evaluate_split
from .budget import StepBudget, describe_plan
from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .lock import RunLock
from .metrics import MetricsWriter, read_records
from .optim import Schedule
from .prepare import PreparedRun, log_spaced_steps, prepare_run
from .step import StepRecord, accumulate_gradients, apply_update

__all__ = ["NonFiniteLossError", "TrainResult", "log_spaced_steps", "train"]

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The loss became NaN or Inf; the run stopped without saving over the last good checkpoint."""


@dataclass
class TrainResult:
    """Summary of a run.

    Attributes:
        run_dir: the run directory.
        step: optimizer steps completed.
        status: "completed", "interrupted" (Ctrl-C or SIGTERM, checkpoint saved), "time_limit"
            or "already_finished" (a resume of a run that had reached its end: nothing run,
            nothing written).
        tokens_per_s: mean training throughput over the run (all processes).
        final_eval: last validation metrics (loss, bpb, ppl, tokens), if any (for an
            already finished run, read back from metrics.jsonl).
        losses: training loss per step of this invocation.
        end_step: the step the run was planned to end at: max_steps, or earlier under a
            time budget (`train.time_budget_s`).
    """

    run_dir: Path
    step: int
    status: str
    tokens_per_s: float
    final_eval: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    end_step: int = 0


def micro_batches(run: PreparedRun) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training micro-batches ``(x [b, T], y [b, T])`` in the sampler's order."""
    while True:
        yield get_batch(run.splits["train"].tokens, next(run.sampler), run.cfg.data.seq_len,
                        run.device)  # fmt: skip


def validate(run: PreparedRun, writer: MetricsWriter, step: int) -> dict[str, float]:
    """Evaluate the training corpus's valid split and every ``data.extra_eval`` corpus, write a
    record for each; returns the training corpus's result."""
    cfg = run.cfg
    batch = cfg.train.eval_batch_size or run.micro_batch
    first: dict[str, float] = {}
    for spec, split in [(cfg.data.corpus, run.splits["valid"]), *run.extra_eval.items()]:
        res = evaluate_split(run.model, split, cfg.data.seq_len, batch, cfg.train.eval_batches,
                             run.device, run.amp, run.dist)  # fmt: skip
        rec = {"step": step, "split": "valid", "corpus": spec}
        writer.write({**rec, **{f"valid_{k}": v for k, v in res.items()}})
        first = first or res
    return first


def step_record(run: PreparedRun, step: int, rec: StepRecord, clock: dict[str, float]) -> dict:
    """The metrics.jsonl record of a logged step (``clock`` holds the throughput timer).

    The routing statistics go in as one list per key, one value per MoE layer: ``layer_load_cv``,
    ``layer_max_violation``, ``layer_entropy``, ``layer_aux``, ``layer_dropped`` and, with expert
    biases, ``layer_bias_range`` (see :func:`rmoe.analysis.routing.training_log_stats`); the
    metrics writer mirrors them to TensorBoard as ``layer_<key>/layer<i>``."""
    now = time.perf_counter()
    tps = clock["tokens"] / max(now - clock["last"], 1e-9)
    clock.update(last=now, tokens=0)
    out: dict[str, Any] = {
        "step": step,
        "loss": rec.loss,
        "lm_loss": rec.lm_loss,
        "aux_loss": rec.aux_loss,
        "z_loss": rec.z_loss,
        "lr": run.scheduler.get_last_lr()[0],
        "tokens": step * run.cfg.data.batch_size * run.cfg.data.seq_len,
        "tokens_per_s": tps,
        "elapsed_s": now - clock["start"],
    }
    if rec.grad_norm is not None:
        out["grad_norm"] = rec.grad_norm
    if rec.routing is not None:
        out.update({f"layer_{k}": v for k, v in rec.routing.items()})
    return out


def progress_postfix(rec: StepRecord, logged: dict[str, Any]) -> dict[str, str]:
    """The progress bar's numbers for a logged step: loss, throughput and, when the capacity
    dropped assignments, the largest per-layer dropped share."""
    out = {"loss": f"{rec.loss:.4f}", "tok_s": f"{logged['tokens_per_s']:,.0f}"}
    dropped = max((rec.routing or {}).get("dropped") or [0.0])
    if dropped > 0:
        out["drop"] = f"{dropped:.1%}"
    return out


def check_finite(run: PreparedRun, loss: float, step: int) -> None:
    """Raise :class:`NonFiniteLossError` (naming the last good checkpoint) on NaN/Inf."""
    if not math.isfinite(loss):
        last_ck = latest_checkpoint(run.run_dir)
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; stopped without saving. Last good "
            f"checkpoint: {last_ck or 'none'}. Lower optim.lr, enable optim.grad_clip "
            "or check the data."
        )


def _is_eval_step(cfg: TrainConfig, eval_steps: set[int], step: int) -> bool:
    return bool(cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or (
        step in eval_steps
    )


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    init_from: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a model as `cfg` says, writing everything to `out_dir`.

    Args:
        cfg: the run configuration.
        out_dir: run directory (created; must be empty of checkpoints unless `resume`).
        resume: continue from the newest checkpoint in out_dir (bit-identical on CPU).
        init_from: start from the weights of another run or saved model directory (continual
            pre-training); the optimizer and data order start fresh.
        progress: show a progress bar (main process only).
        on_step: called as on_step(step, loss) after every optimizer step (tests use it to
            simulate Ctrl-C).

    Raises:
        RunLockedError: another trainer holds out_dir's lock (see :mod:`rmoe.training.lock`).
    """
    # one trainer per run directory; under torchrun only rank 0 takes the lock
    lock = RunLock(out_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        run = prepare_run(cfg, out_dir, resume, init_from)
        if run.resumed and run.step >= _planned_end(run):
            return _already_finished(run)
        continue_from = run.step if run.resumed else None
        writer = MetricsWriter(run.run_dir, enabled=run.dist.is_main, continue_from=continue_from)
        try:
            return _loop(run, writer, progress, on_step)
        finally:
            writer.close()
    finally:
        if lock is not None:
            lock.release()


def _planned_end(run: PreparedRun) -> int:
    """The step a resumed run would end at, without changing its schedule."""
    t = run.cfg.train
    schedule = next((f for f in run.scheduler.lr_lambdas if isinstance(f, Schedule)), None)
    if schedule is None or not t.time_budget_s or schedule.total <= run.step:
        return t.max_steps
    return min(schedule.total, t.max_steps)


def _already_finished(run: PreparedRun) -> TrainResult:
    """A resume of a run that reached its end: nothing is trained, evaluated or written; the
    result carries the last evaluation of the training corpus from metrics.jsonl."""
    log.info("%s already finished at step %d; nothing to do (raise train.max_steps to train "
             "further)", run.run_dir, run.step)  # fmt: skip
    final_eval: dict[str, float] = {}
    for rec in read_records(run.run_dir / "metrics.jsonl"):
        if rec.get("split") == "valid" and rec.get("corpus") == run.cfg.data.corpus:
            final_eval = {k[6:]: v for k, v in rec.items() if k.startswith("valid_")}
    return TrainResult(run_dir=run.run_dir, step=run.step, status="already_finished",
                       tokens_per_s=0.0, final_eval=final_eval, end_step=run.step)  # fmt: skip


def _loop(
    run: PreparedRun,
    writer: MetricsWriter,
    progress: bool,
    on_step: Callable[[int, float], None] | None,
) -> TrainResult:
    """Steps until max_steps, the time limit or Ctrl-C; then the final evaluation and save."""
    cfg, step = run.cfg, run.step
    schedule, budget = _horizon(run)
    end = schedule.total if schedule is not None else cfg.train.max_steps
    pbar = _progress(end, step) if (progress and run.dist.is_main) else None
    losses: list[float] = []
    status, final_eval = "completed", {}
    t_start = time.perf_counter()
    clock = {"start": t_start, "last": t_start, "tokens": 0}
    steps_run, batches = 0, micro_batches(run)
    run.train_model.train()
    if 0 in run.eval_steps and step == 0:
        final_eval = validate(run, writer, 0)
    stop = _StopFlag()
    try:
        stop.install()
        while step < end and not stop.requested:
            log_now = (step + 1) % cfg.train.log_interval == 0 or step == 0
            run.optimizer.zero_grad(set_to_none=True)
            rec = accumulate_gradients(run.train_model, run.model.config, batches,
                                       cfg.data.grad_accum, amp=run.amp,
                                       world_size=run.dist.world_size,
                                       log_routing=log_now)  # fmt: skip
            check_finite(run, rec.loss, step + 1)
            rec.grad_norm = apply_update(run.optimizer, run.scheduler, run.model.parameters(),
                                         cfg.optim.grad_clip)  # fmt: skip
            step += 1
            steps_run += 1
            losses.append(rec.loss)
            clock["tokens"] += cfg.data.batch_size * cfg.data.seq_len
            if on_step is not None:
                on_step(step, rec.loss)
            if budget is not None:
                end = _replan(budget, schedule, step, end, pbar)
            if log_now:
                logged = step_record(run, step, rec, clock)
                writer.write(logged)
                if pbar is not None:
                    pbar.set_postfix(progress_postfix(rec, logged))
            if pbar is not None:
                pbar.update(1)
            if _is_eval_step(cfg, run.eval_steps, step):
                t_eval = time.perf_counter()
                final_eval = validate(run, writer, step)
                if budget is not None:
                    budget.record_overhead("eval", time.perf_counter() - t_eval)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{rec.loss:.4f}", val_bpb=f"{final_eval['bpb']:.3f}")
            if cfg.train.save_interval and step % cfg.train.save_interval == 0:
                t_save = time.perf_counter()
                run.checkpointer.save(step)
                if budget is not None:
                    budget.record_overhead("save", time.perf_counter() - t_save)
            if cfg.train.time_limit_s and time.perf_counter() - t_start > cfg.train.time_limit_s:
                status = "time_limit"
                break
        if stop.requested:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        status = "interrupted"
        log.warning("interrupted at step %d; saving a checkpoint", step)
    finally:
        stop.uninstall()
        if pbar is not None:
            pbar.close()
    elapsed = time.perf_counter() - t_start
    if status != "interrupted" and (not final_eval or not _is_eval_step(cfg, run.eval_steps, step)):
        final_eval = validate(run, writer, step)
    if steps_run or not run.resumed:
        run.checkpointer.save(step)
    if run.dist.world_size > 1:
        torch.distributed.barrier()
    tokens = steps_run * cfg.data.batch_size * cfg.data.seq_len
    return TrainResult(run_dir=run.run_dir, step=step, status=status,
                       tokens_per_s=tokens / max(elapsed, 1e-9), final_eval=final_eval,
                       losses=losses, end_step=end)  # fmt: skip


def _horizon(run: PreparedRun) -> tuple[Schedule | None, StepBudget | None]:
    """The run's schedule object and, under `train.time_budget_s`, its planner. Without a
    budget the schedule ends at max_steps (also on a resume that changed max_steps); with one,
    a resume continues the planned end saved with the checkpoint."""
    t = run.cfg.train
    schedule = next((f for f in run.scheduler.lr_lambdas if isinstance(f, Schedule)), None)
    if schedule is None:
        return None, None
    if not t.time_budget_s or not run.resumed or schedule.total <= run.step:
        schedule.total = t.max_steps  # (a budgeted run that reached its end: a new budget)
    schedule.total = min(schedule.total, t.max_steps)
    if not t.time_budget_s:
        return schedule, None
    d = run.cfg.data
    eval_bs = t.eval_batch_size or d.batch_size
    eval_cost = (t.eval_batches or 50) * eval_bs / (3.0 * d.batch_size * d.grad_accum)
    budget = StepBudget(budget_s=t.time_budget_s, max_steps=t.max_steps, start_step=run.step,
                        t0=time.perf_counter(), eval_interval=t.eval_interval,
                        eval_cost_steps=eval_cost)  # fmt: skip
    return schedule, budget


def _replan(budget: StepBudget, schedule: Schedule, step: int, end: int, pbar) -> int:
    """Record the step's time and move the run's end to what fits the budget; logs when the
    end first moves and whenever it moves by more than 2 %."""
    now = time.perf_counter()
    budget.record_step(step, now)
    new_end = max(budget.plan(step, now, end), step)
    if new_end == end:
        return end
    if budget.announced is None or abs(new_end - budget.announced) > 0.02 * budget.announced:
        log.info("%s", describe_plan(budget, new_end))
        budget.announced = new_end
    schedule.total = new_end
    if pbar is not None:
        pbar.total = new_end
        pbar.refresh()
    return new_end


class _StopFlag:
    """First Ctrl-C or SIGTERM asks the loop to stop at the end of the current step (so the
    checkpoint is consistent); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        import signal

        self.requested = True
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        log.warning("%s: stopping after this step (again to abort at once)", name)

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            # SIGTERM (what schedulers such as SLURM send before a preemption) = Ctrl-C
            self._previous = {
                sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)
            }

    def uninstall(self) -> None:
        import signal

        if self._previous is not None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = None


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
