"""Run the arms of an experiment as parallel, resumable subprocesses.

Each run gets a directory `OUT/runs/{run_id}/` holding the generated `arm.yaml` (its full
TrainConfig), `train.log` (the subprocess's output), the trainer's run directory contents and,
when done, `arm_results.json` from `rmoe.experiments.evaluate`. A run is

* `done`      when its newest checkpoint is at max_steps (or training ended on the wall-clock
              limit) and `arm_results.json` exists: it is skipped (but see Task scores);
* `evaluate`  when training finished but the evaluation did not;
* `resume`    when it has a checkpoint before max_steps: `rmoe train ... --resume` continues it;
* `new`       otherwise.

Training is `python -m rmoe.cli.main train arm.yaml --out DIR [--resume] --no-progress`, plus
`--init-from PATH` for an arm that starts from a checkpoint (the spec's `init_from`, resolved
against the working directory);
evaluation is `python -m rmoe.experiments.evaluate DIR`. Up to `workers` runs proceed at once.

Task scores. When the spec's `eval.tasks` asks for lm-evaluation-harness tasks that a finished
(or imported) run's results lack (`missing_tasks`: tasks added to the spec later, or computed
with another `task_limit`), only those are evaluated, `python -m rmoe.experiments.evaluate DIR
--tasks-only`, with no retraining and no change to the bits/byte results; the outcome is
`tasks`. That needs the run's model: a run imported from a results folder has none (no
checkpoints are committed), so a warning names the tasks that need it, the outcome's message
says so, and the report lists the run; its task columns stay "–". Specs without `eval.tasks`
never look at task scores.

Committed results. With a results folder (the spec's `results:` or `--results`), every run that
reaches `done` copies its small files (`RESULT_FILES`: arm config, summary, evaluation results,
metrics log, status; never checkpoints) to `RESULTS/{run_id}/`. A later invocation, on any
machine, that finds `RESULTS/{run_id}/` with results and an `arm.yaml` whose config equals the
run's (threads aside) copies them back into the run directory, marks the run imported and
skips it; a run whose config changed is trained again (and logged). The same holds in the
experiment folder itself: a run directory whose `arm.yaml` differs from the run's config is set
aside as `{run_id}.stale-N` and the run starts afresh.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from .evaluate import RESULTS_FILE, checkpoint_step, missing_tasks, model_present
from .plan import ArmRun
from .spec import EvalSpec

log = logging.getLogger(__name__)

STATUS_FILE = "train_status.json"
RESULT_FILES = ("arm.yaml", "arm.json", RESULTS_FILE, "metrics.jsonl", STATUS_FILE)
"""The small per-run files exported to a results folder (no checkpoints, no logs of stdout)."""


@dataclass
class RunOutcome:
    """What happened to one run in this invocation.

    Attributes:
        run_id: the run.
        action: `skipped` (already done), `imported` (done from a results folder), `trained`,
            `resumed`, `evaluated` (training was done), `tasks` (done; only the task scores its
            results lacked were computed) or `failed`.
        returncode: exit status of the failing subprocess (0 otherwise).
        seconds: wall-clock seconds spent on the run in this invocation.
        message: the last lines of the log for a failure; for a skipped or imported run whose
            task scores need a model that is not here, which tasks.
    """

    run_id: str
    action: str
    returncode: int = 0
    seconds: float = 0.0
    message: str = ""


def run_dir_of(out_dir: str | Path, run: ArmRun) -> Path:
    """The directory of one run inside an experiment folder."""
    return Path(out_dir) / "runs" / run.run_id


def run_state(run: ArmRun, run_dir: Path) -> str:
    """`done`, `evaluate`, `resume` or `new` (see the module docstring)."""
    step = checkpoint_step(run_dir)
    status = {}
    if (run_dir / STATUS_FILE).is_file():
        try:
            status = json.loads((run_dir / STATUS_FILE).read_text())
        except json.JSONDecodeError:
            status = {}
    trained = (
        step >= run.max_steps
        or (status.get("status") == "time_limit" and int(status.get("step", -1)) == step > 0)
        or bool(status.get("imported"))
    )
    if trained:
        return "done" if (run_dir / RESULTS_FILE).is_file() else "evaluate"
    return "resume" if step > 0 else "new"


def write_arm_config(run: ArmRun, run_dir: Path, threads: int = 0) -> Path:
    """Write the run's TrainConfig as `arm.yaml` (threads set if > 0) and return its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run.config.to_dict()
    if threads > 0:
        cfg["train"]["threads"] = int(threads)
    path = run_dir / "arm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run_dir / "arm.json").write_text(json.dumps(run.summary(), indent=1))
    return path


