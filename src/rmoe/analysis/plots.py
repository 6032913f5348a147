"""Figure writers for the analysis report (matplotlib, Agg, no pyplot state).

Each function draws one figure from plain arrays, writes it to ``path`` (parent folders are
created; the format follows the suffix, PNG for the report) and returns the path. Figures are
built on :class:`matplotlib.figure.Figure` directly, so nothing touches pyplot's global figure
registry or the process-wide backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rmoe.analysis._arrays import ArrayLike, to_numpy
from rmoe.analysis.routing import EntropySummary

__all__ = [
    "plot_entropy_histograms",
    "plot_heatmap",
    "plot_layer_curves",
    "plot_load_bars",
    "plot_matrix_grid",
    "plot_rank_counts",
    "plot_scatter_grid",
]

_DPI = 110


def _new_figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    return out


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def _matrix(x: ArrayLike, name: str) -> np.ndarray:
    m = to_numpy(x, np.float64, name)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix; got shape {m.shape}")
    return m


def _tick_labels(ax, labels: Sequence[str] | None, n: int, axis: str) -> None:
    if labels is None:
        return
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} {axis} labels for {n} rows/columns; pass one per row")
    ticks = np.arange(n)
    if axis == "x":
        ax.set_xticks(ticks, labels=list(labels), rotation=90, fontsize=7)
    else:
        ax.set_yticks(ticks, labels=list(labels), fontsize=7)


def plot_heatmap(
    path: str | Path,
    matrix: ArrayLike,
    title: str = "",
    labels: Sequence[str] | None = None,
    second: ArrayLike | None = None,
    second_title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    colorbar_label: str = "",
    annotate: bool = False,
) -> Path:
    """Heat map of a matrix, or two side by side on one colour scale (e.g. SMoE vs RMoE).

    Args:
        path: output file (PNG).
        matrix: [R, C] values (e.g. an L×L MI matrix or an E×E similarity matrix).
        title: title of the (first) panel.
        labels: optional R tick labels used on both axes of square matrices.
        second: optional [R', C'] matrix drawn to the right with the same colour scale.
        second_title: title of the second panel.
        vmin, vmax: colour limits (default: joint min/max of the panels).
        cmap: matplotlib colour map name.
        colorbar_label: label of the shared colour bar.
        annotate: write each value in its cell (for small matrices).
    """
    mats = [_matrix(matrix, "matrix")]
    titles = [title]
    if second is not None:
        mats.append(_matrix(second, "second"))
        titles.append(second_title)
    finite = np.concatenate([m[np.isfinite(m)] for m in mats])
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    fig = _new_figure(4.6 * len(mats) + 0.8, 4.2)
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    image = None
    for ax, m, t in zip(axes, mats, titles):
        image = ax.imshow(m, vmin=lo, vmax=hi, cmap=cmap, interpolation="nearest")
        ax.set_title(t, fontsize=10)
        if labels is not None and m.shape[0] == m.shape[1]:
            _tick_labels(ax, labels, m.shape[0], "x")
            _tick_labels(ax, labels, m.shape[0], "y")
        if annotate:
            mid = (lo + hi) / 2
            for (i, j), v in np.ndenumerate(m):
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if v > mid else "white",
                )
    fig.colorbar(image, ax=list(axes), shrink=0.85, label=colorbar_label)
    return _save(fig, path)


def plot_entropy_histograms(
    path: str | Path,
    entropies: Sequence[ArrayLike] | Sequence[EntropySummary],
    num_experts: int,
    bins: int = 50,
    layer_names: Sequence[str] | None = None,
    title: str = "Router entropy per layer",
    second: Sequence[ArrayLike] | Sequence[EntropySummary] | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> Path:
    """One entropy histogram per layer (density over tokens), x axis [0, ln E].

    Args:
        path: output file (PNG).
        entropies: per layer, either [N] per-token entropies (nats) or an
            :class:`~rmoe.analysis.routing.EntropySummary` (its stored histogram is drawn).
        num_experts: E (sets the x range [0, ln E], marked by a dashed line).
        bins: bins for raw entropies.
        layer_names: one label per layer (default "layer i").
        title: figure title.
        second: optional same-length sequence for a second model, overlaid.
        names: legend names of the two models when ``second`` is given.
    """
    n_layers = len(entropies)
    if n_layers == 0:
        raise ValueError("entropies is empty; pass one array or EntropySummary per layer")
    if second is not None and len(second) != n_layers:
        raise ValueError(f"second has {len(second)} layers but entropies has {n_layers}")
    names_ = (
        list(layer_names) if layer_names is not None else [f"layer {i}" for i in range(n_layers)]
    )
    if len(names_) != n_layers:
        raise ValueError(f"got {len(names_)} layer_names for {n_layers} layers")
    h_max = math.log(num_experts) if num_experts > 1 else 1.0
    rows, cols = _grid(n_layers)
    fig = _new_figure(3.0 * cols, 2.2 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    series = [entropies] if second is None else [entropies, second]
    for i in range(n_layers):
        ax = axes[i]
        for s, item in enumerate(series):
            h = item[i]
            if isinstance(h, EntropySummary):
                counts, edges = h.hist_counts, h.hist_edges
            else:
                values = np.clip(to_numpy(h, np.float64, "entropies").ravel(), 0.0, h_max)
                counts, edges = np.histogram(values, bins=bins, range=(0.0, h_max))
            total = max(counts.sum(), 1)
            density = counts / (total * np.diff(edges))
            label = names[s] if second is not None else None
            ax.stairs(density, edges, fill=second is None, alpha=0.7, label=label)
        ax.axvline(h_max, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(names_[i], fontsize=9)
        ax.tick_params(labelsize=7)
        if second is not None and i == 0:
            ax.legend(fontsize=7)
    for ax in axes[n_layers:]:
        ax.set_visible(False)
    fig.suptitle(f"{title} (nats; dashed: ln E)", fontsize=10)
    return _save(fig, path)


def plot_load_bars(
    path: str | Path,
    counts: Sequence[ArrayLike],
    layer_names: Sequence[str] | None = None,
    title: str = "Expert load per layer",
    second: Sequence[ArrayLike] | None = None,
    names: tuple[str, str] = ("A", "B"),
) -> Path:
    """Bar chart of tokens per expert for each layer, with the balanced level as a dashed line.

    Args:
        path: output file (PNG).
        counts: per layer, [E] assignment counts (``LoadStats.counts``).
        layer_names: one label per layer (default "layer i").
        title: figure title.
        second: optional per-layer [E'] counts of a second model, drawn as bars next to the
            first (as shares of the layer's assignments, so models with different token counts
            compare); missing layers are left empty.
        names: legend names of the two models when ``second`` is given.
    """
    n_layers = len(counts)
    if n_layers == 0:
        raise ValueError("counts is empty; pass one [E] count vector per layer")
    if second is not None and len(second) > n_layers:
        n_layers = len(second)
    names_ = (
        list(layer_names) if layer_names is not None else [f"layer {i}" for i in range(n_layers)]
    )
    if len(names_) != n_layers:
        raise ValueError(f"got {len(names_)} layer_names for {n_layers} layers")
    rows, cols = _grid(n_layers)
    fig = _new_figure(3.0 * cols, 2.0 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    series = [counts] if second is None else [counts, second]
    width = 0.9 / len(series)
    for i, (ax, name) in enumerate(zip(axes, names_)):
        for s, item in enumerate(series):
            if i >= len(item):
                continue
            v = to_numpy(item[i], np.float64, "counts").ravel()
            if second is not None:
                v = v / max(v.sum(), 1.0)
            x = np.arange(v.size) + (s - (len(series) - 1) / 2) * width
            label = names[s] if second is not None else None
            ax.bar(x, v, width=width, label=label)
            ax.axhline(v.mean(), color="black", linestyle="--", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        if second is not None and i == 0:
            ax.legend(fontsize=7)
    for ax in axes[n_layers:]:
        ax.set_visible(False)
    unit = " (share of assignments" if second is not None else " ("
    fig.suptitle(f"{title}{unit}; dashed: balanced)", fontsize=10)
    return _save(fig, path)


def plot_rank_counts(
    path: str | Path,
    counts: ArrayLike | Sequence[ArrayLike],
    titles: Sequence[str] | None = None,
    title: str = "Expert output-norm rank vs router-score rank",
    max_cols: int = 4,
) -> Path:
    """Heat map(s) of norm-rank vs score-rank count matrices (rank 1 = largest).

    Args:
        path: output file (PNG).
        counts: one [E, E] matrix C[r_norm, r_score] (from
            :func:`~rmoe.analysis.experts.norm_score_rank_counts`) or a sequence (e.g. per layer).
        titles: one panel title per matrix.
        title: figure title.
        max_cols: panels per row.
    """
    arr = counts if not isinstance(counts, (list, tuple)) else None
    if arr is not None and to_numpy(arr, name="counts").ndim == 2:
        mats = [_matrix(arr, "counts")]
    elif arr is not None:
        mats = [_matrix(m, "counts") for m in to_numpy(arr, np.float64, "counts")]
    else:
        mats = [_matrix(m, "counts") for m in counts]
    if not mats:
        raise ValueError("counts is empty; pass an [E, E] count matrix or a list of them")
    titles_ = list(titles) if titles is not None else [f"layer {i}" for i in range(len(mats))]
    if len(mats) == 1 and titles is None:
        titles_ = [""]
    if len(titles_) != len(mats):
        raise ValueError(f"got {len(titles_)} titles for {len(mats)} matrices")
    rows, cols = _grid(len(mats), max_cols)
    fig = _new_figure(3.2 * cols + 0.6, 3.0 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, m, t in zip(axes, mats, titles_):
        e = m.shape[0]
        image = ax.imshow(
            m,
            cmap="magma",
            origin="lower",
            extent=(0.5, e + 0.5, 0.5, e + 0.5),
            interpolation="nearest",
        )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("router-score rank", fontsize=8)
        ax.set_ylabel("output-norm rank", fontsize=8)
        ax.set_title(t, fontsize=9)
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    for ax in axes[len(mats) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title} (1 = largest)", fontsize=10)
    return _save(fig, path)


def plot_matrix_grid(
    path: str | Path,
    rows: Sequence[Sequence[ArrayLike | None]],
    row_names: Sequence[str] | None = None,
    col_names: Sequence[str] | None = None,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
    colorbar_label: str = "",
    tick_labels: Sequence[Sequence[str] | None] | None = None,
) -> Path:
    """A grid of heat maps on one colour scale, e.g. rows = models, columns = layers.

    The panels are tiled into one image (blank gutters between them), which renders in a
    fraction of the time of one axes per panel and keeps a single shared colour bar.

    Args:
        path: output file (PNG).
        rows: rows of matrices ([R, C] each; None leaves the cell blank). Matrices of one row
            are aligned at their top-left corner; cells are as large as the largest matrix.
        row_names: one label per row (left of the row).
        col_names: one title per column (above the column).
        title: figure title.
        vmin, vmax: colour limits (default: joint finite min/max).
        cmap: matplotlib colour map name.
        colorbar_label: label of the shared colour bar.
        tick_labels: accepted for API compatibility; per-matrix tick labels are not drawn in
            the tiled image (the row/column names identify the panels).
    """
    grid = [list(r) for r in rows]
    if not grid or not any(m is not None for r in grid for m in r):
        raise ValueError("rows is empty; pass at least one matrix")
    n_rows, n_cols = len(grid), max(len(r) for r in grid)
    if row_names is not None and len(row_names) != n_rows:
        raise ValueError(f"got {len(row_names)} row_names for {n_rows} rows")
    if col_names is not None and len(col_names) != n_cols:
        raise ValueError(f"got {len(col_names)} col_names for {n_cols} columns")
    mats = [[None if m is None else _matrix(m, "matrix") for m in r] for r in grid]
    shapes = [m.shape for r in mats for m in r if m is not None]
    cell_h, cell_w = max(sh[0] for sh in shapes), max(sh[1] for sh in shapes)
    gap = max(1, round(0.15 * max(cell_h, cell_w)))
    height = n_rows * cell_h + (n_rows - 1) * gap
    width = n_cols * cell_w + (n_cols - 1) * gap
    canvas = np.full((height, width), np.nan)
    for r, row in enumerate(mats):
        for c, m in enumerate(row):
            if m is not None:
                y0, x0 = r * (cell_h + gap), c * (cell_w + gap)
                canvas[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]] = m
    finite = canvas[np.isfinite(canvas)]
    lo = vmin if vmin is not None else float(finite.min()) if finite.size else 0.0
    hi = vmax if vmax is not None else float(finite.max()) if finite.size else 1.0
    aspect = width / height
    label_in = 0.3 + 0.065 * max((len(str(n)) for n in row_names or [""]), default=0)
    fig_h = min(14.0, 1.9 * n_rows + 0.9)
    image_h = fig_h - 0.9
    fig_w = min(18.0, max(4.0, image_h * aspect + label_in + 1.6))
    fig = _new_figure(fig_w, fig_h, layout=None)
    ax = fig.add_axes(
        (label_in / fig_w, 0.25 / fig_h, (fig_w - label_in - 1.5) / fig_w, image_h / fig_h)
    )
    colours = matplotlib.colormaps[cmap].with_extremes(bad="white")
    image = ax.imshow(canvas, vmin=lo, vmax=hi, cmap=colours, interpolation="nearest")
    centres_x = [c * (cell_w + gap) + (cell_w - 1) / 2 for c in range(n_cols)]
    centres_y = [r * (cell_h + gap) + (cell_h - 1) / 2 for r in range(n_rows)]
    ax.set_xticks(centres_x, labels=list(col_names) if col_names else [""] * n_cols, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(centres_y, labels=list(row_names) if row_names else [""] * n_rows, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    cax = fig.add_axes(
        (
            (fig_w - 1.2) / fig_w,
            0.25 / fig_h + image_h * 0.1 / fig_h,
            0.15 / fig_w,
            image_h * 0.8 / fig_h,
        )
    )
    fig.colorbar(image, cax=cax, label=colorbar_label)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig_h)
    return _save(fig, path)


def plot_layer_curves(
    path: str | Path,
    panels: Mapping[str, Mapping[str, Sequence[float | None]]],
    second: Mapping[str, Mapping[str, Sequence[float | None]]] | None = None,
    names: tuple[str, str] = ("A", "B"),
    title: str = "",
    x_label: str = "MoE layer",
    log_panels: Sequence[str] = (),
    reference: Mapping[str, float] | None = None,
) -> Path:
    """Per-layer curves: one panel per quantity, one line per series (e.g. matrix type).

    Args:
        path: output file (PNG).
        panels: {panel title: {series name: per-layer values (None/NaN = missing)}}.
        second: the same structure for a second model, drawn dashed in the same colours.
        names: the two models' names (legend) when ``second`` is given.
        title: figure title.
        x_label: x axis label.
        log_panels: titles of panels drawn with a logarithmic y axis.
        reference: {panel title: y} horizontal dotted reference lines (e.g. chance level).
    """
    titles = list(panels)
    if second is not None:
        titles += [t for t in second if t not in panels]
    if not titles:
        raise ValueError("panels is empty; pass at least one {title: {series: values}}")
    rows, cols = _grid(len(titles), 3)
    fig = _new_figure(3.6 * cols, 2.7 * rows + 0.5, layout=None)
    fig.subplots_adjust(
        left=0.07,
        right=0.98,
        bottom=0.5 / (2.7 * rows + 0.5) + 0.04,
        top=1 - 0.5 / (2.7 * rows + 0.5) - 0.02,
        wspace=0.3,
        hspace=0.55,
    )
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = [f"C{i}" for i in range(10)]
    for ax, t in zip(axes, titles):
        models = [(panels.get(t, {}), "-", names[0])]
        if second is not None:
            models.append((second.get(t, {}), "--", names[1]))
        drawn = False
        # One series per model: colour by model; several: colour by series, style by model.
        by_model = all(len(series) <= 1 for series, _, _ in models)
        for m_idx, (series, style, model_name) in enumerate(models):
            for j, (label, values) in enumerate(series.items()):
                y = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
                if not np.isfinite(y).any():
                    continue
                only_first = second is not None and t not in second
                name = label if second is None or only_first else f"{model_name}: {label}"
                ax.plot(
                    np.arange(y.size),
                    y,
                    "-" if by_model else style,
                    marker="o",
                    markersize=3,
                    color=colours[(m_idx if by_model and not only_first else j) % len(colours)],
                    label=name,
                )
                drawn = True
        if reference and t in reference:
            ax.axhline(reference[t], color="grey", linestyle=":", linewidth=0.9)
        if t in log_panels and drawn:
            ax.set_yscale("log")
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(x_label, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        if drawn:
            ax.legend(fontsize=6)
    for ax in axes[len(titles) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_scatter_grid(
    path: str | Path,
    rows: Sequence[Sequence[tuple[ArrayLike, ArrayLike | None] | None]],
    row_names: Sequence[str] | None = None,
    col_names: Sequence[str] | None = None,
    title: str = "",
    annotate: bool = False,
) -> Path:
    """A grid of 2-D scatter plots (e.g. PCA projections), rows = models, columns = layers.

    Args:
        path: output file (PNG).
        rows: rows of (coords [M, >=2], labels [M] or None) — points coloured by label
            (e.g. expert index); None leaves the panel empty.
        row_names, col_names: row labels and column titles.
        title: figure title.
        annotate: write each point's label next to it (for a few points, e.g. experts).
    """
    grid = [list(r) for r in rows]
    if not grid or not any(p is not None for r in grid for p in r):
        raise ValueError("rows is empty; pass at least one (coords, labels) panel")
    n_rows, n_cols = len(grid), max(len(r) for r in grid)
    height = 2.4 * n_rows + 0.5
    fig = _new_figure(2.6 * n_cols + 0.6, height, layout=None)
    fig.subplots_adjust(
        left=0.6 / (2.6 * n_cols + 0.6),
        right=0.98,
        bottom=0.3 / height,
        top=1 - 0.55 / height,
        wspace=0.3,
        hspace=0.3,
    )
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(grid):
        for c in range(n_cols):
            ax = axes[r, c]
            item = row[c] if c < len(row) else None
            if item is None:
                ax.set_visible(False)
                continue
            coords = to_numpy(item[0], np.float64, "coords")
            if coords.ndim != 2:
                raise ValueError(f"coords must be [M, 2]; got shape {coords.shape}")
            if coords.shape[1] < 2:
                coords = np.concatenate([coords, np.zeros((coords.shape[0], 1))], axis=1)
            labels = None if item[1] is None else to_numpy(item[1], name="labels").ravel()
            ax.scatter(
                coords[:, 0],
                coords[:, 1],
                c=labels if labels is not None else "C0",
                cmap="tab20" if labels is not None else None,
                s=25 if coords.shape[0] < 200 else 2,
                alpha=0.8,
                linewidths=0,
            )
            if annotate and labels is not None:
                for (x, y), lab in zip(coords[:, :2], labels):
                    ax.annotate(str(lab), (x, y), fontsize=6)
            ax.tick_params(labelsize=6)
            if r == 0 and col_names is not None:
                ax.set_title(col_names[c], fontsize=9)
            if c == 0 and row_names is not None:
                ax.set_ylabel(row_names[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
