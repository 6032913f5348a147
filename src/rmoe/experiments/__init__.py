"""Router comparisons at matched budgets: `rmoe experiment SPEC`.

An experiment spec (YAML; `rmoe.experiments.spec`) is a base run config plus a grid of arms
(router variant x depth x seed). `run_experiment` expands it into runs
(`rmoe.experiments.plan`; FLOP matching via `rmoe.modeling.accounting`), trains them as parallel,
resumable subprocesses (`rmoe.experiments.runner`), evaluates each on a fixed held-out slice
(`rmoe.experiments.evaluate`) and writes results.json, summary.md and PNG plots
(`rmoe.experiments.report`) with paired bootstrap intervals (`rmoe.experiments.stats`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plan import ArmRun, format_plan, matched_steps, plan_runs
from .runner import RunOutcome, execute_runs, run_dir_of, run_state
from .spec import (
    ROUTER_VARIANTS,
    ArmSpec,
    EvalSpec,
    ExperimentSpec,
    load_spec,
    quick_spec,
    spec_from_dict,
    spec_names,
)
from .stats import PairedDiff, mean_std, paired_bootstrap

__all__ = [
    "ROUTER_VARIANTS",
    "ArmRun",
    "ArmSpec",
    "EvalSpec",
    "ExperimentResult",
    "ExperimentSpec",
    "PairedDiff",
    "RunOutcome",
    "execute_runs",
    "format_plan",
    "load_spec",
    "matched_steps",
    "mean_std",
    "paired_bootstrap",
    "plan_runs",
    "prepare_data",
    "quick_spec",
    "run_dir_of",
    "run_experiment",
    "run_state",
    "spec_from_dict",
    "spec_names",
]


@dataclass
class ExperimentResult:
    """What `run_experiment` did.

    Attributes:
        out_dir: the experiment folder.
        runs: the planned runs.
        outcomes: one per run (skipped / trained / resumed / evaluated / failed).
        results: the content of results.json.
    """

    out_dir: Path
    runs: list[ArmRun]
    outcomes: list[RunOutcome] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[RunOutcome]:
        """Runs that failed in this invocation."""
        return [o for o in self.outcomes if o.action == "failed"]


def prepare_data(spec: ExperimentSpec) -> None:
    """Tokenise and cache the corpus splits once, before parallel runs would race to do it."""
    from ..data import build_tokenizer, get_corpus, get_split_tokens

    cfg = spec.base_config()
    if cfg.data.tokenizer.startswith("bpe:"):
        return  # the BPE tokenizer is trained inside each run
    corpus = get_corpus(cfg.data.corpus, text_field=cfg.data.text_field)
    tok = build_tokenizer(cfg.data.tokenizer)
    for split in sorted({"train", "valid", *spec.eval.splits}):
        get_split_tokens(corpus, tok, split, cache_dir=cfg.data.cache_dir)


def default_threads(workers: int) -> int:
    """torch threads per run: the cores divided among the workers (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_experiment(
    spec: ExperimentSpec,
    out_dir: str | Path,
    workers: int | None = None,
    only: list[str] | None = None,
    threads: int | None = None,
    command: str = "",
    on_done: Callable[[RunOutcome], None] | None = None,
    results_dir: str | Path | None = None,
) -> ExperimentResult:
    """Plan, train (skipping finished runs, resuming unfinished ones), evaluate and report.

    Args:
        spec: the experiment.
        out_dir: experiment folder (runs/ inside, summary.md/results.json/PNGs at the top).
        workers: runs at once (None = the spec's `workers`).
        only: restrict to these arm names (the report covers every planned run that has
            results, so a later full rerun completes the picture).
        threads: torch CPU threads per run (None = the spec's `threads`, 0 = cores / workers).
        command: the command line, recorded in the summary.
        on_done: called with each run's outcome as it finishes.
        results_dir: folder of committed per-run results (None = the spec's `results`, if
            any): finished runs found there are imported, new ones exported (see runner.py).
    """
    from .report import write_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or spec.workers
    if threads is None:
        threads = spec.threads
    threads = threads or default_threads(workers)
    runs = plan_runs(spec, only)
    prepare_data(spec)
    (out / "spec.yaml").write_text(_spec_yaml(spec))
    results_dir = results_dir if results_dir is not None else spec.results
    outcomes = execute_runs(runs, out, spec.eval, workers, threads, on_done, results_dir)
    all_runs = plan_runs(spec) if only else runs
    results = write_report(spec, all_runs, out, command)
    return ExperimentResult(out, all_runs, outcomes, results)


def _spec_yaml(spec: ExperimentSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
