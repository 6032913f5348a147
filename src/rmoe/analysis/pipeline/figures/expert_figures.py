"""Expert figures: weight and output similarity maps, norm-vs-score ranks, per-layer expert
curves, PCA of experts and of neurons, and router gradient norms.

Each function is ``draw(fig_dir, models, comparison) -> FigureResult | None`` (one or two
models; the second is drawn beside or over the first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rmoe.analysis import plots as P
from rmoe.analysis.adapters import MATRIX_TYPES
from rmoe.analysis.pipeline.figures._common import (
    FigureResult,
    both,
    layer_columns,
    pair_names,
    plot_layers,
)
from rmoe.analysis.pipeline.records import Comparison, ExpertLayer, ModelExperts, ModelRecord
from rmoe.formatting import fmt_number


def _similarity_grid(
    fig_dir: Path,
    models: Sequence[ModelRecord],
    stem: str,
    matrices: Callable[[ExpertLayer], dict[str, np.ndarray]],
    title: str,
    reading: str,
    vmin: float | None,
) -> FigureResult:
    """One row per (model, matrix type) of [E, E] cosine maps of the shown layers."""
    rows, row_names, ticks = [], [], []
    for m in models:
        pl = m.experts.per_layer
        sel = plot_layers(len(pl))
        for t in MATRIX_TYPES:
            rows.append([np.asarray(matrices(pl[j])[t]) for j in sel])
            row_names.append(f"{m.name} · {t}")
            e = pl[0].num_experts
            n_all = np.asarray(matrices(pl[0])[t]).shape[0]
            ticks.append([str(j) for j in range(e)] + ["SE"] * (n_all - e) if n_all <= 16 else None)
    cols = max(len(r) for r in rows)
    path = P.plot_matrix_grid(
        fig_dir / f"{stem}.png",
        rows,
        row_names,
        layer_columns(models[0], cols),
        title=title,
        vmin=vmin,
        vmax=1.0,
        cmap="RdBu_r",
        colorbar_label="cosine",
        tick_labels=ticks,
    )
    return FigureResult(path, title, reading)


def weight_similarity_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult:
    """Cosine of flattened expert matrices per layer and matrix type
    (``weight_similarity.png``)."""
    cos = both(models, lambda m: m.experts.summary.weight_cos["act"])
    reading = (
        f"Mean off-diagonal cosine, act matrices: {cos} (≈ 0 for experts trained from scratch, "
        "high for upcycled ones)."
    )
    title = "Expert weight similarity (cosine of flattened matrices)"
    return _similarity_grid(
        fig_dir, models, "weight_similarity", lambda x: x.weight_similarity, title, reading, -1.0
    )


def _neuron_avg_matrices(layer: ExpertLayer) -> dict[str, np.ndarray]:
    return layer.neuron_avg_similarity


def neuron_avg_similarity_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult:
    """Cosine of neuron-averaged expert vectors, shared expert included
    (``neuron_avg_similarity.png``)."""
    cos = both(models, lambda m: m.experts.summary.neuron_avg_cos["act"])
    gain = both(models, lambda m: m.experts.summary.matching_gain["act"], 2)
    tau = both(models, lambda m: m.experts.summary.matching_tau["act"], 2)
    reading = (
        f"Mean off-diagonal cosine of neuron-averaged act vectors: {cos}; matching neurons "
        f"raises flat act cosine by {gain} (Kendall τ {tau})."
    )
    title = "Neuron-averaged expert similarity (SE = shared expert)"
    matrices = lambda x: x.neuron_avg_similarity  # noqa: E731
    return _similarity_grid(
        fig_dir, models, "neuron_avg_similarity", matrices, title, reading, None
    )


def output_similarity_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult | None:
    """Angular similarity of expert outputs on real tokens (``output_similarity.png``; None
    when no expert outputs were computed)."""
    rows, row_names = [], []
    for m in models:
        pl = m.experts.per_layer
        rows.append(
            [
                None if pl[j].outputs is None else np.asarray(pl[j].outputs.angular)
                for j in plot_layers(len(pl))
            ]
        )
        row_names.append(m.name)
    if not any(x is not None for r in rows for x in r):
        return None
    path = P.plot_matrix_grid(
        fig_dir / "output_similarity.png",
        rows,
        row_names,
        layer_columns(models[0], max(len(r) for r in rows)),
        title="Expert output similarity on real tokens (angular, 1 - arccos(cos)/π)",
        vmin=0.0,
        vmax=1.0,
        cmap="magma",
        colorbar_label="angular similarity",
    )
    angular = both(models, lambda m: m.experts.summary.output_angular_sim)
    cosine = both(models, lambda m: m.experts.summary.output_cosine_sim)
    reading = (
        "Mean off-diagonal angular similarity of expert outputs (0.5 = orthogonal): "
        f"{angular}; cosine: {cosine}."
    )
    return FigureResult(path, "Expert output similarity", reading)


def rank_counts_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult | None:
    """Share of tokens per (output-norm rank, router-score rank), per layer and their mean
    (``rank_counts.png``; None when no expert outputs were computed)."""
    rows, row_names = [], []
    for m in models:
        outs = [x.outputs for x in m.experts.per_layer if x.outputs is not None]
        if not outs:
            continue
        shares = [np.asarray(d.rank_counts, dtype=float) / d.num_tokens for d in outs]
        rows.append([shares[j] for j in plot_layers(len(outs))] + [np.mean(shares, axis=0)])
        row_names.append(m.name)
    if not rows:
        return None
    width = max(len(r) for r in rows)
    path = P.plot_matrix_grid(
        fig_dir / "rank_counts.png",
        rows,
        row_names,
        layer_columns(models[0], width - 1) + ["mean of layers"],
        title="Output-norm rank (rows) vs router-score rank (columns), rank 1 = top-left; "
        "share of tokens",
        vmin=0.0,
        cmap="magma",
        colorbar_label="share of tokens",
    )
    chance = fmt_number(1 / models[0].num_experts)
    same = both(models, lambda m: m.experts.summary.rank_agreement)
    top1 = both(models, lambda m: m.experts.summary.top1_score_is_top1_norm)
    reading = (
        "Share of (token, expert) pairs whose output-norm rank equals their score rank "
        f"(chance 1/E = {chance}): {same}; top-scored expert has the largest norm: {top1}; "
        "a bright diagonal means the router prefers high-norm experts."
    )
    return FigureResult(path, "Output-norm rank vs router-score rank", reading)


def _expert_panels(experts: ModelExperts) -> dict[str, dict[str, list]]:
    pl = experts.per_layer

    def per_type(value: Callable[[ExpertLayer, str], Any]) -> dict[str, list]:
        return {t: [value(x, t) for x in pl] for t in MATRIX_TYPES}

    def matched(x: ExpertLayer, t: str, value: Callable[[Any], float]) -> float | None:
        summary = x.matching(t)
        return None if summary is None else value(summary)

    def dyn(value: Callable[[Any], float]) -> list:
        return [None if x.outputs is None else value(x.outputs) for x in pl]

    return {
        "weight cosine (flattened)": per_type(lambda x, t: x.weight_similarity_offdiag_mean[t]),
        "neuron-averaged cosine": per_type(lambda x, t: x.neuron_avg_similarity_offdiag_mean[t]),
        "router-vs-expert R²": per_type(lambda x, t: x.router_r2(t)),
        "neuron matching: flat cosine after": per_type(
            lambda x, t: matched(x, t, lambda s: s.flat_cosine_after_mean)
        ),
        "neuron matching: Kendall τ": per_type(
            lambda x, t: matched(x, t, lambda s: s.kendall_tau_mean)
        ),
        "diversity score (lower = diverse)": {
            "score / 3": [x.diversity_score_normalized for x in pl]
        },
        "output similarity": {
            "angular": dyn(lambda d: d.output_angular_offdiag_mean),
            "cosine": dyn(lambda d: d.output_cosine_offdiag_mean),
        },
        "activation ratio |a| > 1e-3": {"ratio": dyn(lambda d: d.activation_ratio)},
    }


def expert_summary_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult:
    """Per-layer curves of every expert analysis (``expert_summary.png``)."""
    path = P.plot_layer_curves(
        fig_dir / "expert_summary.png",
        _expert_panels(models[0].experts),
        second=_expert_panels(models[1].experts) if len(models) == 2 else None,
        names=pair_names(models),
        title="Expert analyses per layer",
    )
    r2 = "; ".join(
        f"{m.name} "
        + "/".join(fmt_number(m.experts.summary.router_r2[t], ".2g") for t in MATRIX_TYPES)
        for m in models
    )
    diversity = both(models, lambda m: m.experts.summary.diversity_score)
    active = both(models, lambda m: m.experts.summary.activation_ratio)
    reading = (
        f"Router-vs-expert R² (act/up/down): {r2} (Closer-Look: act highest); diversity "
        f"score: {diversity}; activation ratio: {active}."
    )
    title = "Expert similarity, matching, R², diversity and activations per layer"
    return FigureResult(path, title, reading)


def _explained_variance(m: ModelRecord) -> float | None:
    """Mean over layers of the act PCA's first two explained-variance ratios (None if a layer
    has no expert PCA)."""
    pl = m.experts.per_layer
    if any(x.pca_experts is None for x in pl):
        return None
    return float(np.mean([x.pca_experts["act"].explained_variance_ratio[:2].sum() for x in pl]))


def _scatter_grid(
    fig_dir: Path,
    models: Sequence[ModelRecord],
    stem: str,
    points: Callable[[ExpertLayer], tuple[np.ndarray, np.ndarray | None] | None],
    **kwargs: Any,
) -> Path | None:
    """One row per model of 2-D scatter panels (``points``: coords [M, 2] and labels [M] of
    a layer, or None) over the shown layers; None when no layer has points."""
    rows = [
        [points(m.experts.per_layer[j]) for j in plot_layers(len(m.experts.per_layer))]
        for m in models
    ]
    if not any(x is not None for r in rows for x in r):
        return None
    width = max(len(r) for r in rows)
    columns = layer_columns(models[0], width)
    return P.plot_scatter_grid(
        fig_dir / f"{stem}.png", rows, [m.name for m in models], columns, **kwargs
    )


def pca_experts_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult | None:
    """Experts in the first two PCA components of their act matrices (``pca_experts.png``)."""
    path = _scatter_grid(
        fig_dir,
        models,
        "pca_experts",
        lambda x: (
            None
            if x.pca_experts is None
            else (x.pca_experts["act"].coords, np.arange(x.num_experts))
        ),
        title="PCA of experts (flattened act matrices, standardised)",
        annotate=True,
    )
    if path is None:
        return None
    variance = both(models, _explained_variance)
    reading = (
        f"Variance explained by the first two components (act, mean over layers): {variance}; "
        "clusters mark experts with shared structure."
    )
    return FigureResult(path, "PCA of experts", reading)


def pca_neurons_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult | None:
    """Sampled neurons (act rows) in their first two PCA components, coloured by expert
    (``pca_neurons.png``)."""
    path = _scatter_grid(
        fig_dir,
        models,
        "pca_neurons",
        lambda x: (
            None
            if x.pca_neurons_act is None
            else (x.pca_neurons_act.coords, x.pca_neurons_act.labels)
        ),
        title="PCA of neurons (act rows, sampled per expert, coloured by expert)",
    )
    if path is None:
        return None
    reading = (
        "Each point is one neuron; intermixed colours mean neurons are not expert-specific (as "
        "in experts trained from scratch), separated colours mean expert-specific neuron "
        "directions."
    )
    return FigureResult(path, "PCA of neurons", reading)


def _grad_panels(m: ModelRecord) -> dict[str, dict[str, list]] | None:
    g = m.gradients
    if g is None:
        return None
    return {
        "‖∇ router‖ per layer": {
            "LM loss": g.lm.per_layer,
            "balance loss": g.balance.per_layer if g.balance else [],
        }
    }


def router_grads_figure(
    fig_dir: Path, models: Sequence[ModelRecord], comparison: Comparison | None
) -> FigureResult | None:
    """Router gradient norms per layer from the LM and the balance loss (``router_grads.png``;
    None when no model has them)."""
    first = _grad_panels(models[0])
    second = _grad_panels(models[1]) if len(models) == 2 else None
    if first is None and second is None:
        return None
    path = P.plot_layer_curves(
        fig_dir / "router_grads.png",
        first or {},
        second=second,
        names=pair_names(models),
        title="Router gradient norms on one batch",
        log_panels=["‖∇ router‖ per layer"],
    )

    def total(m: ModelRecord, which: str) -> float | None:
        g = m.gradients
        norms = None if g is None else getattr(g, which)
        return None if norms is None else norms.total

    def cell(m: ModelRecord) -> float | None:
        return None if m.gradients is None else m.gradients.lm.shared_cell

    lm, balance = (
        both(models, lambda m: total(m, "lm")),
        both(models, lambda m: total(m, "balance")),
    )
    reading = (
        f"Total router gradient norm from the LM loss: {lm}; from the (unscaled) balance loss: "
        f"{balance}; of which the router parameters shared by all layers (recurrent cell, "
        f"shared router weight or projector; LM): {both(models, cell)}."
    )
    return FigureResult(path, "Router gradient norms (LM vs balance loss)", reading)
