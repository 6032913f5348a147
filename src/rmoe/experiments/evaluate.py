"""Post-training evaluation of one arm on a fixed held-out slice, identical for every arm.

For each evaluation split the first `batches` x `batch_size` non-overlapping windows are scored
and the summed loss and token count of every batch are kept, so two arms can be compared batch
by batch (paired bootstrap, `rmoe.experiments.stats`). Routing statistics (inner/outer balance,
router entropy, binned cross-layer mutual information, from `rmoe.analysis.routing`) are computed
on the first `routing_tokens` tokens of the last split, with the expert-load MaxVio and the
share of assignments an evaluation capacity (`eval_capacity_factor`) dropped; from the training
log, the share the training capacity dropped and the final expert-bias range. When the spec's
`eval.tasks` names lm-evaluation-harness tasks, they are run last on the same model (windows of
the run's `seq_len`; `rmoe.integrations.lm_eval`) and their metrics stored under `tasks`, with
the `task_limit` they were computed at and the task names asked for (`tasks_requested`).

Run as a subprocess by the experiment runner:
    python -m rmoe.experiments.evaluate RUN_DIR --eval-json '{"batches": 16, ...}'
which writes RUN_DIR/arm_results.json and prints nothing. With `--tasks-only` it adds to an
existing arm_results.json the scores of the spec's tasks it lacks (`missing_tasks`; e.g. tasks
added to the spec after the run finished) and changes nothing else in it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import eval_windows, get_batch, get_corpus, get_split_tokens
from ..evaluation import batch_losses, window_batches
from ..loading import find_model_dir, load_model
from ..runtime import autocast_dtype, model_device, set_threads
from ..training.checkpoint import latest_checkpoint
from .spec import EvalSpec

RESULTS_FILE = "arm_results.json"


def checkpoint_step(run_dir: str | Path) -> int:
    """Step of the newest complete checkpoint of a run (0 if none)."""
    ck = latest_checkpoint(run_dir)
    return int(ck.name.split("-")[1]) if ck is not None else 0


def model_present(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a model `load_model` reads (a `config.json` with weights beside
    it). False for a run imported from a committed results folder, which has no checkpoints."""
    try:
        model_dir = find_model_dir(run_dir)
    except FileNotFoundError:
        return False
    return any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))


def _tasks_at_limit(results: dict[str, Any] | None, ev: EvalSpec) -> bool:
    """Whether `results` hold task scores computed with the spec's `task_limit`."""
    return bool(results) and "tasks" in results and results.get("task_limit") == ev.task_limit


def current_task_scores(
    results: dict[str, Any] | None, ev: EvalSpec
) -> dict[str, dict[str, float | None]]:
    """The task scores of an arm's results that answer the spec: its `tasks` when the spec asks
    for tasks and they were computed with the spec's `task_limit`, else ``{}``."""
    if not ev.tasks or not results or not _tasks_at_limit(results, ev):
        return {}
    return dict(results["tasks"] or {})


def missing_tasks(results: dict[str, Any] | None, ev: EvalSpec) -> list[str]:
    """The names of `ev.tasks` an arm's results have no scores for at the spec's `task_limit`,
    in the spec's order (``[]`` when the spec asks for no tasks). A name counts as scored when
    it was asked for (`tasks_requested`, which covers groups and tags, whose scores are stored
    under their tasks' names) or has scores of its own (results written before
    `tasks_requested` was recorded)."""
    if not ev.tasks:
        return []
    answered: set[str] = set()
    if results and _tasks_at_limit(results, ev):
        answered = set(results.get("tasks_requested") or []) | set(results["tasks"] or {})
    return [t for t in ev.tasks if t not in answered]


