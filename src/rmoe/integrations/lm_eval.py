"""lm-evaluation-harness for rmoe models: the ``rmoe`` LM, built-in offline tasks, the runner.

Install with ``pip install 'rmoe[eval]'``. Importing this module never needs lm_eval: the
functions and the class that do raise a :class:`ValueError` naming that command.

This module is the runner and the one place to import from; the parts live in
:mod:`rmoe.integrations.lm_eval_model` (the ``rmoe`` LM, the lm_eval requirement) and
:mod:`rmoe.integrations.lm_eval_tasks` (the built-in tasks' data), whose public names are
re-exported here.

The ``rmoe`` model (:class:`RMoELM`, registered with lm_eval's ``register_model`` when this
module is imported) wraps an rmoe model and its :class:`rmoe.data.Tokenizer`. It is built from
``pretrained=PATH`` (any path :func:`rmoe.loading.load_model` reads: a run directory, a saved
model, a checkpoint) or from an already loaded model. Other model arguments: ``device``,
``dtype``, ``tokenizer`` (a tokenizer spec overriding the saved one), ``batch_size``,
``max_length`` (default: the run's ``data.seq_len``, else ``max_position_embeddings``),
``max_gen_toks`` and ``add_bos_token`` (default true: the end-of-text token, which also begins
every training document, is put before each context, as ``rmoe generate`` does).

Three ways to run tasks:

* ``rmoe eval RUN --tasks rmoe_pydoc_mc --limit 100`` (prints a table, writes JSON);
* ``python -m rmoe.lm_eval --model rmoe --model_args pretrained=RUN --tasks rmoe_pydoc``
  (lm_eval's own command line with rmoe registered; ``--model hf`` works too);
* :func:`evaluate_tasks` from Python.

Built-in tasks (offline; generated from ``pydoc_data.topics``, which every Python has, into
:func:`builtin_task_dir`; deterministic for a given Python version):

* ``rmoe_pydoc_mc`` — the first 32 words of a documentation paragraph; choose its true next 10
  words among 4 (the distractors are the same words of paragraphs from other topics).
  Metrics acc and acc_norm (log-likelihood normalised by the choice's length in bytes).
* ``rmoe_pydoc_cloze`` — LAMBADA-style: a paragraph's end without its last word; predict the
  word. Metrics acc (the word is the greedy continuation) and perplexity.
* the tag ``rmoe_pydoc`` runs both.

Running the paper's tasks (ARC-e, HellaSwag, PIQA, SciQ, LAMBADA) without the hub. lm_eval's
task YAMLs name hub datasets (``dataset_path: allenai/ai2_arc``). Either

1. fill the datasets cache once on a machine online (``lm_eval ... --tasks arc_easy`` or
   ``datasets.load_dataset("allenai/ai2_arc", "ARC-Easy")``), copy
   ``~/.cache/huggingface/datasets`` and run with ``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``; or
2. keep local files of the datasets and a folder of task YAMLs that point at them, passed as
   ``--include-path DIR`` (``--include_path`` for ``python -m rmoe.lm_eval``). Export each
   split once, e.g. ``load_dataset("allenai/ai2_arc", "ARC-Easy")["test"].to_json(
   "arc_easy/test.jsonl")``, so the fields are those the standard YAML reads, then write
   ``DIR/arc_easy_local.yaml``::

       include: /path/to/site-packages/lm_eval/tasks/arc/arc_easy.yaml   # the standard task
       task: arc_easy_local          # or keep `arc_easy`: a task in DIR overrides the standard one
       dataset_path: json            # datasets' local loader (also: parquet, csv, arrow)
       dataset_name: null            # the standard YAML names a hub config (ARC-Easy)
       dataset_kwargs:
         data_files:                 # absolute paths; one entry per split the YAML uses
           train: /data/arc_easy/train.jsonl
           validation: /data/arc_easy/validation.jsonl
           test: /data/arc_easy/test.jsonl

   ``include`` keeps everything else of the standard task (prompt, choices, metrics, and
   functions such as HellaSwag's ``process_docs``, which resolve next to the included file);
   :func:`standard_task_yaml` gives the path to put there. The splits: ARC-e and SciQ use
   train/validation/test, HellaSwag and PIQA train/validation (they report on validation),
   LAMBADA (``lambada_openai``) test only.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .lm_eval_model import (
    DEFAULT_BATCH_SIZE,
    INSTALL_HINT,
    MIN_LM_EVAL,
    MODEL_NAME,
    RMoELM,
    require_lm_eval,
)
from .lm_eval_tasks import (
    BUILTIN_TAG,
    BUILTIN_TASKS,
    DATA_VERSION,
    TASKS_DIR_ENV,
    builtin_task_dir,
    cloze_docs,
    multiple_choice_docs,
    pydoc_paragraphs,
)

__all__ = [
    "BUILTIN_TAG",
    "BUILTIN_TASKS",
    "DATA_VERSION",
    "DEFAULT_BATCH_SIZE",
    "INSTALL_HINT",
    "MIN_LM_EVAL",
    "MODEL_NAME",
    "TASKS_DIR_ENV",
    "RMoELM",
    "TaskResults",
    "TaskScore",
    "builtin_task_dir",
    "cloze_docs",
    "evaluate_tasks",
    "format_table",
    "include_paths",
    "multiple_choice_docs",
    "output_name",
    "parse_scores",
    "pydoc_paragraphs",
    "require_lm_eval",
    "run_lm_eval_cli",
    "standard_task_yaml",
    "task_manager",
]

log = logging.getLogger(__name__)


def include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The built-in task folder followed by the user's task folders (checked to exist)."""
    given = [] if include_path is None else include_path
    given = [given] if isinstance(given, (str, Path)) else list(given)
    paths = [builtin_task_dir()]
    for p in given:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"task include path {str(p)!r} is not a directory; give a folder of lm_eval "
                "task YAMLs"
            )
        paths.append(path.resolve())
    return paths


