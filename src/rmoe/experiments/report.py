"""Aggregate an experiment's runs into results.json, summary.md and PNG plots.

Tables: the arms' settings (router variant, the keys it sets, the arm's `set:` overrides); one
row per (arm, depth) with bits per byte on each evaluation split as mean ± std over seeds,
parameters, FLOPs/token, training tokens/s and the routing statistics (inner balance IB, outer
balance OB, mean router entropy, binned cross-layer MI, expert-load MaxVio, and the dropped share
when an arm evaluates with a capacity). Paired differences: each arm minus the reference family
at the same sweep setting on the same evaluation batches, per seed and averaged over seeds, with
a bootstrap interval over evaluation batches and the seed-level t interval and TOST verdict
(`rmoe.experiments.stats`). With a sweep, a Tuning table shows each family's setting chosen on
`compare.select_on`; the Comparisons table gives each family at its chosen setting against the
reference at its own on `compare.report_on`, with the verdict at the stated margin
(`rmoe.experiments.compare`). When the spec's `eval.tasks` names lm-evaluation-harness tasks, the
per-arm table gets one `metric/task` column per task metric (`acc/rmoe_pydoc_mc`, ...; mean ±
std over seeds; only scores computed with the spec's `task_limit` count), and runs whose results
lack some of the tasks are listed under it (`task_missing`), with whether their model is here to
compute them (a run imported from a results folder has none). The plots are drawn by
`rmoe.experiments.plots`.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..formatting import fmt_number
from .compare import choose_settings, compare_families, comparison_table, tuning_table
from .evaluate import RESULTS_FILE, current_task_scores, missing_tasks, model_present
from .plan import ArmRun, format_settings
from .plots import plot_bpb_vs_depth, plot_loss_curves, plot_router_curves, plot_routing
from .runner import STATUS_FILE, run_dir_of
from .spec import EvalSpec, ExperimentSpec
from .stats import mean_std, paired_bootstrap, tost_verdict

ROUTING_KEYS = (
    "inner_balance",
    "outer_balance",
    "entropy",
    "mi_mean",
    "mi_adjacent",
    "max_violation",
    "dropped_share",
)
TRAINING_KEYS = ("train_dropped_share", "final_bias_range")


def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version and GPU (if any) of this machine."""
    import os

    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_avg"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def load_run_results(out_dir: str | Path, runs: list[ArmRun]) -> list[dict[str, Any]]:
    """Per run: its plan summary plus `arm_results.json` (if present) and training status."""
    rows = []
    for r in runs:
        d = run_dir_of(out_dir, r)
        row: dict[str, Any] = r.summary()
        row["results"] = None
        if (d / RESULTS_FILE).is_file():
            row["results"] = json.loads((d / RESULTS_FILE).read_text())
        if (d / STATUS_FILE).is_file():
            row["train_status"] = json.loads((d / STATUS_FILE).read_text())
        rows.append(row)
    return rows


def _fmt(v: float | None, digits: int = 4) -> str:
    return fmt_number(v, f".{digits}f", missing="–")


