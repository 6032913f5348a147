"""Continual-learning and stability-gap metrics, with JSON / markdown / PNG writers.

Accuracy matrix. ``A[i, j]`` is the accuracy on task ``j`` after training stage ``i``
(``T x T``, tasks in training order, 0-based). Definitions (the paper notes' A7/C1 use the same
AA and BWT):

- average accuracy ``AA = (1/T) sum_j A[T-1, j]`` -- the mean of the last row (Lopez-Paz & Ranzato,
  "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, "ACC").
- backward transfer ``BWT = (1/(T-1)) sum_{j=0}^{T-2} (A[T-1, j] - A[j, j])`` -- how the final
  model does on each earlier task relative to just after learning it (Lopez-Paz & Ranzato 2017;
  negative means forgetting). The last task is excluded, as in the original.
- forward transfer ``FWT = (1/(T-1)) sum_{j=1}^{T-1} (A[j-1, j] - b_j)`` with ``b_j`` the accuracy
  of the untrained model on task ``j`` (Lopez-Paz & Ranzato 2017); only with a baseline.
- forgetting ``F = (1/(T-1)) sum_{j=0}^{T-2} f_j`` with
  ``f_j = max_{i in 0..T-2} A[i, j] - A[T-1, j]`` -- the drop from the best accuracy ever
  reached on task ``j`` before the last stage (Chaudhry et al., "Riemannian Walk for Incremental
  Learning", ECCV 2018, eq. for ``f_j^k`` at ``k = T``; the max runs over all earlier stages, as
  there).

BWT, FWT and forgetting are undefined for one task and returned as ``None``.

Stability gap. A curve of ``(step, value)`` evaluations during continual training (De Lange et
al., ICLR 2023; Guo et al., arXiv 2406.14833 observe a temporary drop then recovery). With
``higher_is_better=False`` (a loss) "bad" means up; with True (an accuracy) it means down. The
deviation ``d(s) = value(s) - initial`` taken in the bad direction (positive = worse) gives:
initial value, worst value and its step, dip depth ``max(0, max_s d(s))``, the first step after
the worst at which the curve is back at the initial level (``d <= tolerance``; ``None`` if never),
steps to recover (that step minus the first step; 0 when there is no dip), the area of the
positive part of ``d`` over step (exact for the piecewise-linear curve, i.e. the trapezoid rule
with the zero crossings interpolated), and the final value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rmoe.formatting import fmt_number

__all__ = [
    "ContinualMetrics",
    "StabilityGap",
    "accuracy_markdown",
    "average_accuracy",
    "backward_transfer",
    "continual_metrics",
    "forgetting",
    "forward_transfer",
    "new_figure",
    "plot_stability_curves",
    "stability_gap",
    "write_accuracy_matrix",
]

ArrayLike = np.ndarray | Sequence[Sequence[float]]


def _matrix(acc: ArrayLike) -> np.ndarray:
    """Validate and return the accuracy matrix as float64 ``[T, T]``."""
    a = np.asarray(acc, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
        raise ValueError(
            f"accuracy matrix must be square T x T with A[i, j] = accuracy on task j after "
            f"stage i, got shape {a.shape}; fix: evaluate every task after every stage"
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(
            "accuracy matrix has NaN/inf entries; fix: fill every (stage, task) cell, including "
            "tasks not trained yet (their accuracy before training)"
        )
    return a


def average_accuracy(acc: ArrayLike) -> float:
    """AA: mean accuracy over all tasks after the last stage (mean of ``A[T-1, :]``)."""
    a = _matrix(acc)
    return float(a[-1].mean())


def backward_transfer(acc: ArrayLike) -> float | None:
    """BWT: ``mean_{j<T-1} (A[T-1, j] - A[j, j])``; ``None`` for a single task."""
    a = _matrix(acc)
    t = a.shape[0]
    if t < 2:
        return None
    j = np.arange(t - 1)
    return float((a[-1, j] - a[j, j]).mean())


def _per_task_forgetting(a: np.ndarray) -> np.ndarray:
    """``f_j = max_{i<T-1} A[i, j] - A[T-1, j]`` for ``j < T-1``: ``[T-1]``."""
    return a[:-1, :-1].max(axis=0) - a[-1, :-1]


def forgetting(acc: ArrayLike) -> float | None:
    """Average forgetting (Chaudhry et al. 2018): ``mean_{j<T-1} f_j``; ``None`` for one task."""
    a = _matrix(acc)
    if a.shape[0] < 2:
        return None
    return float(_per_task_forgetting(a).mean())


def forward_transfer(acc: ArrayLike, baseline: Sequence[float]) -> float | None:
    """FWT: ``mean_{j>=1} (A[j-1, j] - baseline[j])``; ``None`` for a single task.

    Args:
        acc: ``[T, T]`` accuracy matrix.
        baseline: ``[T]`` accuracy of the model before any continual stage on each task.
    """
    a = _matrix(acc)
    b = np.asarray(baseline, dtype=np.float64)
    if b.shape != (a.shape[0],):
        raise ValueError(
            f"baseline must have one accuracy per task, shape ({a.shape[0]},), got {b.shape}"
        )
    if a.shape[0] < 2:
        return None
    j = np.arange(1, a.shape[0])
    return float((a[j - 1, j] - b[j]).mean())


@dataclass(frozen=True)
class ContinualMetrics:
    """Summary of an accuracy matrix; see the module docstring for the definitions."""

    num_tasks: int
    average_accuracy: float
    backward_transfer: float | None
    forgetting: float | None
    per_task_forgetting: list[float]
    forward_transfer: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def continual_metrics(acc: ArrayLike, baseline: Sequence[float] | None = None) -> ContinualMetrics:
    """AA, BWT, forgetting (and FWT when ``baseline`` is given) of a ``[T, T]`` matrix."""
    a = _matrix(acc)
    return ContinualMetrics(
        num_tasks=a.shape[0],
        average_accuracy=average_accuracy(a),
        backward_transfer=backward_transfer(a),
        forgetting=forgetting(a),
        per_task_forgetting=[float(x) for x in _per_task_forgetting(a)] if len(a) > 1 else [],
        forward_transfer=None if baseline is None else forward_transfer(a, baseline),
    )


@dataclass(frozen=True)
class StabilityGap:
    """Dip-and-recovery statistics of one evaluation curve (module docstring has definitions)."""

    higher_is_better: bool
    initial_step: float
    initial_value: float
    worst_step: float
    worst_value: float
    dip_depth: float
    recovery_step: float | None
    steps_to_recover: float | None
    gap_area: float
    final_step: float
    final_value: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _curve(steps: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if s.ndim != 1 or v.shape != s.shape or s.size < 1:
        raise ValueError(
            f"steps and values must be 1-D of equal non-zero length, got {s.shape} and {v.shape}"
        )
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(v))):
        raise ValueError("steps and values must be finite; fix: drop evaluations that failed")
    if np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing; fix: sort the curve by step")
    return s, v


def _positive_area(s: np.ndarray, d: np.ndarray) -> float:
    """Integral over ``s`` of ``max(d, 0)`` for the piecewise-linear ``d``."""
    area = 0.0
    for i in range(len(s) - 1):
        d0, d1, dx = d[i], d[i + 1], s[i + 1] - s[i]
        if d0 >= 0 and d1 >= 0:
            area += 0.5 * (d0 + d1) * dx
        elif d0 > 0 > d1:
            area += 0.5 * d0 * dx * d0 / (d0 - d1)
        elif d1 > 0 > d0:
            area += 0.5 * d1 * dx * d1 / (d1 - d0)
    return float(area)


def stability_gap(
    steps: Sequence[float],
    values: Sequence[float],
    *,
    higher_is_better: bool = False,
    initial: float | None = None,
    tolerance: float = 0.0,
) -> StabilityGap:
    """Measure the dip of an evaluation curve below its starting level and its recovery.

    Args:
        steps: ``[S]`` strictly increasing training steps (or tokens) of the evaluations.
        values: ``[S]`` the metric at those steps.
        higher_is_better: False for a loss (bad = up), True for an accuracy (bad = down).
        initial: reference level; default ``values[0]`` (the evaluation before training).
        tolerance: a value within ``tolerance`` of ``initial`` on the bad side counts as
            recovered.

    Returns:
        :class:`StabilityGap`.
    """
    s, v = _curve(steps, values)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    ref = float(v[0]) if initial is None else float(initial)
    if not math.isfinite(ref):
        raise ValueError(f"initial must be finite, got {initial}")
    bad = -1.0 if higher_is_better else 1.0
    d = bad * (v - ref)  # [S], positive = worse than the initial level
    worst = int(np.argmax(d))
    depth = max(0.0, float(d[worst]))
    if depth == 0.0:
        recovery: float | None = float(s[0])
    else:
        later = np.nonzero(d[worst + 1 :] <= tolerance)[0]
        recovery = float(s[worst + 1 + later[0]]) if later.size else None
    return StabilityGap(
        higher_is_better=higher_is_better,
        initial_step=float(s[0]),
        initial_value=ref,
        worst_step=float(s[worst]),
        worst_value=float(v[worst]),
        dip_depth=depth,
        recovery_step=recovery,
        steps_to_recover=None if recovery is None else recovery - float(s[0]),
        gap_area=_positive_area(s, d),
        final_step=float(s[-1]),
        final_value=float(v[-1]),
    )


# ---------------------------------------------------------------------- writers
def _task_names(t: int, task_names: Sequence[str] | None) -> list[str]:
    if task_names is None:
        return [f"task{j}" for j in range(t)]
    names = [str(n) for n in task_names]
    if len(names) != t:
        raise ValueError(f"task_names must name all {t} tasks, got {len(names)}: {names}")
    return names


def accuracy_markdown(
    acc: ArrayLike, task_names: Sequence[str] | None = None, *, digits: int = 3
) -> str:
    """Markdown table of ``A`` (rows: after stage i; columns: tasks) followed by AA/BWT/F."""
    a = _matrix(acc)
    names = _task_names(a.shape[0], task_names)
    m = continual_metrics(a)
    spec = f".{digits}f"
    lines = [
        "| after stage | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for i, row in enumerate(a):
        cells = " | ".join(f"{x:.{digits}f}" for x in row)
        lines.append(f"| {i} ({names[i]}) | {cells} |")
    lines += [
        "",
        f"- average accuracy (AA): {fmt_number(m.average_accuracy, spec)}",
        f"- backward transfer (BWT): {fmt_number(m.backward_transfer, spec)}",
        f"- forgetting (F): {fmt_number(m.forgetting, spec)}",
    ]
    return "\n".join(lines) + "\n"


def new_figure(size: tuple[float, float]):  # -> matplotlib.figure.Figure
    """A figure on the Agg canvas, without pyplot (no global backend or figure state); the
    accuracy-matrix and stability-curve plots here and :mod:`rmoe.continual.gap` draw on it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(
            "plotting needs matplotlib; fix: pip install 'rmoe[analysis]' (or matplotlib)"
        ) from err
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def write_accuracy_matrix(
    acc: ArrayLike,
    out_dir: str | Path,
    *,
    task_names: Sequence[str] | None = None,
    stem: str = "accuracy_matrix",
    title: str | None = None,
    baseline: Sequence[float] | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.json`` (matrix, names, metrics), ``<stem>.md`` and ``<stem>.png`` (heat map).

    Returns:
        ``{"json": path, "markdown": path, "png": path}``.
    """
    a = _matrix(acc)
    names = _task_names(a.shape[0], task_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = continual_metrics(a, baseline)
    paths = {
        "json": out / f"{stem}.json",
        "markdown": out / f"{stem}.md",
        "png": out / f"{stem}.png",
    }
    payload = {"task_names": names, "matrix": a.tolist(), "metrics": metrics.to_dict()}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    header = f"# {title}\n\n" if title else ""
    paths["markdown"].write_text(header + accuracy_markdown(a, names))

    t = a.shape[0]
    fig = new_figure((1.2 + 0.9 * t, 1.0 + 0.8 * t))
    ax = fig.subplots()
    image = ax.imshow(a, cmap="viridis", aspect="equal")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_xticks(range(t), names, rotation=45, ha="right")
    ax.set_yticks(range(t), [f"after {n}" for n in names])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training stage")
    mid = (a.min() + a.max()) / 2
    for i in range(t):
        for j in range(t):
            color = "black" if a[i, j] > mid else "white"
            ax.text(j, i, f"{a[i, j]:.2f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_title(
        title
        or f"AA={metrics.average_accuracy:.3f}  BWT={fmt_number(metrics.backward_transfer, '.3f')}"
    )
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    return paths


def plot_stability_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    ylabel: str = "value",
    xlabel: str = "step",
    higher_is_better: bool = False,
    title: str | None = None,
) -> Path:
    """Plot evaluation curves with each curve's initial level (dashed) and worst point (dot).

    Args:
        curves: ``{label: (steps [S], values [S])}``.
        path: output PNG path (parent folders are created).
        higher_is_better: direction used to locate the worst point.

    Returns:
        The PNG path.
    """
    if not curves:
        raise ValueError("plot_stability_curves needs at least one curve {label: (steps, values)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = new_figure((6.4, 4.0))
    ax = fig.subplots()
    for label, (steps, values) in curves.items():
        s, v = _curve(steps, values)
        gap = stability_gap(s, v, higher_is_better=higher_is_better)
        (line,) = ax.plot(s, v, label=label)
        ax.axhline(gap.initial_value, color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.plot([gap.worst_step], [gap.worst_value], "o", color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out