def task_manager(
    include_path: str | Path | Sequence[str | Path] | None = None,
    tasks: Sequence[str] | None = None,
) -> Any:
    """An lm_eval ``TaskManager`` that knows the built-in tasks and ``include_path``'s tasks.

    lm_eval's own tasks (about 15 000 YAMLs, more than 10 s to index) are indexed only when
    ``tasks`` is None or names something the built-in and included folders do not have.

    Raises:
        ValueError: lm_eval missing, or a task name found nowhere (with the nearest names).
        FileNotFoundError: an include path that is not a directory.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths(include_path)]
    wanted = [t for t in tasks or [] if not t.endswith((".yaml", ".yml"))]
    if tasks is not None:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in wanted):
            return local
    manager = TaskManager(include_path=paths)
    for name in wanted:
        if name not in manager.all_tasks:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f" (nearest: {', '.join(near)})" if near else ""
            raise ValueError(
                f"unknown lm_eval task {name!r}{hint}; built-in: {', '.join(BUILTIN_TASKS)} "
                f"(tag {BUILTIN_TAG}); local task YAMLs: --include-path DIR"
            )
    return manager


def standard_task_yaml(task: str) -> Path:
    """The YAML file of one of lm_eval's own tasks (e.g. ``arc_easy``): what a local task
    YAML's ``include:`` names to reuse it with local data (see the module docstring)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    # an Entry object (lm_eval >= 0.4.10) or a dict (older releases); -1 = a Python task
    path = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
    if path is None or path == -1:
        raise ValueError(f"lm_eval has no task YAML named {task!r}")
    return Path(path)


@dataclass
class TaskScore:
    """One metric of one task (or group).

    Attributes:
        task: the task's name.
        metric: the metric (``acc``, ``acc_norm``, ``perplexity``...), with ``,filter`` when
            the task's filter is not ``none``.
        value: the metric's value.
        stderr: its standard error (None when lm_eval gives none).
        samples: items evaluated (None when unknown, e.g. for a group).
    """

    task: str
    metric: str
    value: float
    stderr: float | None = None
    samples: int | None = None


@dataclass
class TaskResults:
    """What :func:`evaluate_tasks` returns.

    Attributes:
        scores: one row per (task, metric), tasks in lm_eval's order.
        results: lm_eval's result dict (``results``, ``configs``, ``versions``, ``n-shot``,
            ``n-samples``, ``config``...), without per-sample logs.
        settings: the run's settings (tasks, limit, num_fewshot, batch size, max length).
    """

    scores: list[TaskScore]
    results: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def by_task(self) -> dict[str, dict[str, float | None]]:
        """``{task: {metric: value, metric + "_stderr": stderr}}``."""
        out: dict[str, dict[str, float | None]] = {}
        for s in self.scores:
            out.setdefault(s.task, {})[s.metric] = s.value
            out[s.task][f"{s.metric}_stderr"] = s.stderr
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, scores by task, the table rows and lm_eval's results."""
        return {
            "settings": self.settings,
            "scores": self.by_task(),
            "table": [asdict(s) for s in self.scores],
            "lm_eval": _jsonable(self.results),
        }


