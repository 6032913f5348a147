"""Expert analyses: weight similarity, neuron matching, router/expert regression, PCA, output
similarity, norm-vs-score ranks, activation ratios and RMoE's expert-diversity score.

Canonical orientation
---------------------
Every expert matrix is passed as ``[E, F, D]``: E experts, F hidden ("intermediate") neurons,
D model width, **one row per neuron**. For a SwiGLU expert E(x) = W_down(W_up x ⊙ σ(W_act x)):

* ``act`` (= gate_proj, Mixtral w1) and ``up`` (= up_proj, w3) are stored by ``nn.Linear`` as
  [F, D] per expert, i.e. already canonical;
* ``down`` (= down_proj, w2) is stored as [D, F] per expert (transformers v5 fused
  ``experts.down_proj`` is [E, D, F]); transpose it with :func:`down_to_canonical`.

Neuron i of an expert is then (up[i], act[i], down[i]), as in the Closer-Look paper (Lo et al.,
NAACL 2025; ``shared/papers/gw-moe_and_closer-look.md`` Part B). The router weight is [E, D].

Inputs may be numpy arrays or torch tensors; heavy linear algebra runs in torch float32 on the
input tensor's device (so a GPU tensor is analysed on the GPU) and results come back as float64
numpy arrays or small frozen dataclasses with ``to_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import kendalltau, linregress

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_numpy, to_tensor, token_mask

__all__ = [
    "LinearFit",
    "NeuronMatch",
    "OutputSimilarity",
    "PCAResult",
    "activation_ratio",
    "down_to_canonical",
    "expert_cosine_similarity",
    "expert_diversity_score",
    "expert_output_norms",
    "expert_output_similarity",
    "expert_pca",
    "match_expert_pairs",
    "match_neurons",
    "neuron_average",
    "neuron_averaged_similarity",
    "neuron_pca",
    "norm_score_rank_counts",
    "pca",
    "rank_count_agreement",
    "router_similarity_regression",
    "select_pairs",
    "similarity_regression",
]

# Default neighbourhood choice in match_expert_pairs: all pairs up to this many experts.
_ALL_PAIRS_MAX_EXPERTS = 16
_EPS = 1e-12
# Elements of one [chunk, E, E] block in expert_output_similarity.
_OUTPUT_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _experts(w: ArrayLike, name: str = "w") -> torch.Tensor:
    """Validate an expert stack [E, F, D] and return it as float32 torch."""
    t = to_tensor(w, torch.float32, name)
    check_ndim(t, 3, name, "[E, F, D] (down_proj transposed, see down_to_canonical)")
    if min(t.shape) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one expert")
    return t


def _cosine_gram(x: torch.Tensor) -> np.ndarray:
    """[M, P] rows -> [M, M] cosine matrix (zero rows give 0), float64 numpy."""
    xn = torch.nn.functional.normalize(x, dim=-1, eps=_EPS)
    return (xn @ xn.T).clamp_(-1.0, 1.0).double().cpu().numpy()


def down_to_canonical(w_down: ArrayLike) -> ArrayLike:
    """Transpose a down projection stored as [E, D, F] (``nn.Linear`` / transformers v5 fused
    ``experts.down_proj`` layout) into the canonical [E, F, D]. Returns the same array type."""
    if isinstance(w_down, torch.Tensor):
        check_ndim(w_down, 3, "w_down", "[E, D, F]")
        return w_down.transpose(1, 2)
    arr = np.asarray(w_down)
    check_ndim(arr, 3, "w_down", "[E, D, F]")
    return np.swapaxes(arr, 1, 2)


# --------------------------------------------------------------------------------------------
# weight similarity
# --------------------------------------------------------------------------------------------


def expert_cosine_similarity(w: ArrayLike) -> np.ndarray:
    """Cosine similarity between experts' flattened matrices (Closer-Look Fig. 1).

    S_nm = cos(vec W^n, vec W^m) for one matrix type.

    Args:
        w: [E, F, D] expert matrices of one type (any [E, ...] works; it is flattened).

    Returns:
        [E, E] float64, diagonal 1 (0 for an all-zero expert).
    """
    t = to_tensor(w, torch.float32, "w")
    if t.ndim < 2:
        raise ValueError(f"w must have shape [E, F, D]; got shape {tuple(t.shape)}")
    return _cosine_gram(t.reshape(t.shape[0], -1))


def neuron_average(w: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """Average each expert's matrix over its neurons (the F axis): [E, F, D] -> [E, D].

    Args:
        w: one [E, F, D] stack, or a sequence whose items are [E_i, F_i, D] stacks or single
            [F_i, D] experts (e.g. ``[routed, shared]`` with a shared expert of a different F);
            the outputs are concatenated in order.

    Returns:
        [sum E_i, D] float64 neuron-averaged vectors.
    """
    items = [w] if isinstance(w, (np.ndarray, torch.Tensor)) else list(w)
    if not items:
        raise ValueError("w is empty; pass an [E, F, D] stack or a list of stacks/experts")
    rows: list[torch.Tensor] = []
    for i, item in enumerate(items):
        t = to_tensor(item, torch.float32, f"w[{i}]")
        if t.ndim == 2:
            t = t[None]
        check_ndim(t, 3, f"w[{i}]", "[E, F, D] or [F, D]")
        rows.append(t.mean(dim=1).cpu())
    dims = {r.shape[1] for r in rows}
    if len(dims) != 1:
        raise ValueError(
            f"all experts must share the model width D; got D values {sorted(dims)}; check the "
            "orientation (down_proj must be transposed to [E, F, D])"
        )
    return torch.cat(rows).double().numpy()


def neuron_averaged_similarity(w: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """Cosine similarity of neuron-averaged experts (Closer-Look App. D, Fig. 8).

    w̄^n = mean_i W^n[i, :] ∈ R^D, then cos(w̄^n, w̄^m). Invariant to neuron permutations and
    usable with experts of different F (e.g. a DeepSeek/Qwen shared expert).

    Args:
        w: as in :func:`neuron_average`.

    Returns:
        [E_total, E_total] float64.
    """
    return _cosine_gram(torch.from_numpy(neuron_average(w)))


# --------------------------------------------------------------------------------------------
# neuron matching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronMatch:
    """Result of matching the neurons of expert b onto those of expert a.

    Attributes:
        permutation: [F] int; neuron i of a is matched with neuron ``permutation[i]`` of b, so
            ``w_b[permutation]`` is b reordered to align with a.
        mean_matched_cosine: mean_i cos(a[i], b[perm[i]]) — the maximised objective / F.
        mean_identity_cosine: mean_i cos(a[i], b[i]) before reordering.
        flat_cosine_before: cos(vec a, vec b).
        flat_cosine_after: cos(vec a, vec b[perm]) (the Closer-Look Tab. 2 number).
        kendall_tau: Kendall τ between the identity order and ``permutation`` (1 = already
            aligned, ≈ 0 = unrelated order).
        pair: (a, b) expert indices when produced by :func:`match_expert_pairs`, else None.
    """

    permutation: np.ndarray = field(repr=False)
    mean_matched_cosine: float
    mean_identity_cosine: float
    flat_cosine_before: float
    flat_cosine_after: float
    kendall_tau: float
    pair: tuple[int, int] | None = None

    def to_dict(self, include_permutation: bool = False) -> dict:
        """JSON-ready dict; the permutation is left out unless asked for (it has F entries)."""
        d = asdict(self)
        if include_permutation:
            d["permutation"] = self.permutation.tolist()
        else:
            del d["permutation"]
        d["pair"] = list(self.pair) if self.pair is not None else None
        return d


def _match_rows(a: torch.Tensor, b: torch.Tensor, pair: tuple[int, int] | None) -> NeuronMatch:
    """Core of :func:`match_neurons` on validated float32 tensors [F, D].

    One F×F Gram matrix G = a bᵀ gives both the neuron cosines G_ij / (‖a_i‖‖b_j‖) and the
    flattened cosines before/after reordering, Σ_i G_{i,π(i)} / (‖a‖‖b‖), without forming the
    permuted matrix.
    """
    gram = (a @ b.T).double().cpu().numpy()
    na = a.double().norm(dim=1).cpu().numpy()
    nb = b.double().norm(dim=1).cpu().numpy()
    cos = np.clip(gram / np.maximum(np.outer(na, nb), _EPS), -1.0, 1.0)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    perm = cols[np.argsort(rows)]
    f = perm.size
    idx = np.arange(f)
    denom = max(math.sqrt(float((na**2).sum()) * float((nb**2).sum())), _EPS)
    tau = kendalltau(idx, perm)[0] if f > 1 else 1.0
    return NeuronMatch(
        permutation=perm,
        mean_matched_cosine=float(cos[idx, perm].mean()),
        mean_identity_cosine=float(np.diag(cos).mean()),
        flat_cosine_before=float(np.trace(gram)) / denom,
        flat_cosine_after=float(gram[idx, perm].sum()) / denom,
        kendall_tau=float(tau),
        pair=pair,
    )


def match_neurons(w_a: ArrayLike, w_b: ArrayLike) -> NeuronMatch:
    """Optimally match the neurons (rows) of two experts (Closer-Look Tab. 2, "reordering").

    C_ij = cos(w_a[i], w_b[j]) is an F×F matrix; the permutation maximising Σ_i C_{i,π(i)} comes
    from ``scipy.optimize.linear_sum_assignment(C, maximize=True)``. The paper reorders each
    matrix type separately; to match whole neurons jointly, concatenate the types along D
    (e.g. ``np.concatenate([up, act, down], axis=-1)``) before calling.

    Cost: one F×F×D matmul plus an O(F³) assignment: ≈0.25 s for F = 1024, D = 2048 on a
    2-core CPU (random weights; matmul ≈0.1 s, assignment ≈0.15 s).

    Args:
        w_a, w_b: [F, D] matrices of the same type from two experts.
    """
    a = to_tensor(w_a, torch.float32, "w_a")
    b = to_tensor(w_b, torch.float32, "w_b")
    check_ndim(a, 2, "w_a", "[F, D]")
    check_ndim(b, 2, "w_b", "[F, D]")
    if a.shape != b.shape:
        raise ValueError(
            f"w_a {tuple(a.shape)} and w_b {tuple(b.shape)} must have the same shape [F, D]; "
            "neuron matching needs experts of equal size (compare a shared expert with "
            "neuron_averaged_similarity instead)"
        )
    return _match_rows(a, b.to(a.device), None)


def select_pairs(
    w: ArrayLike, pairs: str | Sequence[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """The expert pairs :func:`match_expert_pairs` will match.

    Args:
        w: [E, F, D] expert matrices.
        pairs: ``None`` (default) = "all" when E <= 16, else "nearest"; "all" = every
            unordered pair (E(E-1)/2); "nearest" = each expert with its most similar other
            expert by flattened cosine (:func:`expert_cosine_similarity`), duplicates removed
            (at most E pairs); "adjacent" = (0,1), (1,2), …; or an explicit list of (a, b).

    Returns:
        Sorted list of (a, b) with a < b (explicit lists are kept in the given order).
    """
    t = _experts(w)
    e = t.shape[0]
    if pairs is None:
        pairs = "all" if e <= _ALL_PAIRS_MAX_EXPERTS else "nearest"
    if isinstance(pairs, str):
        if e < 2:
            raise ValueError(f"need at least 2 experts to form pairs; got E = {e}")
        if pairs == "all":
            return [(a, b) for a in range(e) for b in range(a + 1, e)]
        if pairs == "adjacent":
            return [(a, a + 1) for a in range(e - 1)]
        if pairs == "nearest":
            sim = expert_cosine_similarity(t)
            np.fill_diagonal(sim, -np.inf)
            nn = sim.argmax(axis=1)
            return sorted({(min(a, int(b)), max(a, int(b))) for a, b in enumerate(nn)})
        raise ValueError(
            f"pairs must be 'all', 'nearest', 'adjacent', None or a list of (a, b); got {pairs!r}"
        )
    out: list[tuple[int, int]] = []
    for p in pairs:
        a, b = (int(v) for v in p)
        if not (0 <= a < e and 0 <= b < e) or a == b:
            raise ValueError(
                f"pair {(a, b)} is invalid for E = {e}; use two different indices in [0, {e})"
            )
        out.append((a, b))
    return out


def match_expert_pairs(
    w: ArrayLike, pairs: str | Sequence[tuple[int, int]] | None = None
) -> list[NeuronMatch]:
    """Run :func:`match_neurons` on pairs of experts of one layer and one matrix type.

    All E(E-1)/2 pairs cost E(E-1)/2 assignments: for OLMoE (E = 64, F = 1024, D = 2048) that is
    2016 × ≈0.15–0.2 s ≈ 5–7 min per matrix type per layer on 2 CPU cores, hence the default of
    nearest-neighbour pairs when E > 16 (see :func:`select_pairs`).

    Args:
        w: [E, F, D] expert matrices of one type.
        pairs: see :func:`select_pairs`.

    Returns:
        One :class:`NeuronMatch` per pair, with ``pair`` set.
    """
    t = _experts(w)
    return [_match_rows(t[a], t[b], (a, b)) for a, b in select_pairs(t, pairs)]


# --------------------------------------------------------------------------------------------
# router vs expert similarity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearFit:
    """Least-squares fit y = slope·x + intercept over the E(E-1)/2 expert pairs.

    Attributes:
        slope, intercept: fit coefficients.
        r: Pearson correlation; r2 = r².
        p_value: two-sided p-value of slope = 0 (``scipy.stats.linregress``).
        num_pairs: number of expert pairs fitted.
    """

    slope: float
    intercept: float
    r: float
    r2: float
    p_value: float
    num_pairs: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def similarity_regression(sim_y: ArrayLike, sim_x: ArrayLike) -> LinearFit:
    """Fit the strict upper triangle of ``sim_y`` [E, E] linearly on that of ``sim_x`` [E, E].

    Raises ``ValueError`` when E < 3 or ``sim_x`` is constant (no fit is defined).
    """
    y = to_numpy(sim_y, np.float64, "sim_y")
    x = to_numpy(sim_x, np.float64, "sim_x")
    check_ndim(y, 2, "sim_y", "[E, E]")
    if x.shape != y.shape or y.shape[0] != y.shape[1]:
        raise ValueError(
            f"sim_y {y.shape} and sim_x {x.shape} must be square matrices of the same shape [E, E]"
        )
    e = y.shape[0]
    if e < 3:
        raise ValueError(f"a regression over expert pairs needs E >= 3 experts; got E = {e}")
    iu = np.triu_indices(e, k=1)
    xv, yv = x[iu], y[iu]
    if np.ptp(xv) == 0:
        raise ValueError(
            "sim_x is constant over expert pairs, so no regression is defined; this happens "
            "when all experts are identical or mutually orthogonal"
        )
    res = linregress(xv, yv)
    r = float(res.rvalue) if np.isfinite(res.rvalue) else 0.0
    return LinearFit(
        slope=float(res.slope),
        intercept=float(res.intercept),
        r=r,
        r2=r * r,
        p_value=float(res.pvalue),
        num_pairs=int(xv.size),
    )


def router_similarity_regression(
    router_weight: ArrayLike, experts: Mapping[str, ArrayLike]
) -> dict[str, LinearFit]:
    """Regress router-row similarity on neuron-averaged expert similarity (Closer-Look §4.2).

    G_nm = cos(W_g[n], W_g[m]) is regressed on S^avg_nm(W) for each matrix type W over the
    E(E-1)/2 expert pairs; the paper reports R² per layer (mean: act ≈ 0.15–0.40, up/down ≈ 0).

    Args:
        router_weight: [E, D] router (gate) weight.
        experts: {"up": [E, F, D], "act": [E, F, D], "down": [E, F, D], …} matrix stacks.

    Returns:
        {matrix type: :class:`LinearFit`}.
    """
    r = to_tensor(router_weight, torch.float32, "router_weight")
    check_ndim(r, 2, "router_weight", "[E, D]")
    g = _cosine_gram(r)
    out: dict[str, LinearFit] = {}
    for name, w in experts.items():
        s = neuron_averaged_similarity(_experts(w, f"experts[{name!r}]"))
        if s.shape != g.shape:
            raise ValueError(
                f"experts[{name!r}] has {s.shape[0]} experts but router_weight has {g.shape[0]} "
                "rows; pass the routed experts of the same layer"
            )
        out[name] = similarity_regression(g, s)
    return out


# --------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PCAResult:
    """Principal-component projection.

    Attributes:
        coords: [M, k] coordinates of the M points on the first k components.
        explained_variance_ratio: [k] share of total variance per component.
        labels: [M] int group label per point (expert index for :func:`neuron_pca`), or None.
    """

    coords: np.ndarray = field(repr=False)
    explained_variance_ratio: np.ndarray
    labels: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready dict (coordinates included)."""
        return {
            "coords": self.coords.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "labels": None if self.labels is None else self.labels.tolist(),
        }


