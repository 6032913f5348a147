"""Neuron matching between experts (Hungarian assignment on neuron cosines, Closer-Look)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import kendalltau

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_tensor
from rmoe.analysis.experts._common import _EPS, _experts
from rmoe.analysis.experts.similarity import expert_cosine_similarity

# Default neighbourhood choice in match_expert_pairs: all pairs up to this many experts.
_ALL_PAIRS_MAX_EXPERTS = 16


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