def evaluate_tasks(
    model: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    tokenizer: str | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
) -> TaskResults:
    """Run lm_eval tasks on an rmoe model (``lm_eval.simple_evaluate`` with :class:`RMoELM`).

    Args:
        model: a run or model path, a :class:`rmoe.loading.Loaded`, or an :class:`RMoELM`.
        tasks: task, group or tag names (built-in, from ``include_path``, or lm_eval's).
        include_path: folder(s) of local task YAMLs.
        limit: items per task (a fraction when < 1; None = all).
        num_fewshot: few-shot examples (None = each task's default, 0 for the built-in ones).
        batch_size, device, tokenizer, max_length: see :class:`RMoELM` (ignored for an RMoELM).
        bootstrap_iters: resamples for the standard errors of non-mean metrics (perplexity);
            0 = no standard errors at all.

    Raises:
        ValueError: lm_eval missing, no or unknown tasks, bad limit.
        FileNotFoundError: no model at the path, or an include path that is not a folder.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate

    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError(f"no tasks given; e.g. {BUILTIN_TASKS[0]}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 (a count, or a fraction below 1), got {limit}")
    manager = task_manager(include_path, tasks)
    lm = model if isinstance(model, RMoELM) else RMoELM(
        pretrained=model, device=device, batch_size=batch_size, tokenizer=tokenizer,
        max_length=max_length,
    )  # fmt: skip
    with _quiet():
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
    results = dict(results or {})
    results.pop("samples", None)
    settings = {
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": lm.batch_size,
        "max_length": lm.max_length,
        "add_bos_token": lm.add_bos_token,
        "lm_eval": require_lm_eval().__version__,
    }
    return TaskResults(parse_scores(results), results, settings)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm_eval prints (bootstrap notices) and forks a process pool for bootstrapped standard
    errors: send its prints to the debug log and keep the bootstrap in this process."""
    buffer = io.StringIO()
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old
        if buffer.getvalue().strip():
            log.debug("lm_eval printed: %s", buffer.getvalue().strip())


def parse_scores(results: dict[str, Any]) -> list[TaskScore]:
    """The ``(task, metric, value, stderr)`` rows of lm_eval's ``results["results"]``."""
    counts = results.get("n-samples") or {}
    rows = []
    for task, metrics in (results.get("results") or {}).items():
        n = (counts.get(task) or {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in _NOT_METRICS or metric.endswith("_stderr") or not _is_number(value):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt in ("", "none") else key
            rows.append(
                TaskScore(
                    task, name, float(value), float(stderr) if _is_number(stderr) else None, n
                )
            )
    return rows


_NOT_METRICS = ("alias", "sample_len", "sample_count")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(scores: Sequence[TaskScore]) -> str:
    """The scores as an aligned text table: task, metric, value, stderr (and n)."""
    head = ("task", "metric", "value", "stderr", "n")
    rows = [
        (
            s.task,
            s.metric,
            _number(s.value),
            "–" if s.stderr is None else _number(s.stderr),
            "" if s.samples is None else str(s.samples),
        )
        for s in scores
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def _jsonable(obj: Any) -> Any:
    """``obj`` with everything strict JSON cannot hold made plain: numpy values as numbers,
    NaN and infinities as None, functions and other objects as their ``str``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


def output_name(tasks: Sequence[str], limit: int | float | None = None) -> str:
    """A file name for the results of ``tasks`` (``arc_easy+sciq.json``; ``...-limit8.json``
    with a limit)."""
    name = "+".join(
        re.sub(r"[^A-Za-z0-9_.-]", "_", Path(t).stem if t.endswith(".yaml") else t) for t in tasks
    )
    if len(name) > 120:
        name = name[:100] + f"+{len(tasks)}tasks"
    return name + (f"-limit{limit:g}" if limit is not None else "") + ".json"


def run_lm_eval_cli(argv: Sequence[str]) -> int:
    """lm_eval's command line (``lm_eval run ...`` / ``lm_eval ls tasks`` / legacy flags) with
    the ``rmoe`` model registered and the built-in tasks added to every ``TaskManager`` it
    builds (before ``--include_path``, which stays the user's). Returns the exit status."""
    require_lm_eval()
    import lm_eval.tasks as lm_tasks

    builtin = str(builtin_task_dir())
    original = lm_tasks.TaskManager

    class TaskManagerWithBuiltins(original):  # type: ignore[misc,valid-type]
        """lm_eval's TaskManager with rmoe's built-in task folder first on the include path."""

        def __init__(self, *args: Any, include_path: Any = None, **kwargs: Any) -> None:
            extra = [] if include_path is None else include_path
            extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
            super().__init__(*args, include_path=[builtin, *extra], **kwargs)

    from lm_eval import __main__ as lm_main

    saved_argv = sys.argv
    lm_tasks.TaskManager = TaskManagerWithBuiltins
    try:
        if getattr(lm_main, "TaskManager", None) is original:  # older lm_eval binds it at import
            lm_main.TaskManager = TaskManagerWithBuiltins
        sys.argv = ["lm-eval", *argv]
        lm_main.cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        lm_tasks.TaskManager = original
        if getattr(lm_main, "TaskManager", None) is TaskManagerWithBuiltins:
            lm_main.TaskManager = original
    return 0