def pca(x: ArrayLike, n_components: int = 2, standardize: bool = True) -> PCAResult:
    """Exact PCA of M points [M, P] via an eigendecomposition of the smaller Gram/covariance.

    Columns are centred, and with ``standardize`` divided by their std across points (the
    Closer-Look recipe; zero-variance columns are left at 0). Component signs are fixed so the
    largest-magnitude coordinate of each component is positive (deterministic output).

    Args:
        x: [M, P] points.
        n_components: k <= min(M, P).
        standardize: scale columns to unit variance.

    Returns:
        :class:`PCAResult` with coords [M, k] and explained-variance ratios [k].
    """
    t = to_tensor(x, torch.float32, "x")
    check_ndim(t, 2, "x", "[M, P]")
    m, p = t.shape
    if not 1 <= n_components <= min(m, p):
        raise ValueError(
            f"n_components must be in [1, min(M, P)] = [1, {min(m, p)}]; got {n_components}"
        )
    t = t - t.mean(dim=0, keepdim=True)
    if standardize:
        std = t.std(dim=0, unbiased=False, keepdim=True)
        t = torch.where(std > 0, t / std.clamp_min(_EPS), torch.zeros_like(t))
    if m <= p:
        gram = (t @ t.T).double()
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        # Left singular vectors u_i with s_i² = λ_i; projections are u_i s_i.
        coords = evecs[:, :n_components] * evals[:n_components].sqrt()
    else:
        cov = (t.T @ t).double()
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        coords = (t @ evecs[:, :n_components].to(t.dtype)).double()  # no float64 copy of x
    total = evals.sum()
    ratio = evals[:n_components] / total if total > 0 else torch.zeros(n_components)
    coords = coords.cpu().numpy()
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), np.arange(n_components)])
    coords = coords * np.where(signs == 0, 1.0, signs)
    return PCAResult(coords=coords, explained_variance_ratio=ratio.cpu().numpy())


