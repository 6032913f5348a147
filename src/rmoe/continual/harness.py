"""Continual-learning harness: train a sequence of tasks one after another and evaluate every task
after every stage.

::

    from rmoe.continual.harness import ContinualConfig, run_sequence
    from rmoe.continual.tasks import builtin_task
    from rmoe.loading import load_model
    from rmoe.training.sft import SFTConfig

    tasks = [builtin_task(n) for n in ("naming", "literal", "statement", "topic")]
    model, tok, _ = load_model("runs/base")
    res = run_sequence(model, tok, tasks,
                       ContinualConfig(method="migu", sft=SFTConfig(steps=150, lr=1e-3)),
                       out_dir="runs/cl/migu")
    print(res.metrics.average_accuracy, res.metrics.backward_transfer)

Methods (``ContinualConfig.method``; ``+`` combines, e.g. ``migu+replay``):

- ``plain``: sequential fine-tuning (SeqFT).
- ``migu``: MIGU gradient masking at ``migu_ratio`` on every stage but the first (the released
  code trains the first task unmasked; ``mask_first_task=True`` masks it too).
- ``random-mask``: the same number of rows masked at random (the control), same stages.
- ``replay``: a buffer of at most ``replay_size`` examples from the tasks already learned, shared
  equally between them (each task's share is a seeded random sample, re-drawn smaller as tasks
  are added); the buffer is mixed into the current task's training examples. Every method takes
  the same number of optimizer steps per stage, so replay costs no extra compute.

Each stage starts a fresh AdamW (as the MIGU code does per task). Accuracy is the exact match of
greedy answers (``ContinualConfig.metric="exact_match"``) or the cheaper teacher-forced exact
match (``"tf_exact_match"``). Before the first stage every task is evaluated once: that row is
the baseline of forward transfer (FWT). The accuracy matrix ``A[i, j]`` (after stage ``i``, task
``j``), AA, BWT, forgetting and FWT follow :mod:`rmoe.continual.metrics`.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from rmoe.continual.masking import masker_factory
from rmoe.continual.metrics import ContinualMetrics, continual_metrics, write_accuracy_matrix
from rmoe.continual.tasks import Task
from rmoe.data.examples import Example
from rmoe.formatting import fmt_number
from rmoe.training.sft import MIGU_NORMS, Flag, SFTConfig, evaluate_config, finetune, setting

log = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ContinualConfig",
    "ContinualResult",
    "ReplayBuffer",
    "compare_methods",
    "parse_method",
    "run_sequence",
    "write_comparison",
]

METHODS: tuple[str, ...] = ("plain", "migu", "random-mask", "replay")
"""Method components; combine with ``+`` (``migu+replay``)."""
METRICS: tuple[str, ...] = ("exact_match", "tf_exact_match")
"""Accuracy measures: greedy exact match, or teacher-forced exact match."""
RUN = "continual run"
"""The :class:`~rmoe.training.sft.Flag` group of the settings ``rmoe continual run`` shows."""


def parse_method(method: str) -> frozenset[str]:
    """``"migu+replay"`` -> ``{"migu", "replay"}``; validates the parts."""
    parts = frozenset(p.strip() for p in method.split("+") if p.strip())
    unknown = parts - set(METHODS)
    if not parts or unknown:
        import difflib

        bad = sorted(unknown)[0] if unknown else method
        near = difflib.get_close_matches(bad, METHODS, n=1)
        raise ValueError(
            f"unknown continual method {bad!r}; choose from {', '.join(METHODS)} (combine with "
            f"+, e.g. migu+replay)" + (f"; nearest: {near[0]!r}" if near else "")
        )
    if {"migu", "random-mask"} <= parts:
        raise ValueError("migu and random-mask are alternatives (random-mask is MIGU's control)")
    if "plain" in parts and len(parts) > 1:
        parts = parts - {"plain"}
    return parts


@dataclass
class ContinualConfig:
    """How to run a task sequence.

    Attributes:
        method: see the module docstring.
        sft: training options of every stage (steps, lr, batch...); its masking fields are
            overridden by ``method``.
        migu_ratio: masked fraction for ``migu`` and ``random-mask``.
        migu_norm: ``l1`` (paper) or ``raw`` (released code).
        mask_first_task: also mask the first stage.
        replay_size: buffer capacity (examples) for ``replay``.
        metric: ``exact_match`` (greedy) or ``tf_exact_match`` (teacher-forced, one forward).
        eval_limit: evaluate at most this many examples per task (0 = all).
    """

    method: str = "plain"
    sft: SFTConfig = field(default_factory=SFTConfig)
    migu_ratio: float = setting(0.7, Flag(RUN, "masked share (migu, random-mask)"))
    migu_norm: str = setting("l1", Flag(RUN, choices=MIGU_NORMS))
    mask_first_task: bool = setting(False, Flag(RUN, "also mask the first stage"))
    replay_size: int = setting(200, Flag(RUN, "replay buffer capacity"))
    metric: str = setting(
        "exact_match",
        Flag(RUN, "greedy exact match, or teacher-forced (one forward, no generation)", METRICS),
    )
    eval_limit: int = 0

    def validate(self) -> None:
        """Raise ValueError on bad values."""
        parse_method(self.method)
        if self.metric not in METRICS:
            raise ValueError(f"metric must be exact_match or tf_exact_match, got {self.metric!r}")
        if self.replay_size < 0:
            raise ValueError(f"replay_size must be >= 0, got {self.replay_size}")
        if not 0.0 <= self.migu_ratio <= 1.0:
            raise ValueError(f"migu_ratio must be in [0, 1], got {self.migu_ratio}")
        self.sft.validate()

    def stage_sft(self, stage: int) -> SFTConfig:
        """The :class:`SFTConfig` of stage ``stage`` (0-based)."""
        parts = parse_method(self.method)
        masked = stage > 0 or self.mask_first_task
        return replace(
            self.sft,
            migu_ratio=self.migu_ratio if "migu" in parts and masked else None,
            migu_norm=self.migu_norm,
            random_mask_ratio=self.migu_ratio if "random-mask" in parts and masked else None,
            seed=self.sft.seed + stage,
            eval_every=0,
        )


class ReplayBuffer:
    """At most ``capacity`` examples, shared equally among the tasks added so far.

    ``add(name, examples)`` stores a seeded random sample of ``examples`` and shrinks the
    earlier tasks' samples (keeping a prefix of each, so what is kept stays a random sample) to
    ``capacity // number_of_tasks`` each; the remainder goes to the earliest tasks.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"replay buffer capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self._rng = random.Random(seed)
        self._store: dict[str, list[Example]] = {}

    def add(self, name: str, examples: Sequence[Example]) -> None:
        """Add a task's examples (a random sample of them is kept)."""
        pool = list(examples)
        self._rng.shuffle(pool)
        self._store[name] = pool
        n = len(self._store)
        share, extra = divmod(self.capacity, n)
        for i, key in enumerate(self._store):
            self._store[key] = self._store[key][: share + (1 if i < extra else 0)]

    def examples(self) -> list[Example]:
        """All stored examples, task by task."""
        return [ex for items in self._store.values() for ex in items]

    def per_task(self) -> dict[str, int]:
        """How many examples each task has in the buffer."""
        return {k: len(v) for k, v in self._store.items()}

    def __len__(self) -> int:
        return sum(len(v) for v in self._store.values())


