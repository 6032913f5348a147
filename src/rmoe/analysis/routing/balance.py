"""Expert load, router entropy and inner/outer balance of one MoE layer (RMoE paper §4)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from rmoe.analysis._arrays import ArrayLike, to_numpy
from rmoe.analysis.routing._inputs import _probs, _topk

_DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


# --------------------------------------------------------------------------------------------
# expert load
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadStats:
    """Expert load of one layer.

    Attributes:
        counts: [E] number of (token, slot) assignments per expert (a top-k token counts k times).
        fraction: [E] counts / counts.sum().
        cv: coefficient of variation std(counts)/mean(counts) (population std); 0 = balanced.
        max_violation: max(counts)/mean(counts) - 1; 0 = balanced, E - 1 = one expert takes all.
        unused: number of experts that received no token.
        num_tokens: tokens counted (after masking).
    """

    counts: np.ndarray
    fraction: np.ndarray
    cv: float
    max_violation: float
    unused: int
    num_tokens: int

    def to_dict(self) -> dict:
        """JSON-ready dict (arrays as lists)."""
        d = asdict(self)
        d["counts"] = self.counts.tolist()
        d["fraction"] = self.fraction.tolist()
        return d


def expert_load(topk: ArrayLike, num_experts: int, mask: ArrayLike | None = None) -> LoadStats:
    """Per-expert load statistics of one layer.

    Args:
        topk: [N, K] chosen expert indices (or [N] for top-1).
        num_experts: E, so that never-chosen experts are counted as unused.
        mask: optional [N] bool, False drops the token.

    Returns:
        :class:`LoadStats` with counts [E], CV, max violation and the number of unused experts.
    """
    idx = _topk(topk, num_experts, mask)
    counts = np.bincount(idx.ravel(), minlength=num_experts).astype(np.int64)
    mean = counts.mean()
    return LoadStats(
        counts=counts,
        fraction=counts / counts.sum(),
        cv=float(counts.std() / mean),
        max_violation=float(counts.max() / mean - 1.0),
        unused=int((counts == 0).sum()),
        num_tokens=int(idx.shape[0]),
    )


# --------------------------------------------------------------------------------------------
# entropy and balance
# --------------------------------------------------------------------------------------------


def router_entropy(probs: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Per-token router entropy H_t = -Σ_n p_tn ln p_tn in nats (0 ln 0 = 0).

    Args:
        probs: [N, E] softmax over all experts.
        mask: optional [N] bool.

    Returns:
        [N'] float64 entropies, N' = number of kept tokens; each in [0, ln E].
    """
    p = np.clip(_probs(probs, mask), 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    return -plogp.sum(axis=1)


def normalized_entropy(probs: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Per-token entropy divided by ln E, in [0, 1] (1 = uniform router). Shape [N'].

    Raises ``ValueError`` for E = 1, where ln E = 0.
    """
    num_experts = to_numpy(probs, name="probs").shape[-1]
    if num_experts < 2:
        raise ValueError("normalized_entropy needs E >= 2 experts (ln 1 = 0); got E = 1")
    return router_entropy(probs, mask) / math.log(num_experts)


@dataclass(frozen=True)
class EntropySummary:
    """Distribution summary of per-token router entropies of one layer (nats).

    Attributes:
        mean, median, std, min, max: statistics of the entropies.
        quantiles: {q: value} for the requested quantile levels.
        max_entropy: ln E, the entropy of a uniform router.
        mean_normalized: mean / ln E.
        hist_counts: [bins] token counts per histogram bin.
        hist_edges: [bins + 1] bin edges spanning [0, ln E].
        num_tokens: number of tokens summarised.
    """

    mean: float
    median: float
    std: float
    min: float
    max: float
    quantiles: dict[float, float]
    max_entropy: float
    mean_normalized: float
    hist_counts: np.ndarray = field(repr=False)
    hist_edges: np.ndarray = field(repr=False)
    num_tokens: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict (quantile keys as strings, arrays as lists)."""
        d = asdict(self)
        d["quantiles"] = {f"{q:g}": v for q, v in self.quantiles.items()}
        d["hist_counts"] = self.hist_counts.tolist()
        d["hist_edges"] = self.hist_edges.tolist()
        return d


def entropy_summary(
    entropy: ArrayLike,
    num_experts: int,
    bins: int = 50,
    quantiles: Sequence[float] = _DEFAULT_QUANTILES,
) -> EntropySummary:
    """Summarise per-token entropies (from :func:`router_entropy`) of one layer.

    Args:
        entropy: [N] entropies in nats.
        num_experts: E; the histogram spans [0, ln E] so layers and models share bins.
        bins: number of histogram bins.
        quantiles: quantile levels in [0, 1].
    """
    h = to_numpy(entropy, np.float64, name="entropy").ravel()
    if h.size == 0:
        raise ValueError("entropy is empty; pass at least one token's entropy")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1; got {num_experts}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1; got {bins}")
    qs = [float(q) for q in quantiles]
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must lie in [0, 1]; got {qs}")
    h_max = math.log(num_experts)
    # A tiny margin keeps a uniform router's ln E (up to rounding) inside the last bin.
    counts, edges = np.histogram(np.clip(h, 0.0, h_max), bins=bins, range=(0.0, max(h_max, 1e-12)))
    mean = float(h.mean())
    return EntropySummary(
        mean=mean,
        median=float(np.median(h)),
        std=float(h.std()),
        min=float(h.min()),
        max=float(h.max()),
        quantiles={q: float(v) for q, v in zip(qs, np.quantile(h, qs))},
        max_entropy=h_max,
        mean_normalized=mean / h_max if h_max > 0 else float("nan"),
        hist_counts=counts,
        hist_edges=edges,
        num_tokens=int(h.size),
    )


def inner_balance(probs: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Inner balance IB = median over tokens of g_(1) / g_(2) (RMoE paper, Table 8).

    g_(1) >= g_(2) are the two largest entries of the full softmax. IB = 1 for a uniform router;
    large IB means top-2 routing degenerates towards top-1. A token whose second score is 0 gives
    an infinite ratio (the median still is finite unless most tokens do).

    Args:
        probs: [N, E] softmax over all experts, E >= 2.
        mask: optional [N] bool.
    """
    p = _probs(probs, mask)
    if p.shape[1] < 2:
        raise ValueError("inner_balance needs E >= 2 experts (a top-1/top-2 ratio); got E = 1")
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = top2[:, 0] / top2[:, 1]
    return float(np.median(ratio))


def outer_balance(probs: ArrayLike, topk: ArrayLike | int, mask: ArrayLike | None = None) -> float:
    """Outer balance OB = median over tokens of the summed selected scores Σ_{n∈TopK} g_n.

    g is the full softmax (before any top-k renormalisation). OB = k/E for a uniform router and
    approaches 1 when the selected experts take all the probability mass.

    Args:
        probs: [N, E] softmax over all experts.
        topk: [N, K] the experts the model actually selected, or an int k to take the k largest
            entries of ``probs`` (identical unless selection used a bias, as in DeepSeek-V3).
        mask: optional [N] bool.
    """
    p = _probs(probs, mask)
    if isinstance(topk, (int, np.integer)):
        k = int(topk)
        if not 1 <= k <= p.shape[1]:
            raise ValueError(f"k must be in [1, E] = [1, {p.shape[1]}]; got {k}")
        selected = -np.partition(-p, k - 1, axis=1)[:, :k]
    else:
        idx = _topk(topk, p.shape[1], mask)
        if idx.shape[0] != p.shape[0]:
            raise ValueError(
                f"topk has {idx.shape[0]} tokens but probs has {p.shape[0]}; pass both for the "
                "same tokens"
            )
        selected = np.take_along_axis(p, idx, axis=1)
    return float(np.median(selected.sum(axis=1)))