def expert_pca(
    w: ArrayLike, mode: str = "flat", n_components: int = 2, standardize: bool = True
) -> PCAResult:
    """PCA with one point per expert (Closer-Look App. C, Fig. 6).

    Args:
        w: [E, F, D] expert matrices of one type (down transposed).
        mode: "flat" (point = vec W^n, length F·D) or "neuron_avg" (point = mean over F, length D).
        n_components: number of components (<= E).
        standardize: see :func:`pca`.
    """
    t = _experts(w)
    if mode == "flat":
        pts = t.reshape(t.shape[0], -1)
    elif mode == "neuron_avg":
        pts = t.mean(dim=1)
    else:
        raise ValueError(f"mode must be 'flat' or 'neuron_avg'; got {mode!r}")
    res = pca(pts, n_components, standardize)
    return PCAResult(res.coords, res.explained_variance_ratio, np.arange(t.shape[0]))


def neuron_pca(w: ArrayLike, n_components: int = 2, standardize: bool = True) -> PCAResult:
    """PCA with one point per neuron of every expert (Closer-Look App. C, Fig. 7).

    Args:
        w: [E, F, D] expert matrices of one type.

    Returns:
        :class:`PCAResult` with coords [E·F, k] and labels [E·F] = expert index of each neuron.
    """
    t = _experts(w)
    e, f, d = t.shape
    res = pca(t.reshape(e * f, d), n_components, standardize)
    return PCAResult(res.coords, res.explained_variance_ratio, np.repeat(np.arange(e), f))