def read_metrics(run_dir: str | Path, corpus: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """metrics.jsonl split into training records and validation records (of `corpus`, default:
    the run's training corpus), one per step (a resumed run may have logged a step twice; the
    last record wins), sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    train: dict[int, dict[str, Any]] = {}
    valid: dict[int, dict[str, Any]] = {}
    if corpus is None:
        cfg_path = Path(run_dir) / "config.yaml"
        if cfg_path.is_file():
            import yaml

            corpus = (yaml.safe_load(cfg_path.read_text()) or {}).get("data", {}).get("corpus")
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if rec.get("split") == "valid":
                if corpus is None or rec.get("corpus") in (None, corpus):
                    valid[rec["step"]] = rec
            elif "loss" in rec:
                train[rec["step"]] = rec
    return {
        "train": [train[s] for s in sorted(train)],
        "valid": [valid[s] for s in sorted(valid)],
    }


@dataclass
class RoutingSample:
    """What the model routed on the routing tokens, per MoE layer.

    Attributes:
        probs: [N, E] router distributions (softmax, or sigmoid scores normalised to sum to 1).
        topk: [N, K] chosen experts.
        dropped: [N, K] bool assignments the (evaluation) capacity dropped, or None when the
            layer routes without a capacity.
    """

    probs: list[np.ndarray]
    topk: list[np.ndarray]
    dropped: list[np.ndarray | None]


@torch.no_grad()
def collect_routing(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    amp: torch.dtype | None = None,
) -> RoutingSample:
    """Per MoE layer: router probabilities [N, E], chosen experts [N, K] and dropped
    assignments on the first `max_tokens` input tokens (whole windows) of `tokens`."""
    device = model_device(model)
    n_windows = max(1, max_tokens // seq_len)
    batches = -(-n_windows // batch_size)
    probs: list[list[np.ndarray]] = []
    topk: list[list[np.ndarray]] = []
    dropped: list[list[np.ndarray | None]] = []
    seen = 0
    for starts in eval_windows(len(tokens), seq_len, batch_size, batches):
        starts = starts[: n_windows - seen]
        if starts.size == 0:
            break
        seen += starts.size
        x, _ = get_batch(tokens, starts, seq_len, device)
        ctx = torch.autocast(device.type, amp) if amp else nullcontext()
        with ctx:
            out = model(input_ids=x, use_cache=False, output_routing=True)
        if not probs:
            probs, topk, dropped = ([[] for _ in out.routing] for _ in range(3))
        for i, r in enumerate(out.routing):
            probs[i].append(r.probs.float().cpu().numpy())
            topk[i].append(r.topk_idx.cpu().numpy())
            d = getattr(r, "dropped", None)
            dropped[i].append(None if d is None else d.cpu().numpy())
    return RoutingSample(
        [np.concatenate(p) for p in probs],
        [np.concatenate(t) for t in topk],
        [_cat_dropped(d, t) for d, t in zip(dropped, topk)],
    )


def _cat_dropped(parts: list[np.ndarray | None], topk: list[np.ndarray]) -> np.ndarray | None:
    """One layer's dropped masks over all batches (False where a batch had no capacity), or
    None when no batch had one."""
    if all(d is None for d in parts):
        return None
    return np.concatenate(
        [np.zeros(t.shape, dtype=bool) if d is None else d for d, t in zip(parts, topk)]
    )


def load_summary(sample: RoutingSample, num_experts: int) -> dict[str, Any]:
    """Expert-load balance and token dropping of the routing tokens: per layer and averaged
    over layers, MaxVio = max_e load_e / mean load - 1 (Wang et al., arXiv 2408.15664; 0 =
    balanced) and the share of the N*K assignments the evaluation capacity dropped (None
    when dropless)."""
    from ..analysis.routing import expert_load  # lazy: scipy is the analysis extra

    vio = [expert_load(t, num_experts).max_violation for t in sample.topk]
    drop = [None if d is None else float(d.mean()) for d in sample.dropped]
    kept = [d for d in drop if d is not None]
    return {
        "layer_max_violation": vio,
        "max_violation": float(np.mean(vio)),
        "layer_dropped_share": drop,
        "dropped_share": float(np.mean(kept)) if kept else None,
    }


def training_routing(train_records: list[dict[str, Any]]) -> dict[str, float | None]:
    """What the trainer logged about the router stages (`layer_dropped`, `layer_bias_range`
    per MoE layer, see `rmoe.training.trainer`): the share of assignments the training
    capacity dropped, averaged over layers and logged steps (None when not logged), and the
    largest expert-bias range max_e b_e - min_e b_e over layers at the last logged step (None
    without an expert bias)."""
    dropped = [float(np.mean(r["layer_dropped"])) for r in train_records if r.get("layer_dropped")]
    ranges = [r["layer_bias_range"] for r in train_records if r.get("layer_bias_range")]
    return {
        "train_dropped_share": float(np.mean(dropped)) if dropped else None,
        "final_bias_range": float(max(ranges[-1])) if ranges else None,
    }


def throughput(train_records: list[dict[str, Any]]) -> float:
    """Median training tokens/s over logged records (the first record, which includes start-up,
    is skipped when there are others)."""
    vals = [r["tokens_per_s"] for r in train_records if "tokens_per_s" in r]
    if len(vals) > 1:
        vals = vals[1:]
    return float(statistics.median(vals)) if vals else float("nan")


def evaluate_arm(run_dir: str | Path, ev: EvalSpec, device: str = "auto") -> dict[str, Any]:
    """Evaluate a trained run on the fixed slice; returns the arm's results (see module doc)."""
    run_dir = Path(run_dir)
    model, tokenizer, run_cfg, amp = _load_run(run_dir, device)
    data_cfg = run_cfg.get("data", {})
    seq_len = int(data_cfg.get("seq_len", 256))
    corpus = get_corpus(
        data_cfg.get("corpus", "python-stdlib"), text_field=data_cfg.get("text_field", "text")
    )
    dev = model_device(model)
    res: dict[str, Any] = {"run_dir": str(run_dir), "step": checkpoint_step(run_dir), "splits": {}}
    split_tokens = {}
    for split in ev.splits:
        ts = get_split_tokens(corpus, tokenizer, split, cache_dir=data_cfg.get("cache_dir"))
        split_tokens[split] = ts
        batches = window_batches(ts.tokens, seq_len, ev.batch_size, ev.batches, dev)
        losses, counts = batch_losses(model, batches, amp)
        mean = sum(losses) / sum(counts)
        res["splits"][split] = {
            "loss": mean,
            "bpb": ts.bits_per_byte(mean),
            "tokens_per_byte": ts.tokens_per_byte,
            "batch_loss_sum": losses,
            "batch_tokens": counts,
        }
    if ev.routing_tokens > 0:
        ts = split_tokens[ev.splits[-1]]
        sample = collect_routing(model, ts.tokens, seq_len, ev.batch_size, ev.routing_tokens, amp)
        res["routing"] = None
        if sample.probs:
            from ..analysis.routing import routing_summary  # lazy: scipy is the analysis extra

            res["routing"] = routing_summary(sample.probs, sample.topk, ev.mi_bins)
            res["routing"].update(load_summary(sample, int(sample.probs[0].shape[1])))
    metrics = read_metrics(run_dir)
    res["tokens_per_s"] = throughput(metrics["train"])
    res["train_elapsed_s"] = metrics["train"][-1].get("elapsed_s") if metrics["train"] else None
    res["final_train_loss"] = metrics["train"][-1].get("lm_loss") if metrics["train"] else None
    res.update(training_routing(metrics["train"]))
    if ev.tasks:
        res["tasks"] = task_scores(model, tokenizer, ev, seq_len, amp)
        res["task_limit"] = ev.task_limit
        res["tasks_requested"] = list(ev.tasks)
    return res


def _load_run(
    run_dir: Path, device: str
) -> tuple[torch.nn.Module, Any, dict[str, Any], torch.dtype | None]:
    """A run's model, tokenizer, run config ({} when none) and autocast dtype; sets the run's
    torch threads."""
    model, tokenizer, run_cfg = load_model(run_dir, device)
    run_cfg = run_cfg or {}
    set_threads(int(run_cfg.get("train", {}).get("threads", 0) or 0))
    amp = autocast_dtype(run_cfg.get("train", {}).get("dtype", "auto"), model_device(model))
    return model, tokenizer, run_cfg, amp


def add_task_scores(run_dir: str | Path, ev: EvalSpec, device: str = "auto") -> dict[str, Any]:
    """A finished run's `arm_results.json` content with the scores of the tasks it lacks
    (`missing_tasks`) added: only those tasks are run, on the run's model; bits/byte, routing
    and everything else stay as they are. Scores computed with another `task_limit` are
    replaced by the spec's tasks at its limit.

    Raises:
        FileNotFoundError: no `arm_results.json`, or no model in `run_dir`.
    """
    run_dir = Path(run_dir)
    res = json.loads((run_dir / RESULTS_FILE).read_text())
    missing = missing_tasks(res, ev)
    if not missing:
        return res
    model, tokenizer, run_cfg, amp = _load_run(run_dir, device)
    seq_len = int(run_cfg.get("data", {}).get("seq_len", 256))
    kept = current_task_scores(res, ev)
    asked = list(res.get("tasks_requested") or kept) if _tasks_at_limit(res, ev) else []
    new = task_scores(model, tokenizer, replace(ev, tasks=missing), seq_len, amp)
    res["tasks"] = {**kept, **new}
    res["task_limit"] = ev.task_limit
    res["tasks_requested"] = asked + missing
    return res


def task_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    ev: EvalSpec,
    max_length: int,
    amp: torch.dtype | None = None,
) -> dict[str, dict[str, float | None]]:
    """The lm_eval metrics of `ev.tasks` on a loaded model (under autocast to `amp`, if given):
    ``{task: {metric: value, metric + "_stderr": stderr}}`` (e.g. ``{"rmoe_pydoc_mc":
    {"acc": 0.31, ...}}``)."""
    from ..integrations.lm_eval import RMoELM, evaluate_tasks

    lm = RMoELM.from_model(model, tokenizer, batch_size=ev.batch_size, max_length=max_length)
    include = ev.task_include or None
    with torch.autocast(model_device(model).type, amp) if amp else nullcontext():
        out = evaluate_tasks(lm, ev.tasks, include_path=include, limit=ev.task_limit)
    return out.by_task()


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: evaluate RUN_DIR (or, with --tasks-only, add the task scores its
    results lack) and write RUN_DIR/arm_results.json atomically."""
    p = argparse.ArgumentParser(prog="python -m rmoe.experiments.evaluate")
    p.add_argument("run_dir")
    p.add_argument("--eval-json", default="{}", help="EvalSpec fields as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--tasks-only",
        action="store_true",
        help="only add the scores of the spec's tasks that RUN_DIR/arm_results.json lacks",
    )
    args = p.parse_args(argv)
    ev = EvalSpec(**json.loads(args.eval_json))
    if args.tasks_only:
        res = add_task_scores(args.run_dir, ev, args.device)
    else:
        res = evaluate_arm(args.run_dir, ev, args.device)
    path = Path(args.run_dir) / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
