"""Stability-gap statistics from a run's evaluation curves (``metrics.jsonl``).

A run started with ``--init-from`` and a dense evaluation schedule (``train.eval_log_points``)
records, at each evaluation, one line per evaluated corpus::

    {"step": 12, "split": "valid", "corpus": "pydoc-topics", "valid_loss": 1.93, ...}

:func:`read_eval_curves` collects them per corpus; :func:`gap_report` measures each curve with
:func:`rmoe.continual.metrics.stability_gap` (on the validation loss, so "worse" is up): the
initial value (step 0, before any update), the worst value and its step, the dip depth (how far
the loss rose above its starting value), the step at which it came back to the starting value
and the steps that took, the area of the excursion above the start, and the final value; plus
``mean_loss`` (the area under the whole curve divided by its step range -- lower is better,
the summary of how fast the domain was learned), ``best_value`` and ``rebound`` (the largest rise
above the best value reached so far: the transient bump of a curve that falls overall). Corpora are labelled
``new`` and ``old`` from the derived corpus's manifest (:mod:`rmoe.continual.cpt`) when there is
one. :func:`write_gap_report` writes ``gap.json``, ``gap.md`` and ``gap.png``;
:func:`compare_gap_reports` puts several runs side by side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rmoe.continual.metrics import new_figure, stability_gap

__all__ = [
    "compare_gap_reports",
    "corpus_labels",
    "max_rebound",
    "curve_mean",
    "gap_report",
    "read_eval_curves",
    "write_gap_report",
]


def read_eval_curves(
    run_dir: str | Path, metric: str = "valid_loss"
) -> dict[str, tuple[list[int], list[float]]]:
    """``{corpus: (steps, values)}`` from the evaluation records of ``metrics.jsonl``.

    Steps are sorted; a step evaluated twice (a resumed run) keeps the last record.

    Raises:
        FileNotFoundError: no metrics.jsonl.
        ValueError: no evaluation records with ``metric``, or a curve without step 0 and at
            least two later evaluations (not a stability-gap run).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {run_dir} a training run directory?")
    curves: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if metric not in rec or rec.get("split", "valid") != "valid":
            continue
        corpus = str(rec.get("corpus", "valid"))
        curves.setdefault(corpus, {})[int(rec["step"])] = float(rec[metric])
    if not curves:
        raise ValueError(
            f"{path} has no evaluation records with {metric!r}; train with "
            "--set train.eval_log_points=16 (and data.extra_eval for the old domain)"
        )
    for corpus, d in curves.items():
        steps = sorted(d)
        if len(steps) < 3 or steps[0] != 0:
            raise ValueError(
                f"{run_dir} is not a continual-pre-training run with a stability-gap curve: "
                f"{corpus!r} was evaluated at steps {steps[:6]}, and the gap needs the loss at "
                "step 0 and at several steps after it; train from the base model with "
                "--init-from BASE --set train.eval_log_points=16 (or rmoe continual cpt-demo)"
            )
    return {c: (sorted(d), [d[s] for s in sorted(d)]) for c, d in curves.items()}