def _saved_init_from(run_dir: Path) -> str | None:
    """The `init_from` recorded in a run directory's `arm.json` (None when none)."""
    try:
        return json.loads((run_dir / "arm.json").read_text()).get("init_from")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _comparable(cfg: dict) -> dict:
    """A run config without the settings that may differ between machines (threads), with
    the fields it lacks filled with today's defaults: a config written before a field was
    added to `data`/`optim`/`train` compares equal to one that leaves it at its default. A
    config that no longer parses is returned as written (so it compares unequal)."""
    from ..training.config import from_dict

    cfg = json.loads(json.dumps(cfg))
    try:
        cfg = json.loads(json.dumps(from_dict(cfg).to_dict()))
    except (ValueError, TypeError):
        pass
    cfg.get("train", {}).pop("threads", None)
    return cfg


def export_results(run_dir: Path, results_dir: Path) -> Path:
    """Copy a finished run's `RESULT_FILES` (those present) to `results_dir/{run}/`."""
    import shutil

    dest = Path(results_dir) / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, dest / name)
    return dest


def import_results(run: ArmRun, run_dir: Path, results_dir: Path) -> bool:
    """Bring a run's committed results into `run_dir` when `results_dir/{run_id}/` has them for
    the same config; True when the run is done by import."""
    import shutil

    src = Path(results_dir) / run.run_id
    if not (src / RESULTS_FILE).is_file() or not (src / "arm.yaml").is_file():
        return False
    saved = yaml.safe_load((src / "arm.yaml").read_text()) or {}
    if _comparable(saved) != _comparable(run.config.to_dict()) or (
        run.init_from is not None and _saved_init_from(src) != run.init_from
    ):
        log.warning(
            "%s: committed results in %s are for another config; retraining", run.run_id, src
        )
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, run_dir / name)
    status = {"status": "completed", "step": run.max_steps, "imported": str(src)}
    (run_dir / STATUS_FILE).write_text(json.dumps(status))
    return True


