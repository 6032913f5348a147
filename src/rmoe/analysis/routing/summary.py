"""One-call routing summaries: a layer's metrics, a whole model's (the experiment evaluator),
and the per-layer statistics the trainer logs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rmoe.analysis._arrays import ArrayLike
from rmoe.analysis.routing._inputs import _probs, _topk
from rmoe.analysis.routing.balance import (
    EntropySummary,
    LoadStats,
    entropy_summary,
    expert_load,
    inner_balance,
    outer_balance,
    router_entropy,
)
from rmoe.analysis.routing.mutual_information import binned_mutual_information_matrix

if TYPE_CHECKING:
    import torch

    from rmoe.modeling.routing import RoutingResult

# --------------------------------------------------------------------------------------------
# one-call summary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingLayerStats:
    """The single-layer routing metrics of :func:`routing_layer_stats`.

    Attributes:
        num_experts: E.
        top_k: K.
        load: expert load (counts [E], CV, violation, unused experts).
        entropy: distribution of the per-token router entropies.
        outer_balance: median selected mass OB.
        inner_balance: median top1/top2 IB (NaN for E = 1).
    """

    num_experts: int
    top_k: int
    load: LoadStats
    entropy: EntropySummary
    outer_balance: float
    inner_balance: float

    def to_dict(self) -> dict:
        """JSON-ready dict, the layout :func:`routing_layer_metrics` returns."""
        return {
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "load": self.load.to_dict(),
            "entropy": self.entropy.to_dict(),
            "outer_balance": self.outer_balance,
            "inner_balance": self.inner_balance,
        }


def routing_layer_stats(
    probs: ArrayLike,
    topk: ArrayLike,
    mask: ArrayLike | None = None,
    entropy_bins: int = 50,
) -> RoutingLayerStats:
    """All single-layer routing metrics as one typed record.

    Args:
        probs: [N, E] softmax over all experts.
        topk: [N, K] chosen experts.
        mask: optional [N] bool.
        entropy_bins: histogram bins for the entropy summary.
    """
    p = _probs(probs, mask)
    idx = _topk(topk, p.shape[1], mask)
    if idx.shape[0] != p.shape[0]:
        raise ValueError(
            f"topk has {idx.shape[0]} tokens but probs has {p.shape[0]}; pass both for the same "
            "tokens"
        )
    e = p.shape[1]
    return RoutingLayerStats(
        num_experts=e,
        top_k=int(idx.shape[1]),
        load=expert_load(idx, e),
        entropy=entropy_summary(router_entropy(p), e, bins=entropy_bins),
        outer_balance=outer_balance(p, idx),
        inner_balance=inner_balance(p) if e >= 2 else float("nan"),
    )


def routing_layer_metrics(
    probs: ArrayLike, topk: ArrayLike, mask: ArrayLike | None = None, entropy_bins: int = 50
) -> dict:
    """All single-layer routing metrics as one JSON-ready dict: :func:`routing_layer_stats`
    (same arguments) as a dict.

    Returns:
        {"load": LoadStats dict, "entropy": EntropySummary dict, "inner_balance": float,
        "outer_balance": float, "num_experts": E, "top_k": K}.
    """
    return routing_layer_stats(probs, topk, mask, entropy_bins).to_dict()


def routing_summary(
    probs: list[np.ndarray], topk: list[np.ndarray], mi_bins: int = 100
) -> dict[str, Any]:
    """Layer-wise and layer-mean routing statistics of a whole model, as the experiment
    evaluator reports them.

    Args:
        probs: per MoE layer, [N, E] softmax over all experts (the same N tokens each).
        topk: per MoE layer, [N, K] chosen experts.
        mi_bins: bins of the binned cross-layer mutual information.

    Returns:
        inner balance (median top1/top2), outer balance (median selected mass), mean router
        entropy (nats, and normalised by ln E) per layer and averaged, and the binned
        cross-layer MI matrix with its mean over all layer pairs and over adjacent pairs
        (None / NaN with one layer).
    """
    ib = [inner_balance(p) for p in probs]
    ob = [outer_balance(p, t) for p, t in zip(probs, topk)]
    ent = [float(router_entropy(p).mean()) for p in probs]
    e = probs[0].shape[1]
    out: dict[str, Any] = {
        "tokens": int(probs[0].shape[0]),
        "num_experts": int(e),
        "layer_inner_balance": ib,
        "layer_outer_balance": ob,
        "layer_entropy": ent,
        "inner_balance": float(np.mean(ib)),
        "outer_balance": float(np.mean(ob)),
        "entropy": float(np.mean(ent)),
        "entropy_normalized": float(np.mean(ent) / math.log(e)) if e > 1 else float("nan"),
    }
    n_layers = len(probs)
    if n_layers >= 2:
        mi = binned_mutual_information_matrix(probs, num_bins=mi_bins)
        iu = np.triu_indices(n_layers, 1)
        out["mi_matrix"] = mi.tolist()
        out["mi_mean"] = float(mi[iu].mean())
        out["mi_adjacent"] = float(np.mean([mi[i, i + 1] for i in range(n_layers - 1)]))
    else:
        out["mi_matrix"] = None
        out["mi_mean"] = float("nan")
        out["mi_adjacent"] = float("nan")
    return out


def training_log_stats(
    routing: Sequence[RoutingResult],
    expert_biases: Sequence[torch.Tensor | None] | None = None,
) -> dict[str, list[float]]:
    """Per-MoE-layer statistics the trainer logs, from the routing the model used.

    Computed with torch on the tensors' device (no host copy of the [N, E] tensors), from each
    layer's `RoutingResult` (over N tokens): ``probs`` [N, E] (the router's distribution, also
    for sigmoid scores), ``topk_idx`` [N, K] (the actual choice, made on the biased scores when
    the router has an expert bias) and ``dropped`` [N, K] (None when dropless).

    Args:
        routing: per MoE layer, the `RoutingResult` of one micro-batch.
        expert_biases: per MoE layer, the router's expert bias [E] (or None for a layer without
            one), in the same order as ``routing``; None = no layer has a bias.

    Returns:
        Lists with one value per MoE layer:
        ``load_cv`` (coefficient of variation of the assignments per expert, std / mean),
        ``max_violation`` (max load / mean load - 1), ``entropy`` (mean normalised entropy
        H / ln E of ``probs``), ``aux`` (the Switch balance loss E * sum_e f_e P_e of this
        micro-batch: a diagnostic comparable across balance-loss types; the loss that was
        trained is the step's ``aux_loss``), ``dropped`` (share of the N*K assignments dropped
        by the capacity; 0.0 when dropless), ``logit_std`` (std of the router logits over
        tokens and experts: how sharp the router is). The loads count the router's choices, kept or
        dropped. ``bias_range`` (max - min of the layer's expert bias; 0.0 for a layer
        without one) is present only when some layer has an expert bias, so its absence
        means "no expert bias" rather than a perfectly flat one.

    Raises:
        ValueError: ``expert_biases`` is not one entry per layer.
    """
    import torch

    from rmoe.modeling.losses import load_balancing_loss
    from rmoe.modeling.losses import normalized_entropy as torch_normalized_entropy

    keys = ("load_cv", "max_violation", "entropy", "aux", "dropped", "logit_std")
    out: dict[str, list[float]] = {k: [] for k in keys}
    for r in routing:
        p, idx = r.probs.detach().float(), r.topk_idx
        counts = torch.bincount(idx.reshape(-1), minlength=p.shape[-1]).float()
        mean = counts.mean()
        out["load_cv"].append((counts.std(unbiased=False) / mean).item())
        out["max_violation"].append((counts.max() / mean - 1).item())
        out["entropy"].append(torch_normalized_entropy(p).mean().item())
        out["aux"].append(load_balancing_loss(p, idx).item())
        out["dropped"].append(r.dropped_share)
        out["logit_std"].append(r.logits.detach().float().std(unbiased=False).item())
    biases = list(expert_biases) if expert_biases is not None else []
    if any(b is not None for b in biases):
        if len(biases) != len(out["aux"]):
            raise ValueError(
                f"expert_biases has {len(biases)} entries for {len(out['aux'])} MoE layers; "
                "pass one per layer (None for a layer without a bias)"
            )
        out["bias_range"] = [0.0 if b is None else (b.max() - b.min()).item() for b in biases]
    return out


def router_logit_stats(routing: Sequence[RoutingResult]) -> dict[str, list[float]]:
    """Per MoE layer, how sharp the router is: the standard deviation of its logits
    (``RoutingResult.logits`` [N, E], over all tokens and experts) and the mean normalised
    entropy H / ln E of its distribution over experts (``RoutingResult.probs`` [N, E]: the
    softmax, or the sigmoid scores normalised to sum to one; 1 = uniform routing).
    ``rmoe info --init-stats`` reports these for a freshly initialised model."""
    from rmoe.modeling.losses import normalized_entropy as torch_normalized_entropy

    out: dict[str, list[float]] = {"logit_std": [], "entropy": []}
    for r in routing:
        z = r.logits.detach().float()
        out["logit_std"].append(z.std(unbiased=False).item())
        out["entropy"].append(torch_normalized_entropy(r.probs.detach().float()).mean().item())
    return out