def curve_mean(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under the curve divided by its step range (the value for one point)."""
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.size == 1:
        return float(v[0])
    return float(np.sum((v[1:] + v[:-1]) * np.diff(s)) / 2.0 / (s[-1] - s[0]))


def max_rebound(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """Largest rise of a loss curve above its best value so far: ``(rise, step)``.

    ``max_t (v_t - min_{s <= t} v_s)``: a transient instability of a curve that falls overall
    (a dip-and-recovery that never goes above the starting value has ``dip_depth`` 0 but a
    positive rebound). ``(0.0, steps[0])`` for a curve that never rises.
    """
    v = np.asarray(values, dtype=np.float64)
    rise = v - np.minimum.accumulate(v)
    i = int(np.argmax(rise))
    return float(rise[i]), float(steps[i])


def corpus_labels(run_dir: str | Path) -> dict[str, str]:
    """``{corpus spec: "new" | "old"}`` from the run's derived-corpus manifest and config."""
    run = Path(run_dir)
    labels: dict[str, str] = {}
    manifest = run / "cpt_manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        labels[m["derived_corpus"]] = "new"
        if m.get("new_corpus"):
            labels[m["new_corpus"]] = "new"
        if m.get("old_corpus"):
            labels[m["old_corpus"]] = "old"
        return labels
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        raw = yaml.safe_load(cfg.read_text()) or {}
        data = raw.get("data") or {}
        if data.get("corpus"):
            labels[data["corpus"]] = "new"
        for spec in data.get("extra_eval") or []:
            labels.setdefault(spec, "old")
    return labels


def gap_report(
    run_dir: str | Path, tolerance: float = 0.0, metric: str = "valid_loss"
) -> dict[str, Any]:
    """Stability-gap statistics of every evaluated corpus of a run.

    Returns:
        ``{"run": str, "curves": {label: {"corpus", "steps", "values", **StabilityGap,
        "mean_loss", "best_value", "best_step"}}}`` with ``label`` ``new`` / ``old`` where known,
        else the corpus spec.
    """
    curves = read_eval_curves(run_dir, metric)
    labels = corpus_labels(run_dir)
    out: dict[str, Any] = {"run": str(run_dir), "metric": metric, "curves": {}}
    for corpus, (steps, values) in curves.items():
        label = labels.get(corpus, corpus)
        if label in out["curves"]:
            label = corpus
        gap = stability_gap(steps, values, higher_is_better=False, tolerance=tolerance)
        best = int(np.argmin(values))
        rebound, rebound_step = max_rebound(steps, values)
        out["curves"][label] = {
            "corpus": corpus,
            **gap.to_dict(),
            "rebound": rebound,
            "rebound_step": rebound_step,
            "recovered_share": (gap.worst_value - gap.final_value) / gap.dip_depth
            if gap.dip_depth > 0
            else None,
            "mean_loss": curve_mean(steps, values),
            "best_value": float(values[best]),
            "best_step": int(steps[best]),
            "steps": steps,
            "values": values,
        }
    return out


_COLUMNS = [
    ("initial_value", "start", "{:.4f}"),
    ("worst_value", "worst", "{:.4f}"),
    ("worst_step", "worst step", "{:.0f}"),
    ("dip_depth", "dip depth", "{:.4f}"),
    ("steps_to_recover", "steps to recover", "{:.0f}"),
    ("gap_area", "gap area", "{:.3f}"),
    ("recovered_share", "recovered share", "{:.2f}"),
    ("rebound", "rebound", "{:.4f}"),
    ("mean_loss", "mean loss (AUC/steps)", "{:.4f}"),
    ("final_value", "final", "{:.4f}"),
]


def _cell(value: Any, fmt: str, key: str = "") -> str:
    if value is None:
        return "never" if key == "steps_to_recover" else "-"
    return fmt.format(value)


def _table(rows: Sequence[tuple[str, str, dict[str, Any]]]) -> list[str]:
    head = "| run | curve | " + " | ".join(c[1] for c in _COLUMNS) + " |"
    lines = [head, "|---|---|" + "---:|" * len(_COLUMNS)]
    for run, label, c in rows:
        cells = " | ".join(_cell(c.get(k), f, k) for k, _, f in _COLUMNS)
        lines.append(f"| {run} | {label} | {cells} |")
    return lines


_NOTE = (
    "Validation loss (nats/token) at log-spaced steps; step 0 is the starting model. dip depth ="
    " max(0, worst - start): how far the loss rose above its starting value; steps to recover ="
    " first step after the worst point back at or below the start ('never' if it did not);"
    " gap area = area of the curve above the start; recovered share = (worst - final) / dip depth;"
    " rebound = largest rise above the best value so"
    " far (a transient bump of a falling curve); mean loss = area under the curve / steps."
)


def write_gap_report(
    run_dir: str | Path, out_dir: str | Path | None = None, tolerance: float = 0.0
) -> dict[str, Path]:
    """Write ``gap.json``, ``gap.md`` and ``gap.png`` (one panel per curve) for one run."""
    report = gap_report(run_dir, tolerance)
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "gap.json", "markdown": out / "gap.md", "png": out / "gap.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    name = Path(run_dir).name
    rows = [(name, label, c) for label, c in report["curves"].items()]
    paths["markdown"].write_text(
        f"# Stability gap: {name}\n\n" + "\n".join(_table(rows)) + f"\n\n{_NOTE}\n"
    )
    _plot({name: report}, paths["png"])
    return paths


def compare_gap_reports(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    tolerance: float = 0.0,
) -> dict[str, Path]:
    """Side-by-side stability-gap table and curves of several runs (``gap_compare.*``)."""
    if not run_dirs:
        raise ValueError("compare_gap_reports needs at least one run directory")
    names = list(names) if names else [Path(r).name for r in run_dirs]
    if len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} runs")
    reports = {n: gap_report(r, tolerance) for n, r in zip(names, run_dirs)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "gap_compare.json",
        "markdown": out / "gap_compare.md",
        "png": out / "gap_compare.png",
    }
    paths["json"].write_text(json.dumps(reports, indent=2) + "\n")
    labels = sorted({lb for r in reports.values() for lb in r["curves"]}, key=_label_order)
    rows = [
        (n, lb, reports[n]["curves"][lb])
        for lb in labels
        for n in names
        if lb in reports[n]["curves"]
    ]
    paths["markdown"].write_text(
        "# Stability gap: side by side\n\n" + "\n".join(_table(rows)) + f"\n\n{_NOTE}\n"
    )
    _plot(reports, paths["png"])
    return paths


def _label_order(label: str) -> tuple[int, str]:
    return ({"new": 0, "old": 1}.get(label, 2), label)


def _plot(reports: dict[str, dict[str, Any]], path: Path) -> None:
    labels = sorted({lb for r in reports.values() for lb in r["curves"]}, key=_label_order)
    fig = new_figure((5.2 * len(labels), 3.8))
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    for ax, label in zip(axes, labels):
        for name, report in reports.items():
            c = report["curves"].get(label)
            if c is None:
                continue
            steps = np.asarray(c["steps"], dtype=np.float64)
            x = np.maximum(steps, 0.5)  # step 0 on a log axis
            (line,) = ax.plot(x, c["values"], marker=".", label=name)
            ax.axhline(c["initial_value"], color=line.get_color(), linestyle=":", linewidth=0.8)
            ax.plot([max(c["worst_step"], 0.5)], [c["worst_value"]], "o", color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("step (log; 0 drawn at 0.5)")
        ax.set_ylabel("validation loss")
        title = {"new": "new domain", "old": "old domain"}.get(label, label)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
