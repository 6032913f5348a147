"""Dynamic analyses on real tokens: expert output similarity, output-norm vs router-score
ranks and activation ratios."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_numpy, to_tensor, token_mask
from rmoe.analysis.experts._common import _EPS

# Elements of one [chunk, E, E] block in expert_output_similarity.
_OUTPUT_CHUNK_ELEMENTS = 1 << 22


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