@dataclass
class ContinualResult:
    """Outcome of one task sequence.

    Attributes:
        method: the method string.
        task_names: tasks in training order.
        matrix: ``[T][T]`` accuracy after stage i on task j.
        loss_matrix: ``[T][T]`` teacher-forced answer loss after stage i on task j.
        baseline: accuracy of the starting model on each task (FWT baseline).
        baseline_loss: its answer loss on each task.
        metrics: AA, BWT, forgetting, FWT.
        loss_average: mean answer loss over all tasks after the last stage (lower is better).
        loss_backward_transfer: ``mean_{j<T-1} (L[T-1, j] - L[j, j])`` on the answer-loss
            matrix: how much the loss on earlier tasks grew by the end (positive = forgetting);
            graded where exact match has already dropped to 0.
        stages: per stage: steps, final training loss, replay buffer content, seconds.
        seconds: total wall time.
    """

    method: str
    task_names: list[str]
    matrix: list[list[float]]
    loss_matrix: list[list[float]]
    baseline: list[float]
    baseline_loss: list[float]
    metrics: ContinualMetrics
    loss_average: float = 0.0
    loss_backward_transfer: float | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = self.metrics.to_dict()
        return d


def _evaluate_all(
    model: nn.Module, tokenizer: Any, tasks: Sequence[Task], cfg: ContinualConfig
) -> tuple[list[float], list[float], dict[str, list[dict[str, str]]]]:
    accs, losses, preds = [], [], {}
    for task in tasks:
        examples = task.eval[: cfg.eval_limit] if cfg.eval_limit else task.eval
        res = evaluate_config(
            model,
            tokenizer,
            examples,
            cfg.sft,
            generate=cfg.metric == "exact_match",
            keep_predictions=5,
        )
        accs.append(float(res[cfg.metric]))
        losses.append(float(res["answer_loss"]))
        preds[task.name] = res.get("predictions", [])
    return accs, losses, preds