def set_aside_if_changed(run: ArmRun, run_dir: Path) -> Path | None:
    """When `run_dir` holds a run of another config (its `arm.yaml` differs from the run's,
    threads aside), rename it to `{run_id}.stale-N` so the run starts afresh; returns the new
    name, or None when nothing was set aside (no run yet, or the same config)."""
    saved_path = run_dir / "arm.yaml"
    if not saved_path.is_file():
        return None
    saved = yaml.safe_load(saved_path.read_text()) or {}
    if _comparable(saved) == _comparable(run.config.to_dict()) and (
        run.init_from is None or _saved_init_from(run_dir) == run.init_from
    ):
        return None
    n = 1
    while run_dir.with_name(f"{run_dir.name}.stale-{n}").exists():
        n += 1
    stale = run_dir.with_name(f"{run_dir.name}.stale-{n}")
    run_dir.rename(stale)
    log.warning("%s: the spec changed this run's config; old run kept as %s", run.run_id, stale)
    return stale


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class _Children:
    """Live subprocesses, so an interrupt can stop them all (each saves a checkpoint)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, cmd: list[str], log_path: Path, env: dict[str, str]) -> int:
        with open(log_path, "a") as logf:
            logf.write(f"\n$ {' '.join(cmd)}\n")
            logf.flush()
            with self._lock:
                if self.stopping:
                    return 130
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
                self._procs.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.discard(proc)

    def interrupt(self, timeout: float = 60.0) -> None:
        import signal

        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def execute_run(
    run: ArmRun,
    out_dir: str | Path,
    ev: EvalSpec,
    threads: int = 0,
    children: _Children | None = None,
    python: str | None = None,
    results_dir: str | Path | None = None,
) -> RunOutcome:
    """Bring one run to `done`: import committed results, or train (new or resumed) and
    evaluate as needed, then add the task scores a done run lacks (see Task scores in the
    module doc); a run trained, evaluated or given task scores here is exported to
    `results_dir` (if given)."""
    t0 = time.perf_counter()
    run_dir = run_dir_of(out_dir, run)
    set_aside_if_changed(run, run_dir)
    state = run_state(run, run_dir)
    if state == "done":
        outcome = _complete_tasks(run, run_dir, ev, "skipped", threads, children, python)
    elif results_dir is not None and state == "new" and import_results(run, run_dir, results_dir):
        outcome = _complete_tasks(run, run_dir, ev, "imported", threads, children, python)
    else:
        outcome = _train_and_evaluate(run, run_dir, state, ev, threads, children, python)
    if outcome.action in ("skipped", "imported"):
        return outcome
    if results_dir is not None and outcome.action != "failed":
        export_results(run_dir, Path(results_dir))
    outcome.seconds = time.perf_counter() - t0
    return outcome


def _read_results(run_dir: Path) -> dict[str, Any] | None:
    """The run's `arm_results.json`, or None when it is missing or unreadable."""
    try:
        return json.loads((run_dir / RESULTS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _complete_tasks(
    run: ArmRun,
    run_dir: Path,
    ev: EvalSpec,
    action: str,
    threads: int,
    children: _Children | None,
    python: str | None,
) -> RunOutcome:
    """A done run (`action`: skipped or imported) given the task scores its results lack when
    its model is here (outcome `tasks`, or `failed`); without the model, `action` with a
    warning and a message naming the tasks that need it. A spec without tasks returns
    `action` at once."""
    missing = missing_tasks(_read_results(run_dir), ev) if ev.tasks else []
    if not missing:
        return RunOutcome(run.run_id, action)
    if not model_present(run_dir):
        source = "imported without checkpoints" if action == "imported" else "no model"
        message = (
            f"task scores for {', '.join(missing)} need the model, which {run_dir} does not "
            f"hold ({source}); their columns stay '–' until the run is retrained or its "
            "checkpoints are brought back"
        )
        log.warning("%s: %s", run.run_id, message)
        return RunOutcome(run.run_id, action, message=message)
    log.info("%s: done; evaluating only the tasks its results lack: %s", run.run_id, missing)
    t0 = time.perf_counter()
    log_path = run_dir / "train.log"
    cmd = [python or sys.executable, "-m", "rmoe.experiments.evaluate", str(run_dir)]
    cmd += ["--tasks-only", "--eval-json", json.dumps(asdict(ev))]
    rc = (children or _Children()).run(cmd, log_path, _child_env(threads))
    if rc != 0:
        return RunOutcome(run.run_id, "failed", rc, time.perf_counter() - t0, _tail(log_path))
    return RunOutcome(run.run_id, "tasks")


def _child_env(threads: int) -> dict[str, str]:
    """The environment of a run's subprocesses: torch threads and no tokenizer parallelism."""
    env = dict(os.environ)
    if threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _train_and_evaluate(
    run: ArmRun,
    run_dir: Path,
    state: str,
    ev: EvalSpec,
    threads: int,
    children: _Children | None,
    python: str | None,
) -> RunOutcome:
    """Train (state new/resume) and evaluate one run in `run_dir`."""
    t0 = time.perf_counter()
    children = children or _Children()
    python = python or sys.executable
    cfg_path = write_arm_config(run, run_dir, threads)
    log_path = run_dir / "train.log"
    env = _child_env(threads)
    action = "evaluated"
    if state in ("new", "resume"):
        if state == "new":
            for stale in ("metrics.jsonl", STATUS_FILE, RESULTS_FILE):
                (run_dir / stale).unlink(missing_ok=True)
        cmd = [python, "-m", "rmoe.cli.main", "train", str(cfg_path), "--out", str(run_dir)]
        cmd += ["--no-progress"] + (["--resume"] if state == "resume" else [])
        if run.init_from is not None:
            cmd += ["--init-from", str(Path(run.init_from).expanduser().resolve())]
        rc = children.run(cmd, log_path, env)
        if rc != 0:
            return RunOutcome(run.run_id, "failed", rc, time.perf_counter() - t0, _tail(log_path))
        step = checkpoint_step(run_dir)
        status = "completed" if step >= run.max_steps else "time_limit"
        (run_dir / STATUS_FILE).write_text(json.dumps({"status": status, "step": step}))
        action = "trained" if state == "new" else "resumed"
        if status == "time_limit" and not run.config.train.time_limit_s:
            return RunOutcome(run.run_id, "failed", 1, time.perf_counter() - t0, _tail(log_path))
    cmd = [python, "-m", "rmoe.experiments.evaluate", str(run_dir), "--eval-json"]
    cmd.append(json.dumps(asdict(ev)))
    rc = children.run(cmd, log_path, env)
    if rc != 0:
        return RunOutcome(run.run_id, "failed", rc, time.perf_counter() - t0, _tail(log_path))
    return RunOutcome(run.run_id, action, 0, time.perf_counter() - t0)


def execute_runs(
    runs: list[ArmRun],
    out_dir: str | Path,
    ev: EvalSpec,
    workers: int = 1,
    threads: int = 0,
    on_done: Callable[[RunOutcome], None] | None = None,
    results_dir: str | Path | None = None,
) -> list[RunOutcome]:
    """Run every run to `done`, up to `workers` at once; returns outcomes in `runs` order.
    With `results_dir`, committed results are imported and finished runs exported there.

    On KeyboardInterrupt every live training subprocess gets SIGINT (it saves a checkpoint), and
    the interrupt is re-raised; a rerun resumes from those checkpoints.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    children = _Children()
    results: dict[str, RunOutcome] = {}
    # seed by seed (each seed's comparisons complete early), longest runs first within a seed
    order = sorted(runs, key=lambda r: (r.seed, -r.train_flops))
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {
            pool.submit(execute_run, r, out_dir, ev, threads, children, None, results_dir): r
            for r in order
        }
        for fut in as_completed(futures):
            outcome = fut.result()
            results[outcome.run_id] = outcome
            if on_done is not None:
                on_done(outcome)
    except KeyboardInterrupt:
        children.interrupt()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [results[r.run_id] for r in runs]
