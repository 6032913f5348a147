"""Cross-layer mutual information: binned router profiles (RMoE's estimator) and chosen
expert indices, for one pair of layers or all pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rmoe.analysis._arrays import ArrayLike
from rmoe.analysis.routing._inputs import _infer_num_experts, _probs, _topk

# Token × expert codes processed at once in the binned-MI computation (memory bound).
_MI_CHUNK_ELEMENTS = 1 << 21


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
