"""The analysis figures: one function per figure, registered in :data:`FIGURES` in report order.

Every figure function has the signature ``draw(fig_dir, models, comparison)``: it reads the
typed records (:class:`~rmoe.analysis.pipeline.records.ModelRecord` of one or two models, the
:class:`~rmoe.analysis.pipeline.records.Comparison` or None), writes one PNG into ``fig_dir``
and returns a :class:`FigureResult` (path, title, one-line reading), or None when the figure
does not apply. :func:`write_figures` runs them all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from rmoe.analysis.pipeline.capture import ProgressFn
from rmoe.analysis.pipeline.figures._common import FigureFn, FigureResult, plot_layers
from rmoe.analysis.pipeline.figures.expert_figures import (
    expert_summary_figure,
    neuron_avg_similarity_figure,
    output_similarity_figure,
    pca_experts_figure,
    pca_neurons_figure,
    rank_counts_figure,
    router_grads_figure,
    weight_similarity_figure,
)
from rmoe.analysis.pipeline.figures.routing_figures import (
    balance_figure,
    entropy_figure,
    load_figure,
    mi_binned_figure,
    mi_index_figure,
)
from rmoe.analysis.pipeline.records import Comparison, ModelRecord

__all__ = ["FIGURES", "FigureFn", "FigureResult", "FigureSpec", "plot_layers", "write_figures"]


class FigureSpec(NamedTuple):
    """A registered figure: its name (``timing_seconds["figure: <name>"]``) and its function."""

    name: str
    draw: FigureFn


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("load", load_figure),
    FigureSpec("entropy", entropy_figure),
    FigureSpec("balance", balance_figure),
    FigureSpec("mi_binned", mi_binned_figure),
    FigureSpec("mi_index", mi_index_figure),
    FigureSpec("weight_similarity", weight_similarity_figure),
    FigureSpec("neuron_avg_similarity", neuron_avg_similarity_figure),
    FigureSpec("output_grid", output_similarity_figure),
    FigureSpec("ranks", rank_counts_figure),
    FigureSpec("expert_curves", expert_summary_figure),
    FigureSpec("pca_experts", pca_experts_figure),
    FigureSpec("pca_neurons", pca_neurons_figure),
    FigureSpec("grads", router_grads_figure),
)
"""Every figure of the report, in display order: the one place a figure is registered."""


def write_figures(
    out_dir: Path,
    models: Sequence[ModelRecord],
    comparison: Comparison | None,
    progress: ProgressFn,
    timing: dict[str, float],
    figures: Sequence[FigureSpec] = FIGURES,
) -> list[FigureResult]:
    """Draw every registered figure into ``out_dir/figures``; seconds per figure go into
    ``timing`` as ``"figure: <name>"``.

    Returns:
        The figures written, in order (those that did not apply are left out).
    """
    fig_dir = out_dir / "figures"
    written: list[FigureResult] = []
    for spec in progress(figures, total=len(figures), desc="figures"):
        t0 = time.perf_counter()
        result = spec.draw(fig_dir, models, comparison)
        if result is not None:
            written.append(result)
        timing[f"figure: {spec.name}"] = time.perf_counter() - t0
    return written