def run_sequence(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Task],
    cfg: ContinualConfig | None = None,
    out_dir: str | Path | None = None,
    on_stage: Callable[[int, dict[str, Any]], None] | None = None,
) -> ContinualResult:
    """Train ``tasks`` in order with ``cfg.method``; evaluate every task after every stage.

    The model is changed in place. With ``out_dir``, writes ``accuracy_matrix.{json,md,png}``,
    ``answer_loss_matrix.json``, ``result.json`` and ``predictions.json`` there.
    """
    cfg = cfg or ContinualConfig()
    cfg.validate()
    if len(tasks) < 1:
        raise ValueError("a continual-learning sequence needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    parts = parse_method(cfg.method)
    t0 = time.perf_counter()
    buffer = ReplayBuffer(cfg.replay_size, seed=cfg.sft.seed) if "replay" in parts else None

    base_acc, base_loss, _ = _evaluate_all(model, tokenizer, tasks, cfg)
    matrix: list[list[float]] = []
    loss_matrix: list[list[float]] = []
    stages: list[dict[str, Any]] = []
    predictions: dict[str, Any] = {}
    for i, task in enumerate(tasks):
        stage_cfg = cfg.stage_sft(i)
        replay = buffer.examples() if buffer is not None and len(buffer) else []
        train = list(task.train) + replay
        ts = time.perf_counter()
        res = finetune(model, tokenizer, train, None, stage_cfg, masker=masker_factory(stage_cfg))
        accs, losses, preds = _evaluate_all(model, tokenizer, tasks, cfg)
        matrix.append(accs)
        loss_matrix.append(losses)
        predictions[f"after_{task.name}"] = preds
        if buffer is not None:
            buffer.add(task.name, task.train)
        info = {
            "stage": i,
            "task": task.name,
            "steps": res.steps,
            "train_examples": len(train),
            "replayed_examples": len(replay),
            "masking": stage_cfg.method,
            "first_loss": res.losses[0] if res.losses else None,
            "last_loss": float(np.mean(res.losses[-10:])) if res.losses else None,
            "accuracy": dict(zip(names, accs)),
            "seconds": time.perf_counter() - ts,
        }
        if buffer is not None:
            info["buffer"] = buffer.per_task()
        stages.append(info)
        log.info(
            "%s: after %s: %s",
            cfg.method,
            task.name,
            ", ".join(f"{n}={a:.3f}" for n, a in zip(names, accs)),
        )
        if on_stage is not None:
            on_stage(i, info)

    result = ContinualResult(
        method=cfg.method,
        task_names=names,
        matrix=matrix,
        loss_matrix=loss_matrix,
        baseline=base_acc,
        baseline_loss=base_loss,
        metrics=continual_metrics(matrix, base_acc),
        loss_average=float(np.mean(loss_matrix[-1])),
        loss_backward_transfer=_loss_bwt(loss_matrix),
        stages=stages,
        seconds=time.perf_counter() - t0,
    )
    if out_dir is not None:
        _write_sequence(result, cfg, tasks, predictions, Path(out_dir))
    return result


def _write_sequence(
    result: ContinualResult,
    cfg: ContinualConfig,
    tasks: Sequence[Task],
    predictions: dict[str, Any],
    out: Path,
) -> None:
    """The files of one sequence: accuracy matrix (json, md, png), answer-loss matrix, result
    and predictions."""
    out.mkdir(parents=True, exist_ok=True)
    m = result.metrics
    write_accuracy_matrix(
        result.matrix,
        out,
        task_names=result.task_names,
        title=f"{cfg.method}: AA={m.average_accuracy:.3f} "
        f"BWT={fmt_number(m.backward_transfer, '+.3f')}",
        baseline=result.baseline,
    )
    losses = {
        "task_names": result.task_names,
        "matrix": result.loss_matrix,
        "baseline": result.baseline_loss,
    }
    (out / "answer_loss_matrix.json").write_text(json.dumps(losses, indent=2) + "\n")
    payload = {
        **result.to_dict(),
        "config": {**asdict(cfg), "sft": cfg.sft.to_dict()},
        "tasks": [t.summary() for t in tasks],
    }
    (out / "result.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "predictions.json").write_text(json.dumps(predictions, indent=2) + "\n")


def _loss_bwt(loss_matrix: Sequence[Sequence[float]]) -> float | None:
    a = np.asarray(loss_matrix, dtype=np.float64)
    if len(a) < 2:
        return None
    j = np.arange(len(a) - 1)
    return float((a[-1, j] - a[j, j]).mean())


def compare_methods(
    load: Callable[[], tuple[nn.Module, Any]],
    tasks: Sequence[Task],
    methods: Sequence[str],
    cfg: ContinualConfig,
    out_dir: str | Path,
    on_stage: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> dict[str, ContinualResult]:
    """Run the same sequence with each method from a freshly loaded model; write a summary.

    Args:
        load: returns ``(model, tokenizer)``, the same starting point on every call.
        methods: method strings (``plain``, ``migu``, ``random-mask``, ``replay``, ``a+b``).
        cfg: shared options; ``method`` is replaced per run.
        out_dir: ``<out_dir>/<method>/`` per method plus ``summary.{json,md}``.
    """
    for method in methods:
        parse_method(method)
    out = Path(out_dir)
    results: dict[str, ContinualResult] = {}
    for method in methods:
        model, tokenizer = load()
        results[method] = run_sequence(
            model,
            tokenizer,
            tasks,
            replace(cfg, method=method),
            out / method.replace("+", "_"),
            on_stage=None if on_stage is None else (lambda i, info, m=method: on_stage(m, i, info)),
        )
        write_comparison(results, out, tasks, cfg)
    return results


def write_comparison(
    results: dict[str, ContinualResult],
    out_dir: str | Path,
    tasks: Sequence[Task] = (),
    cfg: ContinualConfig | None = None,
) -> dict[str, Path]:
    """``summary.json`` and ``summary.md``: AA, BWT, forgetting, FWT per method."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {
        method: {
            **r.metrics.to_dict(),
            "loss_average": r.loss_average,
            "loss_backward_transfer": r.loss_backward_transfer,
            "seconds": r.seconds,
            "matrix": r.matrix,
            "loss_matrix": r.loss_matrix,
        }
        for method, r in results.items()
    }
    payload: dict[str, Any] = {"methods": rows}
    if tasks:
        payload["tasks"] = [t.summary() for t in tasks]
    if cfg is not None:
        payload["config"] = {**asdict(cfg), "sft": cfg.sft.to_dict()}
    (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "| method | AA | BWT | forgetting | FWT | final answer loss | loss BWT | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in results.items():
        m = r.metrics
        lines.append(
            f"| {method} | {m.average_accuracy:.3f} | {fmt_number(m.backward_transfer, '+.3f')} | "
            f"{fmt_number(m.forgetting, '+.3f')} | {fmt_number(m.forward_transfer, '+.3f')} | {r.loss_average:.3f} | "
            f"{fmt_number(r.loss_backward_transfer, '+.3f')} | {r.seconds / 60:.1f} |"
        )
    if results:
        names = next(iter(results.values())).task_names
        lines += [
            "",
            "Tasks in order: " + " -> ".join(names) + ". AA, BWT, forgetting, FWT on "
            "exact match; final answer loss = mean teacher-forced answer loss (nats/token) over "
            "all tasks after the last stage; loss BWT = mean growth of the answer loss on "
            "earlier tasks by the end (positive = forgetting).",
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return {"json": out / "summary.json", "markdown": out / "summary.md"}