# --------------------------------------------------------------------------------------------
# dynamic (output) analyses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputSimilarity:
    """Token-averaged similarity of expert outputs.

    Attributes:
        cosine: [E, E] mean over tokens of cos(E_n(x_t), E_m(x_t)).
        angular: [E, E] mean over tokens of 1 - arccos(cos)/π (Closer-Look Fig. 3), diagonal 1.
        num_tokens: tokens averaged.
    """

    cosine: np.ndarray
    angular: np.ndarray
    num_tokens: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "cosine": self.cosine.tolist(),
            "angular": self.angular.tolist(),
            "num_tokens": self.num_tokens,
        }


def expert_output_similarity(outputs: ArrayLike, mask: ArrayLike | None = None) -> OutputSimilarity:
    """Similarity of every expert's (unweighted) output on the same tokens.

    Args:
        outputs: [E, N, D] output of expert n on token t (all experts run on all tokens).
        mask: optional [N] bool.

    Returns:
        :class:`OutputSimilarity` (mean cosine and mean angular similarity, each [E, E]).
    """
    t = to_tensor(outputs, torch.float32, "outputs")
    check_ndim(t, 3, "outputs", "[E, N, D]")
    m = token_mask(mask, t.shape[1])
    if m is not None:
        t = t[:, torch.as_tensor(m, device=t.device)]
    e, n, _ = t.shape
    tn = torch.nn.functional.normalize(t, dim=-1, eps=_EPS).transpose(0, 1)  # [N, E, D]
    cos_sum = torch.zeros(e, e, dtype=torch.float64, device=t.device)
    ang_sum = torch.zeros(e, e, dtype=torch.float64, device=t.device)
    chunk = max(1, _OUTPUT_CHUNK_ELEMENTS // (e * e))
    for s in range(0, n, chunk):
        c = (tn[s : s + chunk] @ tn[s : s + chunk].transpose(1, 2)).double().clamp_(-1.0, 1.0)
        cos_sum += c.sum(dim=0)
        ang_sum += (1.0 - torch.arccos(c) / math.pi).sum(dim=0)
    angular = (ang_sum / n).cpu().numpy()
    np.fill_diagonal(angular, 1.0)
    return OutputSimilarity(cosine=(cos_sum / n).cpu().numpy(), angular=angular, num_tokens=n)


def expert_output_norms(outputs: ArrayLike) -> np.ndarray:
    """‖E_n(x_t)‖₂ from outputs [E, N, D], returned as [N, E] float64 (token-major like scores)."""
    t = to_tensor(outputs, torch.float32, "outputs")
    check_ndim(t, 3, "outputs", "[E, N, D]")
    return t.norm(dim=-1).T.double().cpu().numpy()


def _descending_ranks(x: np.ndarray) -> np.ndarray:
    """Per row, rank 0 for the largest value; ties broken by lower index first."""
    order = np.argsort(-x, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(x.shape[1])[None, :].repeat(x.shape[0], 0), axis=1)
    return ranks


def norm_score_rank_counts(
    norms: ArrayLike, scores: ArrayLike, mask: ArrayLike | None = None
) -> np.ndarray:
    """Count matrix of expert output-norm rank vs router-score rank (Closer-Look Fig. 4).

    For every token, experts are ranked by ‖E_n(x)‖ and by the router score (rank 0 = largest;
    ties go to the lower expert index); C[r_norm, r_score] counts (token, expert) pairs. A strong
    diagonal means the router prefers high-norm experts. Note the paper's matrix is
    M[score_rank, norm_rank] with rank E = largest, i.e. ``C.T`` flipped on both axes.

    Args:
        norms: [N, E] expert output norms (see :func:`expert_output_norms`).
        scores: [N, E] router scores (softmax over all experts from the raw logits).
        mask: optional [N] bool.

    Returns:
        [E, E] int64 counts summing to N·E.
    """
    nrm = to_numpy(norms, np.float64, "norms")
    sc = to_numpy(scores, np.float64, "scores")
    check_ndim(nrm, 2, "norms", "[N, E]")
    if nrm.shape != sc.shape:
        raise ValueError(
            f"norms {nrm.shape} and scores {sc.shape} must both be [N, E]; transpose norms "
            "computed as [E, N] (expert_output_norms returns [N, E])"
        )
    m = token_mask(mask, nrm.shape[0])
    if m is not None:
        nrm, sc = nrm[m], sc[m]
    e = nrm.shape[1]
    codes = _descending_ranks(nrm) * e + _descending_ranks(sc)
    return np.bincount(codes.ravel(), minlength=e * e).reshape(e, e).astype(np.int64)


def rank_count_agreement(counts: ArrayLike) -> float:
    """Diagonal mass of a rank count matrix: the share of (token, expert) pairs whose norm rank
    equals their score rank (1/E expected by chance)."""
    c = to_numpy(counts, np.float64, "counts")
    check_ndim(c, 2, "counts", "[E, E]")
    total = c.sum()
    if total <= 0:
        raise ValueError("counts is empty (sums to 0); pass the output of norm_score_rank_counts")
    return float(np.trace(c) / total)


def activation_ratio(
    activations: ArrayLike, threshold: float = 1e-3, expert_axis: int | None = None
) -> float | np.ndarray:
    """Share of intermediate activations with |a| > threshold (Closer-Look App. H).

    Args:
        activations: any shape, e.g. [E, N, F] of a_n(x) = σ(W_act^n x).
        threshold: magnitude threshold (paper: 1e-3).
        expert_axis: if given, return one ratio per index along this axis ([E]); else a float.
    """
    a = to_tensor(activations, torch.float32, "activations")
    if a.numel() == 0:
        raise ValueError("activations is empty; pass at least one activation")
    active = a.abs() > threshold
    if expert_axis is None:
        return float(active.double().mean())
    if not -a.ndim <= expert_axis < a.ndim:
        raise ValueError(f"expert_axis {expert_axis} is out of range for {a.ndim}-D activations")
    per = active.movedim(expert_axis, 0).reshape(a.shape[expert_axis], -1)
    return per.double().mean(dim=1).cpu().numpy()


# --------------------------------------------------------------------------------------------
# RMoE diversity score
# --------------------------------------------------------------------------------------------


def expert_diversity_score(matrices: Sequence[ArrayLike], normalize: bool = False) -> float:
    """RMoE's expert-similarity score of one layer (RMoE paper Fig. 5/13, App. A.4.3).

    Recipe: for each expert, average each matrix over its hidden (F) axis to one D-vector,
    L2-normalise each vector, concatenate the M vectors, form the E×E Gram matrix and average
    **all** its entries, diagonal included. Lower = more diverse.

    With M matrix types, identical experts give M (each Gram entry sums M unit cosines) and
    random experts ≈ M/E (only the diagonal survives), e.g. 3/16 ≈ 0.19 for SwiGLU with 16
    experts — the scale of the paper's plots. ``normalize=True`` divides by M so that identical
    experts give 1 and random ones ≈ 1/E.

    Args:
        matrices: M stacks [E, F, D] (e.g. [act, up, down] with down transposed); all share E
            and D, F may differ between types.
        normalize: divide by M.

    Returns:
        The score (float).
    """
    stacks = [_experts(w, f"matrices[{i}]") for i, w in enumerate(matrices)]
    if not stacks:
        raise ValueError("matrices is empty; pass the layer's expert stacks, e.g. [act, up, down]")
    shapes = {(s.shape[0], s.shape[2]) for s in stacks}
    if len(shapes) != 1:
        raise ValueError(
            f"all matrices must share E and D; got (E, D) = {sorted(shapes)}; transpose "
            "down_proj with down_to_canonical"
        )
    vecs = torch.cat(
        [torch.nn.functional.normalize(s.mean(dim=1).double(), dim=-1, eps=_EPS) for s in stacks],
        dim=1,
    )
    score = float((vecs @ vecs.T).mean())
    return score / len(stacks) if normalize else score
