"""The routing statistics of a whole model on one set of tokens, as ``rmoe analyze`` reports
them: every layer's metrics, the cross-layer mutual-information maps and their layer means."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmoe.analysis._dicts import asdict_without_none
from rmoe.analysis._stats import adjacent_mean, nanmean, offdiag_mean
from rmoe.analysis.routing.mutual_information import (
    binned_mutual_information_matrix,
    choice_entropy,
    index_mutual_information_matrix,
)
from rmoe.analysis.routing.summary import RoutingLayerStats, routing_layer_stats


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer's routing metrics.

    Attributes:
        stats: load, entropy and balance of the layer.
        layer_index: the decoder layer that holds this MoE layer.
        choice_entropy: entropy (nats) of the top-1 expert choice over tokens.
        dropped_share: share of the N*K chosen assignments a capacity limit dropped (they
            still count in the load, which is the router's choice); None for a dropless
            router (then left out of :meth:`to_dict`).
    """

    stats: RoutingLayerStats
    layer_index: int
    choice_entropy: float
    dropped_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The layer's metrics dict with ``layer_index``, ``choice_entropy`` (and
        ``dropped_share`` when a capacity applied) appended."""
        out = {
            **self.stats.to_dict(),
            "layer_index": self.layer_index,
            "choice_entropy": self.choice_entropy,
        }
        if self.dropped_share is not None:
            out["dropped_share"] = self.dropped_share
        return out


@dataclass(frozen=True)
class ModelRoutingSummary:
    """Layer means of a model's routing metrics.

    The ``mi_*`` fields and ``choice_entropy_mean`` are None when the MI maps were not computed
    (layers with different E); they are then left out of :meth:`to_dict`.
    """

    num_tokens: int
    mean_entropy: float
    mean_entropy_normalized: float
    inner_balance_mean: float
    outer_balance_mean: float
    outer_balance_uniform: float
    load_cv_mean: float
    load_max_violation_max: float
    unused_experts_total: int
    mi_binned_offdiag_mean: float | None = None
    mi_binned_adjacent_mean: float | None = None
    mi_index_offdiag_mean: float | None = None
    mi_index_adjacent_mean: float | None = None
    choice_entropy_mean: float | None = None
    dropped_share_mean: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (fields that were not computed are left out)."""
        optional = [f.name for f in dataclasses.fields(self) if f.default is None]
        return asdict_without_none(self, optional)


@dataclass(frozen=True)
class ModelRouting:
    """A model's routing metrics.

    Attributes:
        per_layer: one record per MoE layer.
        mi_binned: [L, L] binned-profile MI (nats), or None when the layers' E differ.
        mi_index: [L, L] MI of the top-1 expert indices, or None.
        mi_index_topk: [L, L] MI of the top-k index sets, or None.
        summary: the layer means.
    """

    per_layer: list[LayerRouting]
    mi_binned: np.ndarray | None
    mi_index: np.ndarray | None
    mi_index_topk: np.ndarray | None
    summary: ModelRoutingSummary

    def to_dict(self) -> dict[str, Any]:
        """``{"per_layer": [...], "mi_binned", "mi_index", "mi_index_topk", "summary"}`` (the MI
        maps only when computed)."""
        out: dict[str, Any] = {"per_layer": [layer.to_dict() for layer in self.per_layer]}
        if self.mi_binned is not None:
            out["mi_binned"] = self.mi_binned
            out["mi_index"] = self.mi_index
            out["mi_index_topk"] = self.mi_index_topk
        out["summary"] = self.summary.to_dict()
        return out


def model_routing(
    probs: list[np.ndarray],
    topk: list[np.ndarray],
    num_experts: int,
    layer_indices: list[int],
    dropped: list[np.ndarray | None] | None = None,
) -> ModelRouting:
    """Routing metrics of every MoE layer of a model and their means.

    Args:
        probs: per MoE layer, [N, E] router probabilities over all experts (the same N tokens;
            a sigmoid router's scores normalised to sum to one).
        topk: per MoE layer, [N, K] chosen experts, highest score first.
        num_experts: E of the model (the index-MI alphabet).
        layer_indices: the decoder-layer index of each MoE layer.
        dropped: per MoE layer, [N, K] bool assignments a capacity limit dropped, or None
            (dropless); None = every layer dropless.
    """
    dropped = list(dropped) if dropped is not None else [None] * len(probs)
    shares = [None if d is None else float(np.asarray(d, dtype=float).mean()) for d in dropped]
    per_layer = [
        LayerRouting(routing_layer_stats(p, t), li, choice_entropy(t, num_experts), share)
        for p, t, li, share in zip(probs, topk, layer_indices, shares)
    ]
    mi_binned = mi_index = mi_index_topk = None
    if len({p.shape[1] for p in probs}) == 1:
        mi_binned = binned_mutual_information_matrix(probs)
        mi_index = index_mutual_information_matrix(topk, num_experts)
        mi_index_topk = index_mutual_information_matrix(topk, num_experts, use_topk=True)
    mi: dict[str, float] = {}
    if mi_binned is not None:
        mi = dict(
            mi_binned_offdiag_mean=offdiag_mean(mi_binned),
            mi_binned_adjacent_mean=adjacent_mean(mi_binned),
            mi_index_offdiag_mean=offdiag_mean(mi_index),
            mi_index_adjacent_mean=adjacent_mean(mi_index),
            choice_entropy_mean=nanmean(m.choice_entropy for m in per_layer),
        )
    stats = [m.stats for m in per_layer]
    summary = ModelRoutingSummary(
        num_tokens=int(probs[0].shape[0]),
        mean_entropy=nanmean(s.entropy.mean for s in stats),
        mean_entropy_normalized=nanmean(s.entropy.mean_normalized for s in stats),
        inner_balance_mean=nanmean(s.inner_balance for s in stats),
        outer_balance_mean=nanmean(s.outer_balance for s in stats),
        outer_balance_uniform=int(topk[0].shape[1]) / num_experts,
        load_cv_mean=nanmean(s.load.cv for s in stats),
        load_max_violation_max=max(s.load.max_violation for s in stats),
        unused_experts_total=int(sum(s.load.unused for s in stats)),
        dropped_share_mean=None if all(x is None for x in shares) else nanmean(shares),
        **mi,
    )
    return ModelRouting(per_layer, mi_binned, mi_index, mi_index_topk, summary)
