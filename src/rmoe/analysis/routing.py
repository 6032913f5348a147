"""Routing metrics: expert load, router entropy, inner/outer balance, cross-layer mutual
information and routing agreement between checkpoints.

All functions are model-agnostic. They take, per MoE layer,

* ``probs``  [N, E] float — the router's softmax over **all** E experts (not logits, not the
  renormalised top-k weights), one row per token;
* ``topk``   [N, K] int   — the chosen expert indices, column 0 being the highest-scoring choice
  (``torch.topk`` order);
* ``mask``   [N] bool     — optional; False drops a token (padding).

and return plain numbers, numpy arrays, or small frozen dataclasses with a ``to_dict()`` for JSON.
Computation is done in float64 numpy whatever the input dtype.

Definitions follow the RMoE paper (Qiu et al., ICLR 2025; see ``shared/papers/rmoe.md`` §4):
gate entropy H_t = -Σ_n g_n ln g_n over the full softmax; inner balance IB = median_t g_(1)/g_(2);
outer balance OB = median_t Σ_{n∈TopK} g_n; cross-layer mutual information from per-token binned
softmax profiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_numpy, token_mask

__all__ = [
    "EntropySummary",
    "LoadStats",
    "RoutingAgreement",
    "binned_mutual_information",
    "binned_mutual_information_matrix",
    "choice_entropy",
    "entropy_summary",
    "expert_load",
    "index_mutual_information",
    "index_mutual_information_matrix",
    "inner_balance",
    "normalized_entropy",
    "outer_balance",
    "router_entropy",
    "routing_agreement",
    "routing_layer_metrics",
]

_DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
# Token × expert codes processed at once in the binned-MI computation (memory bound).
_MI_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _probs(probs: ArrayLike, mask: ArrayLike | None = None, name: str = "probs") -> np.ndarray:
    """Validate router probabilities [N, E] and return the masked float64 rows."""
    p = to_numpy(probs, np.float64, name=name)
    check_ndim(p, 2, name, "[N, E]")
    n, e = p.shape
    if n == 0 or e == 0:
        raise ValueError(f"{name} is empty (shape {p.shape}); pass at least one token and expert")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or inf; check the router outputs")
    if (p < -1e-6).any():
        raise ValueError(
            f"{name} has negative entries (min {p.min():.3g}); pass softmax(logits, dim=-1) over "
            "all experts, not the raw logits"
        )
    sums = p.sum(axis=1)
    if np.abs(sums - 1.0).max() > 1e-3:
        raise ValueError(
            f"{name} rows must sum to 1 (a softmax over all E experts); got row sums in "
            f"[{sums.min():.4g}, {sums.max():.4g}]; pass softmax(logits, dim=-1), not logits or "
            "renormalised top-k weights"
        )
    m = token_mask(mask, n)
    return p if m is None else p[m]


def _topk(
    topk: ArrayLike,
    num_experts: int | None = None,
    mask: ArrayLike | None = None,
    name: str = "topk",
) -> np.ndarray:
    """Validate expert indices [N, K] (1-D [N] is read as K = 1) and return masked int64 rows."""
    idx = to_numpy(topk, name=name)
    if idx.ndim == 1:
        idx = idx[:, None]
    check_ndim(idx, 2, name, "[N, K]")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {idx.shape}); pass at least one token and choice")
    if not np.issubdtype(idx.dtype, np.integer):
        if np.issubdtype(idx.dtype, np.floating) and np.array_equal(idx, np.round(idx)):
            idx = idx.astype(np.int64)
        else:
            raise ValueError(
                f"{name} must hold integer expert indices; got dtype {idx.dtype}; pass the "
                "indices from torch.topk(probs, k).indices"
            )
    idx = idx.astype(np.int64, copy=False)
    if (idx < 0).any() or (num_experts is not None and (idx >= num_experts).any()):
        raise ValueError(
            f"{name} has indices outside [0, {num_experts}) (min {idx.min()}, max {idx.max()}); "
            "check num_experts and that padding slots are not marked with -1"
        )
    m = token_mask(mask, idx.shape[0])
    return idx if m is None else idx[m]


def _infer_num_experts(num_experts: int | None, *indices: np.ndarray) -> int:
    if num_experts is not None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1; got {num_experts}")
        return int(num_experts)
    return int(max(int(i.max()) for i in indices)) + 1


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


# --------------------------------------------------------------------------------------------
# cross-layer mutual information
# --------------------------------------------------------------------------------------------


def _bin_codes(p: np.ndarray, num_bins: int) -> np.ndarray:
    """``np.digitize(p, np.linspace(0, 1, num_bins))`` as int32 codes (the RMoE recipe)."""
    return np.digitize(p, np.linspace(0.0, 1.0, num_bins)).astype(np.int32)


def _sum_n_log_n(codes: np.ndarray) -> np.ndarray:
    """Per row of [c, E] integer labels, Σ_cells n ln n over the label counts n. Shape [c].

    Rows are sorted, runs of equal labels found, and run lengths accumulated per row, so the
    cost is O(c·E log E) with no Python loop over rows.
    """
    c, e = codes.shape
    srt = np.sort(codes, axis=1)
    starts = np.ones((c, e), dtype=bool)
    starts[:, 1:] = srt[:, 1:] != srt[:, :-1]
    flat = np.flatnonzero(starts)  # every row begins with a run, so runs never span rows
    lengths = np.diff(np.append(flat, c * e)).astype(np.float64)
    return np.bincount(flat // e, weights=lengths * np.log(lengths), minlength=c)


def _per_token_mi(s_a: np.ndarray, s_b: np.ndarray, s_ab: np.ndarray, e: int) -> np.ndarray:
    """Plug-in MI of E paired samples from the Σ n ln n of each labeling and of the pairs.

    MI = Σ_cells (n_uv/E) ln(E n_uv / (n_u n_v)) = ln E + (S_uv - S_u - S_v) / E with
    S = Σ_cells n ln n (expand the logarithm and sum over samples instead of cells).
    """
    return np.maximum(math.log(e) + (s_ab - s_a - s_b) / e, 0.0)


def _joint_codes(codes_a: np.ndarray, codes_b: np.ndarray, num_bins: int) -> np.ndarray:
    return codes_a * (num_bins + 1) + codes_b


def binned_mutual_information(
    probs_a: ArrayLike,
    probs_b: ArrayLike,
    num_bins: int = 100,
    mask: ArrayLike | None = None,
) -> np.ndarray:
    """Per-token mutual information between two layers' binned softmax profiles (RMoE, Fig. 3).

    For each token t, each entry of the layer-a softmax p_a[t] ∈ Δ^{E-1} is discretised with
    ``np.digitize(p, np.linspace(0, 1, num_bins))`` (the paper's recipe: ``num_bins`` edges, so
    ``num_bins - 1`` intervals of width 1/(num_bins-1) plus a separate code for p = 1 exactly),
    likewise for layer b. The E expert positions are treated as E paired samples (u_n, v_n) and
    the plug-in MI is computed, as ``sklearn.metrics.mutual_info_score(u, v)`` does (nats):
    MI_t = Σ_{u,v} (n_uv/E) ln(E n_uv / (n_u n_v)). Bounded by ln E.

    With only E samples per token the plug-in estimate is strongly biased upwards: two
    *independent* random routers with E = 16 already score ≈ 0.2–1 nats depending on how peaked
    they are, and a uniform (constant) profile scores 0. Compare models on the same tokens and E
    rather than reading the value as an absolute amount of shared information.

    Vectorised over tokens (sort-based counting, O(N·E log E), in memory-bounded chunks).

    Args:
        probs_a, probs_b: [N, E] softmax over all experts for the same tokens at two layers.
        num_bins: number of bin edges over [0, 1] (paper: 100).
        mask: optional [N] bool.

    Returns:
        [N'] per-token MI in nats; the paper's layer-pair value is its mean.
    """
    pa = _probs(probs_a, mask, "probs_a")
    pb = _probs(probs_b, mask, "probs_b")
    if pa.shape != pb.shape:
        raise ValueError(
            f"probs_a {pa.shape} and probs_b {pb.shape} must have the same shape [N, E]; pass "
            "both layers' probabilities for the same tokens"
        )
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2; got {num_bins} (the paper uses 100)")
    n, e = pa.shape
    chunk = max(1, _MI_CHUNK_ELEMENTS // e)
    out = np.empty(n, dtype=np.float64)
    for s in range(0, n, chunk):
        ca = _bin_codes(pa[s : s + chunk], num_bins)
        cb = _bin_codes(pb[s : s + chunk], num_bins)
        s_ab = _sum_n_log_n(_joint_codes(ca, cb, num_bins))
        out[s : s + chunk] = _per_token_mi(_sum_n_log_n(ca), _sum_n_log_n(cb), s_ab, e)
    return out


def binned_mutual_information_matrix(
    probs: Sequence[ArrayLike] | ArrayLike,
    num_bins: int = 100,
    mask: ArrayLike | None = None,
) -> np.ndarray:
    """L×L matrix of token-averaged binned-profile MI between all layer pairs (RMoE, Fig. 3).

    Entry (a, b) is ``binned_mutual_information(probs[a], probs[b]).mean()``; the diagonal is the
    mean entropy of each layer's binned profile. Symmetric. See
    :func:`binned_mutual_information` for the estimator and its caveats (expert indices are not
    aligned across layers, so this measures co-variation of the probability *profile* and grows
    with flatness).

    Args:
        probs: L arrays [N, E] (or one [L, N, E] array) for the same N tokens and the same E
            (position n of layer a is paired with position n of layer b).
        num_bins: number of bin edges over [0, 1] (paper: 100).
        mask: optional [N] bool.

    Returns:
        [L, L] float64 matrix in nats.
    """
    layers = [_probs(p, mask, f"probs[{i}]") for i, p in enumerate(probs)]
    if not layers:
        raise ValueError("probs is empty; pass one [N, E] array per layer")
    n = layers[0].shape[0]
    if any(p.shape[0] != n for p in layers):
        raise ValueError(
            f"all layers must cover the same tokens; got token counts {[p.shape[0] for p in layers]}"
        )
    if any(p.shape[1] != layers[0].shape[1] for p in layers):
        raise ValueError(
            f"all layers must have the same number of experts E; got {[p.shape[1] for p in layers]}"
        )
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2; got {num_bins} (the paper uses 100)")
    num_layers, e = len(layers), layers[0].shape[1]
    chunk = max(1, _MI_CHUNK_ELEMENTS // (e * num_layers))
    total = np.zeros((num_layers, num_layers), dtype=np.float64)
    for s in range(0, n, chunk):
        codes = [_bin_codes(p[s : s + chunk], num_bins) for p in layers]
        singles = [_sum_n_log_n(c) for c in codes]
        for a in range(num_layers):
            total[a, a] += _per_token_mi(singles[a], singles[a], singles[a], e).sum()
            for b in range(a + 1, num_layers):
                s_ab = _sum_n_log_n(_joint_codes(codes[a], codes[b], num_bins))
                total[a, b] += _per_token_mi(singles[a], singles[b], s_ab, e).sum()
    total = np.triu(total) + np.triu(total, 1).T
    return total / n


def _plugin_mi(joint: np.ndarray) -> float:
    """Plug-in MI (nats) of a joint count/weight table."""
    pj = joint / joint.sum()
    pa = pj.sum(axis=1, keepdims=True)
    pb = pj.sum(axis=0, keepdims=True)
    nz = pj > 0
    return float(max(0.0, (pj[nz] * np.log(pj[nz] / (pa @ pb)[nz])).sum()))


def choice_entropy(
    topk: ArrayLike, num_experts: int | None = None, mask: ArrayLike | None = None
) -> float:
    """Entropy (nats) of the top-1 expert choice over tokens, from its plug-in histogram.

    Args:
        topk: [N, K] or [N] indices; column 0 (the top-1 choice) is used.
        num_experts: E, or ``None`` to infer max index + 1.
        mask: optional [N] bool.
    """
    idx = _topk(topk, num_experts, mask)[:, 0]
    e = _infer_num_experts(num_experts, idx)
    p = np.bincount(idx, minlength=e) / idx.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def index_mutual_information(
    topk_a: ArrayLike,
    topk_b: ArrayLike,
    num_experts: int | None = None,
    use_topk: bool = False,
    mask: ArrayLike | None = None,
) -> float:
    """Mutual information (nats) between two layers' expert choices over tokens.

    ``use_topk=False``: the plug-in MI of the E×E joint histogram of the top-1 indices
    (column 0) of the two layers. Equals the top-1 choice entropy when the routing is copied
    and tends to 0 for independent layers (plug-in bias ≈ (E-1)²/(2N) nats).

    ``use_topk=True``: every token contributes its K_a×K_b pairs of chosen experts, each with
    weight 1/(K_a K_b) (the normalised co-selection histogram P(i, j) = E_t[1{i∈S_a} 1{j∈S_b}] /
    (K_a K_b)); this is the MI between the experts obtained by drawing one of the token's chosen
    experts uniformly and independently at each layer. It reduces to the top-1 version for
    K = 1. It stays below the usage entropy even for copied routing, because two draws from the
    same set differ; when the chosen sets partition the experts it equals H(usage) - ln K.

    Args:
        topk_a, topk_b: [N, K_a], [N, K_b] indices (or [N]) for the same tokens.
        num_experts: E, or ``None`` to infer max index + 1.
        use_topk: use all top-k choices instead of only the top-1.
        mask: optional [N] bool.
    """
    ia = _topk(topk_a, num_experts, mask, "topk_a")
    ib = _topk(topk_b, num_experts, mask, "topk_b")
    if ia.shape[0] != ib.shape[0]:
        raise ValueError(
            f"topk_a has {ia.shape[0]} tokens but topk_b has {ib.shape[0]}; pass both layers' "
            "indices for the same tokens"
        )
    e = _infer_num_experts(num_experts, ia, ib)
    if not use_topk:
        ia, ib = ia[:, :1], ib[:, :1]
    ka, kb = ia.shape[1], ib.shape[1]
    codes = (ia[:, :, None] * e + ib[:, None, :]).ravel()
    joint = np.bincount(codes, minlength=e * e).reshape(e, e) / (ka * kb)
    return _plugin_mi(joint)


def index_mutual_information_matrix(
    topk: Sequence[ArrayLike] | ArrayLike,
    num_experts: int | None = None,
    use_topk: bool = False,
    mask: ArrayLike | None = None,
) -> np.ndarray:
    """L×L matrix of :func:`index_mutual_information` between all layer pairs (nats).

    The diagonal is each layer's choice entropy (use_topk=False). Symmetric.

    Args:
        topk: L arrays [N, K] (or one [L, N, K] array) for the same tokens.
        num_experts: E shared by all layers, or ``None`` to infer.
        use_topk: see :func:`index_mutual_information`.
        mask: optional [N] bool.
    """
    layers = [_topk(t, num_experts, mask, f"topk[{i}]") for i, t in enumerate(topk)]
    if not layers:
        raise ValueError("topk is empty; pass one [N, K] array per layer")
    e = _infer_num_experts(num_experts, *layers)
    num_layers = len(layers)
    out = np.zeros((num_layers, num_layers), dtype=np.float64)
    for a in range(num_layers):
        for b in range(a, num_layers):
            out[a, b] = out[b, a] = index_mutual_information(layers[a], layers[b], e, use_topk)
    return out


# --------------------------------------------------------------------------------------------
# agreement between checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingAgreement:
    """Routing agreement of two checkpoints on the same tokens at one layer.

    Attributes:
        top1_agreement: share of tokens whose top-1 expert is the same.
        mean_jaccard: mean over tokens of |A ∩ B| / |A ∪ B| of the top-k sets.
        num_tokens: tokens compared.
    """

    top1_agreement: float
    mean_jaccard: float
    num_tokens: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def routing_agreement(
    topk_a: ArrayLike, topk_b: ArrayLike, mask: ArrayLike | None = None
) -> RoutingAgreement:
    """Compare two checkpoints' routing of the same tokens at one layer.

    Args:
        topk_a, topk_b: [N, K_a], [N, K_b] chosen experts, column 0 the top-1 choice; rows must
            not repeat an expert. K may differ between the two.
        mask: optional [N] bool.
    """
    ia = _topk(topk_a, None, mask, "topk_a")
    ib = _topk(topk_b, None, mask, "topk_b")
    if ia.shape[0] != ib.shape[0]:
        raise ValueError(
            f"topk_a has {ia.shape[0]} tokens but topk_b has {ib.shape[0]}; pass both "
            "checkpoints' indices for the same tokens"
        )
    inter = (ia[:, :, None] == ib[:, None, :]).any(axis=2).sum(axis=1)
    union = ia.shape[1] + ib.shape[1] - inter
    return RoutingAgreement(
        top1_agreement=float((ia[:, 0] == ib[:, 0]).mean()),
        mean_jaccard=float((inter / union).mean()),
        num_tokens=int(ia.shape[0]),
    )


# --------------------------------------------------------------------------------------------
# one-call summary
# --------------------------------------------------------------------------------------------


def routing_layer_metrics(
    probs: ArrayLike,
    topk: ArrayLike,
    mask: ArrayLike | None = None,
    entropy_bins: int = 50,
) -> dict:
    """All single-layer routing metrics as one JSON-ready dict.

    Args:
        probs: [N, E] softmax over all experts.
        topk: [N, K] chosen experts.
        mask: optional [N] bool.
        entropy_bins: histogram bins for the entropy summary.

    Returns:
        {"load": LoadStats dict, "entropy": EntropySummary dict, "inner_balance": float,
        "outer_balance": float, "num_experts": E, "top_k": K}.
    """
    p = _probs(probs, mask)
    idx = _topk(topk, p.shape[1], mask)
    if idx.shape[0] != p.shape[0]:
        raise ValueError(
            f"topk has {idx.shape[0]} tokens but probs has {p.shape[0]}; pass both for the same "
            "tokens"
        )
    e = p.shape[1]
    out: dict = {
        "num_experts": e,
        "top_k": int(idx.shape[1]),
        "load": expert_load(idx, e).to_dict(),
        "entropy": entropy_summary(router_entropy(p), e, bins=entropy_bins).to_dict(),
        "outer_balance": outer_balance(p, idx),
    }
    out["inner_balance"] = inner_balance(p) if e >= 2 else float("nan")
    return out


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


def training_log_stats(router_logits: Sequence[Any], k: int) -> dict[str, list[float]]:
    """Per-MoE-layer statistics the trainer logs, from router logits (torch [N, E] each):
    load coefficient of variation, max load violation (max/mean - 1), mean normalised entropy
    and the Switch balance loss. Computed with torch on the logits' device (no host copy of
    the [N, E] tensors)."""
    import torch

    from rmoe.modeling.losses import load_balancing_loss
    from rmoe.modeling.losses import normalized_entropy as torch_normalized_entropy

    out: dict[str, list[float]] = {"load_cv": [], "max_violation": [], "entropy": [], "aux": []}
    for logits in router_logits:
        p = torch.softmax(logits.detach().float(), -1)
        idx = p.topk(k, -1).indices
        counts = torch.bincount(idx.reshape(-1), minlength=p.shape[-1]).float()
        mean = counts.mean()
        out["load_cv"].append((counts.std(unbiased=False) / mean).item())
        out["max_violation"].append((counts.max() / mean - 1).item())
        out["entropy"].append(torch_normalized_entropy(p).mean().item())
        out["aux"].append(load_balancing_loss(p, idx).item())
    return out
