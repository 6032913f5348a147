"""Routing figures: expert load, router entropy, balance per layer, the cross-layer MI maps.

Each function is ``draw(fig_dir, models, comparison) -> FigureResult | None`` (one or two
models; the second is drawn beside or over the first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmoe.analysis import plots as P
from rmoe.analysis._stats import nanmean
from rmoe.analysis.pipeline.figures._common import FigureResult, both, pair_names
from rmoe.analysis.pipeline.records import Comparison, ModelRecord
from rmoe.analysis.routing import ModelRouting, ModelRoutingSummary
from rmoe.formatting import fmt_number

_IB = "inner balance IB (median top1/top2)"
_OB = "outer balance OB (median selected mass)"


def _layer_names(model: ModelRecord, prefix: str = "layer ") -> list[str]:
    return [f"{prefix}{x.layer_index}" for x in model.routing.per_layer]


def load_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult:
    """Expert load [E] per layer as bars (``load.png``)."""
    counts = [[np.asarray(x.stats.load.counts) for x in m.routing.per_layer] for m in models]
    second = counts[1] if len(models) == 2 else None
    deeper_first = second is None or len(second) <= len(counts[0])
    path = P.plot_load_bars(
        fig_dir / "load.png",
        counts[0],
        layer_names=_layer_names(models[0]) if deeper_first else None,
        second=second,
        names=pair_names(models),
    )
    cv = both(models, lambda m: m.routing.summary.load_cv_mean)
    unused = both(models, lambda m: m.routing.summary.unused_experts_total)
    reading = (
        f"Load coefficient of variation (0 = balanced), mean over layers: {cv}; "
        f"unused experts: {unused}."
    )
    return FigureResult(path, "Expert load per layer", reading)


def entropy_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult:
    """Histograms of the per-token router entropy per layer (``entropy.png``)."""
    summaries = [[x.stats.entropy for x in m.routing.per_layer] for m in models]
    same_depth = len(models) == 2 and len(summaries[1]) == len(summaries[0])
    path = P.plot_entropy_histograms(
        fig_dir / "entropy.png",
        summaries[0],
        models[0].num_experts,
        layer_names=_layer_names(models[0]),
        second=summaries[1] if same_depth else None,
        names=pair_names(models),
    )
    h = both(models, lambda m: m.routing.summary.mean_entropy_normalized)
    reading = (
        f"Mean router entropy as a share of ln E (1 = uniform, 0 = one expert): {h}; "
        "lower means more confident routing."
    )
    return FigureResult(path, "Router entropy per layer", reading)


def _balance_panels(routing: ModelRouting) -> dict[str, dict[str, list]]:
    pl = routing.per_layer
    return {
        _IB: {"IB": [x.stats.inner_balance for x in pl]},
        _OB: {"OB": [x.stats.outer_balance for x in pl]},
        "load CV": {"CV": [x.stats.load.cv for x in pl]},
        "entropy / ln E": {"H": [x.stats.entropy.mean_normalized for x in pl]},
    }


def balance_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult:
    """Inner/outer balance, load CV, entropy and (two models) agreement per layer
    (``routing_summary.png``)."""
    agreement = comparison.agreement if comparison is not None else None
    extra = {}
    if agreement:
        extra = {
            "routing agreement A vs B": {
                "top-1": [a.top1_agreement for a in agreement],
                "Jaccard top-k": [a.mean_jaccard for a in agreement],
            }
        }
    two = len(models) == 2
    uniform = models[0].routing.summary.outer_balance_uniform
    path = P.plot_layer_curves(
        fig_dir / "routing_summary.png",
        {**_balance_panels(models[0].routing), **extra},
        second=_balance_panels(models[1].routing) if two else None,
        names=pair_names(models),
        title="Routing balance per layer",
        reference={_OB: uniform, _IB: 1.0},
    )
    ib = both(models, lambda m: m.routing.summary.inner_balance_mean)
    ob = both(models, lambda m: m.routing.summary.outer_balance_mean)
    reading = (
        f"IB (1 = top-2 as strong as top-1): {ib}; OB (uniform = k/E = {fmt_number(uniform)}): {ob}"
    )
    if agreement:
        top1 = fmt_number(nanmean(a.top1_agreement for a in agreement))
        reading += f"; top-1 agreement between the two models: {top1}"
        reading += f" (chance {fmt_number(agreement[0].chance_top1)})"
    return FigureResult(path, "Balance, entropy and agreement per layer", reading + ".")


@dataclass(frozen=True)
class _MiMap:
    """What one cross-layer MI figure shows: the file stem, the [L, L] map of a model's routing,
    its two layer means, the title and the start of the reading."""

    stem: str
    matrix: Callable[[ModelRouting], np.ndarray | None]
    offdiag: Callable[[ModelRoutingSummary], float | None]
    adjacent: Callable[[ModelRoutingSummary], float | None]
    title: str
    reading_head: str


_MI_BINNED = _MiMap(
    "mi_binned",
    lambda r: r.mi_binned,
    lambda s: s.mi_binned_offdiag_mean,
    lambda s: s.mi_binned_adjacent_mean,
    "Cross-layer MI: binned router profiles (RMoE estimator)",
    "Mean off-diagonal MI of the per-token binned softmax profiles (biased upward with only E "
    "samples per token; compare models on the same tokens): ",
)
_MI_INDEX = _MiMap(
    "mi_index",
    lambda r: r.mi_index,
    lambda s: s.mi_index_offdiag_mean,
    lambda s: s.mi_index_adjacent_mean,
    "Cross-layer MI: chosen-expert indices",
    "Mean off-diagonal MI between layers' top-1 expert choices over tokens (0 = independent; "
    "diagonal = choice entropy): ",
)


def _mi_figure(fig_dir: Path, models: Sequence[ModelRecord], mi: _MiMap) -> FigureResult | None:
    """One cross-layer MI map [L, L] per model (None when the first model has none)."""
    first = mi.matrix(models[0].routing)
    if first is None:
        return None
    two = len(models) == 2
    labels = _layer_names(models[0], "L")
    second = mi.matrix(models[1].routing) if two else None
    path = P.plot_heatmap(
        fig_dir / f"{mi.stem}.png",
        first,
        title=models[0].name,
        labels=labels if second is None or len(second) == len(labels) else None,
        second=second,
        second_title=models[1].name if two else "",
        colorbar_label="nats",
        annotate=len(labels) <= 8,
    )
    offdiag = both(models, lambda m: mi.offdiag(m.routing.summary))
    adjacent = both(models, lambda m: mi.adjacent(m.routing.summary))
    return FigureResult(
        path, mi.title, f"{mi.reading_head}{offdiag} nats (adjacent layers: {adjacent})."
    )


def mi_binned_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult | None:
    """Cross-layer MI of the binned router profiles (``mi_binned.png``)."""
    return _mi_figure(fig_dir, models, _MI_BINNED)


def mi_index_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult | None:
    """Cross-layer MI of the chosen (top-1) expert indices (``mi_index.png``)."""
    return _mi_figure(fig_dir, models, _MI_INDEX)