def _pm(m: float, s: float, n: int, digits: int = 4) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def _missing(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _si(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def aggregate(spec: ExperimentSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-(arm, depth) table rows, paired differences against the reference family (at the
    same sweep setting), the tuning choices and the seed-level comparisons (`compare`).

    Returns {"arms", "paired", "tuning", "comparisons"}, and "task_metrics" (the
    `metric/task` keys of the arms' task columns) when the spec evaluates tasks.
    """
    splits = list(spec.eval.splits)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["arm"], row["depth"])].append(row)
    arms = []
    for (arm, depth), members in groups.items():
        done = [m for m in members if m["results"]]
        entry: dict[str, Any] = {
            "arm": arm,
            "family": members[0].get("family") or arm,
            "setting": members[0].get("setting") or "",
            "label": members[0]["label"],
            "router": members[0]["router"],
            "settings": members[0].get("settings", {}),
            "depth": depth,
            "match": members[0]["match"],
            "seeds": [m["seed"] for m in done],
            "seeds_planned": [m["seed"] for m in members],
            "max_steps": members[0]["max_steps"],
            "steps_done": [m["results"]["step"] for m in done],
            "tokens_per_step": members[0]["tokens_per_step"],
            "total_params": members[0]["total_params"],
            "active_params": members[0]["active_params"],
            "router_params": members[0]["router_params"],
            "flops_per_token": members[0]["flops_per_token"],
            "train_flops": members[0]["train_flops"],
        }
        for split in splits:
            m, s = mean_std([d["results"]["splits"][split]["bpb"] for d in done])
            entry[f"{split}_bpb_mean"], entry[f"{split}_bpb_std"] = m, s
        entry["tokens_per_s_mean"], entry["tokens_per_s_std"] = mean_std(
            [d["results"]["tokens_per_s"] for d in done]
        )
        for key in TRAINING_KEYS:
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std(
                [d["results"].get(key) for d in done]
            )
        for key in ROUTING_KEYS:
            vals = [d["results"]["routing"].get(key) for d in done if d["results"].get("routing")]
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std(vals)
        for key, task, metric in task_metric_keys(rows, spec.eval) if spec.eval.tasks else []:
            vals = [
                current_task_scores(d["results"], spec.eval).get(task, {}).get(metric) for d in done
            ]
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([v for v in vals if v is not None])
        arms.append(entry)

    paired = _paired(spec, groups, rows)
    order = {a.name: i for i, a in enumerate(spec.arms)}
    arms.sort(key=lambda e: (e["depth"], order.get(e["arm"], 99)))
    paired.sort(key=lambda e: (e["depth"], order.get(e["arm"], 99), splits.index(e["split"])))
    tuning = choose_settings(spec, rows)
    out = {
        "arms": arms,
        "paired": paired,
        "tuning": tuning,
        "comparisons": compare_families(spec, rows, tuning),
    }
    if spec.eval.tasks:
        out["task_metrics"] = [key for key, _, _ in task_metric_keys(rows, spec.eval)]
    return out


def task_metric_keys(
    rows: list[dict[str, Any]], ev: EvalSpec | None = None
) -> list[tuple[str, str, str]]:
    """``(metric/task, task, metric)`` of every task metric in the runs' results (the
    `tasks` of `arm_results.json`; with `ev`, only scores computed at its `task_limit`), in
    the order first seen; standard errors left out."""
    keys: dict[str, tuple[str, str, str]] = {}
    for row in rows:
        results = row.get("results") or {}
        scores = current_task_scores(results, ev) if ev else results.get("tasks") or {}
        for task, metrics in scores.items():
            for metric in metrics:
                if not metric.endswith("_stderr"):
                    keys.setdefault(f"{metric}/{task}", (f"{metric}/{task}", task, metric))
    return list(keys.values())


def task_gaps(
    spec: ExperimentSpec, runs: list[ArmRun], out_dir: str | Path, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The finished runs whose results lack some of the spec's tasks (`missing_tasks`):
    ``{"run_id", "tasks": [...], "model": whether the run folder holds its model}``, in run
    order; ``[]`` when the spec asks for no tasks."""
    if not spec.eval.tasks:
        return []
    gaps = []
    for run, row in zip(runs, rows):
        missing = missing_tasks(row["results"], spec.eval) if row["results"] else []
        if missing:
            present = model_present(run_dir_of(out_dir, run))
            gaps.append({"run_id": run.run_id, "tasks": missing, "model": present})
    return gaps


def _task_gap_lines(gaps: list[dict[str, Any]]) -> list[str]:
    """The note under the per-arm table on the runs whose task scores are missing ("–")."""
    reasons = {
        False: "whose model is not here (e.g. results imported without checkpoints; retrain "
        "them, or bring back their checkpoints, to compute them)",
        True: "whose task evaluation did not finish (rerun the experiment to compute them)",
    }
    lines = []
    for has_model, why in reasons.items():
        runs = [
            f"`{g['run_id']}` ({', '.join(g['tasks'])})" for g in gaps if g["model"] == has_model
        ]
        if runs:
            lines += [
                f"Task scores missing (–) for {len(runs)} run(s) {why}: {'; '.join(runs)}.",
                "",
            ]
    return lines


def _paired(
    spec: ExperimentSpec,
    groups: dict[tuple[str, int], list[dict[str, Any]]],
    rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Each (arm, depth, split) minus the reference family's arm at the same sweep setting:
    per-seed and pooled batch bootstraps, the seed std and the seed-level TOST verdict."""
    paired: list[dict[str, Any]] = []
    if not spec.reference:
        return paired
    ref_rows = {
        (r.get("setting") or "", r["depth"], r["seed"]): r
        for r in rows
        if (r.get("family") or r["arm"]) == spec.reference and r["results"]
    }
    for (arm, depth), members in groups.items():
        if (members[0].get("family") or arm) == spec.reference:
            continue
        setting = members[0].get("setting") or ""
        pairs = [
            (m, ref_rows[(setting, depth, m["seed"])])
            for m in members
            if m["results"] and (setting, depth, m["seed"]) in ref_rows
        ]
        for split in spec.eval.splits if pairs else []:
            a = [m["results"]["splits"][split] for m, _ in pairs]
            b = [ref["results"]["splits"][split] for _, ref in pairs]
            per_seed = [
                {
                    "seed": m["seed"],
                    **paired_bootstrap(
                        x["batch_loss_sum"],
                        y["batch_loss_sum"],
                        x["batch_tokens"],
                        x["tokens_per_byte"],
                        spec.eval.bootstrap,
                        seed=m["seed"],
                    ).to_dict(),
                }
                for (m, _), x, y in zip(pairs, a, b, strict=True)
            ]
            pooled = paired_bootstrap(
                [x["batch_loss_sum"] for x in a],
                [y["batch_loss_sum"] for y in b],
                a[0]["batch_tokens"],
                a[0]["tokens_per_byte"],
                spec.eval.bootstrap,
            )
            diffs = [q["diff"] for q in per_seed]
            verdict = tost_verdict(diffs, spec.compare.margin, spec.compare.alpha)
            paired.append(
                {
                    "arm": arm,
                    "label": members[0]["label"],
                    "depth": depth,
                    "split": split,
                    "reference": spec.reference,
                    "reference_arm": pairs[0][1]["arm"],
                    "per_seed": per_seed,
                    "mean_over_seeds": pooled.to_dict(),
                    "seed_std": mean_std(diffs)[1],
                    "seed_level": verdict.to_dict(),
                }
            )
    return paired


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------
def summary_markdown(
    spec: ExperimentSpec,
    agg: dict[str, Any],
    rows: list[dict[str, Any]],
    machine: dict[str, Any],
    command: str,
    plots: list[str],
) -> str:
    """The experiment's summary.md."""
    lines = _header_lines(spec, rows, machine, command)
    lines += _settings_table(spec, rows)
    lines += _arms_table(spec, agg)
    if spec.sweep and agg.get("tuning"):
        lines += tuning_table(spec, agg["tuning"])
    if agg.get("comparisons"):
        lines += comparison_table(spec, agg["comparisons"])
    if agg["paired"]:
        lines += _paired_table(spec, agg)
    lines += _budget_table(rows)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if spec.notes:
        lines += ["## Notes", "", spec.notes.strip(), ""]
    return "\n".join(lines)


def _header_lines(
    spec: ExperimentSpec, rows: list[dict[str, Any]], machine: dict[str, Any], command: str
) -> list[str]:
    splits = spec.eval.splits
    lines = [f"# Experiment `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description, ""]
    lines += [
        f"- command: `{command}`",
        f"- written: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; torch {machine.get('torch', '?')}",
        f"- evaluation: first {spec.eval.batches} x {spec.eval.batch_size} windows of each of "
        f"{', '.join(splits)}; routing statistics on {spec.eval.routing_tokens} tokens of "
        f"{splits[-1]}; {spec.eval.bootstrap} bootstrap resamples over evaluation batches",
    ]
    done = sum(1 for r in rows if r["results"])
    return lines + [f"- runs finished: {done}/{len(rows)}", ""]


def _settings_table(spec: ExperimentSpec, rows: list[dict[str, Any]]) -> list[str]:
    """One row per arm: its router variant, the model keys the variant sets and the arm's own
    `set:` overrides (which win), so every arm's configuration is on the page."""
    first = {}
    for r in rows:
        first.setdefault(r["arm"], r)
    lines = [
        "## Arms",
        "",
        "| arm | router | variant sets | `set:` |",
        "|---|---|---|---|",
    ]
    for arm in spec.arms:
        row = first.get(arm.name, {})
        preset = format_settings(row.get("preset") or {})
        settings = format_settings(row.get("settings", arm.set) or {})
        lines.append(
            f"| {arm.label or arm.name} | `{arm.router}` | {preset or '–'} | {settings or '–'} |"
        )
    return lines + [""]


def _arms_table(spec: ExperimentSpec, agg: dict[str, Any]) -> list[str]:
    splits = spec.eval.splits
    lines = ["## Results per arm", ""]
    head = ["arm", "L", "seeds", "steps"] + [f"{s} bpb" for s in splits]
    head += [
        "params",
        "FLOPs/tok",
        "tok/s",
        "IB",
        "OB",
        "entropy",
        "MI (all pairs)",
        "MI (adjacent)",
        "MaxVio",
    ]
    # the training log has a dropped share for every run (0 when dropless): shown when > 0;
    # the eval dropped share and the bias range exist only for arms that set them
    optional = [
        (key, title, digits)
        for key, title, digits, least in (
            ("train_dropped_share", "dropped (train)", 3, 0.0),
            ("dropped_share", "dropped (eval)", 3, -1.0),
            ("final_bias_range", "bias range", 4, -1.0),
        )
        if any(e[f"{key}_mean"] > least for e in agg["arms"])  # NaN > x is False
    ]
    head += [title for _, title, _ in optional]
    tasks = agg.get("task_metrics") or []
    head += tasks
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in agg["arms"]:
        n = len(e["seeds"])
        cells = [e["label"], str(e["depth"]), f"{n}/{len(e['seeds_planned'])}", str(e["max_steps"])]
        cells += [_pm(e[f"{s}_bpb_mean"], e[f"{s}_bpb_std"], n) for s in splits]
        cells += [
            _si(e["total_params"]),
            _si(e["flops_per_token"]),
            _fmt(e["tokens_per_s_mean"], 0),
            _pm(e["inner_balance_mean"], e["inner_balance_std"], n, 2),
            _pm(e["outer_balance_mean"], e["outer_balance_std"], n, 3),
            _pm(e["entropy_mean"], e["entropy_std"], n, 3),
            _pm(e["mi_mean_mean"], e["mi_mean_std"], n, 3),
            _pm(e["mi_adjacent_mean"], e["mi_adjacent_std"], n, 3),
            _pm(e["max_violation_mean"], e["max_violation_std"], n, 3),
        ]
        cells += [_pm(e[f"{k}_mean"], e[f"{k}_std"], n, digits) for k, _, digits in optional]
        cells += [_pm(e[f"{k}_mean"], e[f"{k}_std"], len(e["seeds"]), 3) for k in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "bpb: bits per byte on the fixed evaluation slice (mean ± std over seeds). FLOPs/tok: "
        "forward matmul FLOPs per token incl. the router (`count_config`). IB = median top1/top2 "
        "router probability, OB = median summed top-k probability, entropy = mean router "
        "entropy over all experts (nats), MI = binned cross-layer mutual information of the "
        "routing profiles (nats; paper recipe, 100 bins), all averaged over layers. For a "
        "sigmoid router the probabilities are its scores normalised to sum to one. MaxVio = "
        "max expert load / mean load - 1 on the routing tokens (0 = balanced; Loss-Free "
        "Balancing's metric). Shown when an arm has them: dropped = share of assignments the "
        "capacity dropped (train: `capacity_factor`, mean over the logged steps; eval: "
        "`eval_capacity_factor`, on the routing tokens); bias range = max - min of a layer's "
        "expert bias at the end of training (largest over layers).",
        "",
    ]
    if tasks:
        limit = spec.eval.task_limit
        lines += [
            "metric/task: lm-evaluation-harness metrics of `eval.tasks` "
            f"({'the first ' + str(limit) if limit else 'all'} items of each task, zero-shot "
            "unless the task sets few-shot examples; acc_norm = log-likelihood normalised by "
            "the choice's length in bytes; `rmoe.integrations.lm_eval`), mean ± std over seeds.",
            "",
        ]
    return lines + _task_gap_lines(agg.get("task_missing") or [])


def _paired_table(spec: ExperimentSpec, agg: dict[str, Any]) -> list[str]:
    c = spec.compare
    lvl = f"{100 * (1 - c.alpha):g}%"
    ref = f"`{spec.reference}`" + (" at the same setting" if spec.sweep else "")
    lines = [
        f"## Paired differences to `{spec.reference}` (bits per byte; negative = better)",
        "",
        f"Every arm against {ref}, on every split.",
        "",
        "| arm | L | split | per seed: diff [95% CI] | mean over seeds [95% CI] | seed std "
        f"| CI excludes 0 | seeds: {lvl} t-interval | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in agg["paired"]:
        ps = "; ".join(
            f"s{q['seed']}: {q['diff']:+.4f} [{q['lo']:+.4f}, {q['hi']:+.4f}]"
            for q in p["per_seed"]
        )
        m = p["mean_over_seeds"]
        excl = "yes" if (m["lo"] > 0 or m["hi"] < 0) else "no"
        v = p["seed_level"]
        t_int = "–" if _missing(v["lo"]) else f"[{v['lo']:+.4f}, {v['hi']:+.4f}]"
        lines.append(
            f"| {p['label']} | {p['depth']} | {p['split']} | {ps} | "
            f"{m['diff']:+.4f} [{m['lo']:+.4f}, {m['hi']:+.4f}] | {_fmt(p['seed_std'])} | {excl} "
            f"| {t_int} | {v['verdict']} |"
        )
    lines += [
        "",
        "Intervals are percentile bootstraps over evaluation batches (the same batches for "
        "both arms); they reflect evaluation noise, not training-seed noise — compare the "
        "difference with the seed std and with the reference arm's own spread. The seed-level "
        f"t-interval ({lvl}, n − 1 df over the per-seed differences) and the verdict (margin "
        f"±{c.margin:g} bits/byte, α = {c.alpha:g}) are defined under Comparisons.",
        "",
    ]
    return lines


def _budget_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Budget",
        "",
        "| run | match | steps | tokens | train FLOPs | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        st = (r.get("train_status") or {}).get("status", "not finished")
        lines.append(
            f"| {r['run_id']} | {r['match']} | {r['max_steps']} | "
            f"{_si(r['max_steps'] * r['tokens_per_step'])} | {_si(r['train_flops'])} | {st} |"
        )
    return lines + [""]


def write_report(
    spec: ExperimentSpec, runs: list[ArmRun], out_dir: str | Path, command: str = ""
) -> dict[str, Any]:
    """Write results.json, summary.md and the PNG plots into `out_dir`; return results.json's
    content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = load_run_results(out, runs)
    agg = aggregate(spec, rows)
    gaps = task_gaps(spec, runs, out, rows)
    if gaps:
        agg["task_missing"] = gaps
    machine = machine_info()
    plots = []
    if any(r["results"] for r in rows):
        plots.append(plot_loss_curves(out, rows, spec).name)
        plots.append(plot_router_curves(out, rows, spec).name)
        if agg["arms"] and any(
            not math.isnan(e[f"{spec.eval.splits[-1]}_bpb_mean"]) for e in agg["arms"]
        ):
            plots.append(plot_bpb_vs_depth(out, agg["arms"], spec).name)
            if any(not math.isnan(e["inner_balance_mean"]) for e in agg["arms"]):
                plots.append(plot_routing(out, agg["arms"], spec).name)
    for r in rows:  # keep results.json small: batch arrays stay in each run's arm_results.json
        if r["results"]:
            r["results"] = {k: v for k, v in r["results"].items() if k not in ("splits",)} | {
                "splits": {
                    s: {k: v for k, v in d.items() if not k.startswith("batch_")}
                    for s, d in r["results"]["splits"].items()
                }
            }
    result = {
        "spec": spec.to_dict(),
        "command": command,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "runs": rows,
        **agg,
        "plots": plots,
    }
    (out / "results.json").write_text(
        json.dumps(_clean(result), indent=1, default=_json_default, allow_nan=False)
    )
    (out / "summary.md").write_text(summary_markdown(spec, agg, rows, machine, command, plots))
    return result


def _clean(o: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
