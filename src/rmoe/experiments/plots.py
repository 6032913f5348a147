"""The experiment's PNG plots: loss curves, bits per byte vs depth, routing statistics."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .evaluate import read_metrics
from .runner import run_dir_of
from .spec import ExperimentSpec


# ----------------------------------------------------------------------------------------------
def _smooth(y: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or y.size < k:
        return y
    return np.convolve(y, np.ones(k) / k, mode="valid")


def plot_loss_curves(out_dir: Path, rows: list[dict[str, Any]], spec: ExperimentSpec) -> Path:
    """Training loss vs tokens and vs training FLOPs, one line per run (colour = arm, style =
    seed), plus validation bits per byte where the trainer evaluated during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a.name for a in spec.arms]
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for row in rows:
        m = read_metrics(run_dir_of(out_dir, _Run(row)))
        tr = m["train"]
        if not tr:
            continue
        tokens = np.array([r["tokens"] for r in tr], dtype=float)
        loss = np.array([r.get("lm_loss", r["loss"]) for r in tr], dtype=float)
        k = max(1, len(loss) // 25)
        ys = _smooth(loss, k)
        xs = tokens[len(tokens) - len(ys) :]
        seeds = sorted({r["seed"] for r in rows if r["arm"] == row["arm"]})
        style = styles[seeds.index(row["seed"]) % len(styles)]
        depths = sorted({r["depth"] for r in rows})
        label = f"{row['label']} s{row['seed']}" + (f" L{row['depth']}" if len(depths) > 1 else "")
        kw = dict(color=colours[row["arm"]], ls=style, lw=1.2, label=label)
        axes[0].plot(xs, ys, **kw)
        axes[1].plot(xs * 3 * row["flops_per_token"], ys, **kw)
        va = m["valid"]
        if va:
            axes[2].plot(
                [v["step"] * row["tokens_per_step"] for v in va],
                [v["valid_bpb"] for v in va],
                marker="o",
                ms=3,
                **kw,
            )
    axes[0].set(xlabel="training tokens", ylabel="training LM loss (nats, smoothed)")
    axes[1].set(xlabel="training FLOPs (3 x forward, matmuls)", ylabel="training LM loss")
    axes[2].set(xlabel="training tokens", ylabel="validation bits/byte (trainer evals)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # runs without a training log draw no line
        axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{spec.name}: loss curves")
    fig.tight_layout()
    path = out_dir / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bpb_vs_depth(out_dir: Path, table: list[dict[str, Any]], spec: ExperimentSpec) -> Path:
    """Bits per byte (last evaluation split) vs depth per arm, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = spec.eval.splits[-1]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in table:
        by_arm[e["arm"]].append(e)
    depths = sorted({e["depth"] for e in table})
    n_arms = max(1, len(by_arm))
    for i, es in enumerate(by_arm.values()):
        es = sorted(es, key=lambda e: e["depth"])
        jitter = (i - (n_arms - 1) / 2) * 0.08 * (depths[-1] - depths[0] + 1) / max(1, len(depths))
        ax.errorbar(
            [e["depth"] + jitter for e in es],
            [e[f"{split}_bpb_mean"] for e in es],
            yerr=[e[f"{split}_bpb_std"] for e in es],
            marker="o",
            capsize=3,
            label=es[0]["label"],
        )
    ax.set(xlabel="layers", ylabel=f"{split} bits/byte (mean ± std over seeds)")
    ax.set_xticks(depths)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{spec.name}: bits/byte vs depth")
    fig.tight_layout()
    path = out_dir / "bpb_vs_depth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_routing(out_dir: Path, table: list[dict[str, Any]], spec: ExperimentSpec) -> Path:
    """Bar charts of IB, OB, mean router entropy, cross-layer MI and the expert-load MaxVio per
    arm (deepest depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = max(e["depth"] for e in table)
    es = [e for e in table if e["depth"] == depth]
    keys = [
        ("inner_balance", "IB (median top1/top2)"),
        ("outer_balance", "OB (median top-k mass)"),
        ("entropy", "mean router entropy (nats)"),
        ("mi_mean", "cross-layer MI (nats)"),
        ("max_violation", "MaxVio (max load / mean - 1)"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4))
    x = np.arange(len(es))
    for ax, (key, title) in zip(axes, keys):
        ax.bar(
            x,
            [e[f"{key}_mean"] for e in es],
            yerr=[e[f"{key}_std"] for e in es],
            capsize=3,
            color=[plt.cm.tab10(i % 10) for i in range(len(es))],
        )
        ax.set_xticks(x)
        ax.set_xticklabels([e["label"] for e in es], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{spec.name}: routing statistics at {depth} layers")
    fig.tight_layout()
    path = out_dir / "routing.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


ROUTER_CURVES = (
    ("layer_logit_std", "router-logit std"),
    ("layer_entropy", "normalised router entropy H / ln E"),
)
"""Per-layer training-log keys drawn by `plot_router_curves`, with their axis labels."""


def plot_router_curves(out_dir: Path, rows: list[dict[str, Any]], spec: ExperimentSpec) -> Path:
    """How sharp each run's router is over training: for each key of `ROUTER_CURVES`, the
    mean over MoE layers (left) and the first and last MoE layer (right) vs training step, from
    the per-layer stats the trainer logs. Colour = arm, line style = seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a.name for a in spec.arms]
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(len(ROUTER_CURVES), 2, figsize=(13, 4 * len(ROUTER_CURVES)))
    for row in rows:
        logs = [r for r in read_metrics(run_dir_of(out_dir, _Run(row)))["train"]]
        for (key, label), (ax_mean, ax_ends) in zip(ROUTER_CURVES, axes):
            pts = [(r["step"], r[key]) for r in logs if r.get(key)]
            if not pts:
                continue
            steps = np.array([p[0] for p in pts], dtype=float)
            per_layer = np.array([p[1] for p in pts], dtype=float)
            seeds = sorted({r["seed"] for r in rows if r["arm"] == row["arm"]})
            kw = dict(color=colours[row["arm"]], ls=styles[seeds.index(row["seed"]) % 4], lw=1.1)
            ax_mean.plot(steps, per_layer.mean(1), label=f"{row['label']} s{row['seed']}", **kw)
            ax_ends.plot(steps, per_layer[:, 0], alpha=0.5, **kw)
            ax_ends.plot(steps, per_layer[:, -1], **kw)
            ax_mean.set(xlabel="step", ylabel=f"{label}, mean over layers")
            ax_ends.set(xlabel="step", ylabel=f"{label}: first (faint) and last layer")
    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{spec.name}: router sharpness during training")
    fig.tight_layout()
    path = out_dir / "router_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _Run:
    """Adapter so `run_dir_of` accepts a results row."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.run_id = row["run_id"]
