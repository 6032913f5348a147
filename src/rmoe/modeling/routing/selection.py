"""The second and third router stages: score functions, then top-k selection with an optional
expert bias and an optional capacity.

Shapes: N tokens, E experts, K experts per token. All float32, whatever the model dtype.

    scores  = score_fn(logits)                      softmax over E, or per-expert sigmoid
    idx     = top-K of (scores + expert_bias)       the bias only decides WHICH experts
    weight  = scores[idx] (/ their sum) * scale     the combine weights never see the bias
    keep    = within each expert's capacity         assignments ranked by score; a dropped one
                                                    gets weight 0 (the residual carries it)

Score functions are registered in `rmoe.registry.SCORE_FUNCS` by `name`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ...registry import SCORE_FUNCS


class ScoreFunction:
    """logits [N, E] -> scores [N, E] float32; `distribution` turns scores into a distribution
    over experts (rows sum to 1) for the balance losses, entropies and GW-MoE."""

    name: ClassVar[str]

    @staticmethod
    def scores(logits: torch.Tensor) -> torch.Tensor:
        """[N, E] logits -> [N, E] float32 scores."""
        raise NotImplementedError

    @staticmethod
    def distribution(scores: torch.Tensor) -> torch.Tensor:
        """[N, E] scores -> [N, E] float32 rows that sum to one."""
        raise NotImplementedError


@SCORE_FUNCS.register
class SoftmaxScore(ScoreFunction):
    """Softmax over all E experts (Switch, Mixtral, RMoE); the scores are the distribution."""

    name = "softmax"

    @staticmethod
    def scores(logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    @staticmethod
    def distribution(scores: torch.Tensor) -> torch.Tensor:
        return scores


@SCORE_FUNCS.register
class SigmoidScore(ScoreFunction):
    """Per-expert sigmoid (DeepSeek-V3, arXiv 2412.19437): s_e = sigmoid(logit_e); the
    distribution is s / sum_e s (DeepSeek-V3's normalised s' of its sequence-wise loss)."""

    name = "sigmoid"

    @staticmethod
    def scores(logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    @staticmethod
    def distribution(scores: torch.Tensor) -> torch.Tensor:
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def select_experts(
    scores: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    norm_topk_prob: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the (biased) scores; combine weights from the unbiased scores.

    Args:
        scores: [N, E] float32 score-function output.
        k: experts per token.
        bias: [E] expert bias added for the choice only (aux-loss-free balancing), or None.
        norm_topk_prob: divide the k selected scores by their sum.
        scale: multiply the combine weights (DeepSeek-V3's routed scaling factor).

    Returns:
        topk_weight [N, K] float32, topk_idx [N, K] int64 (best first).
    """
    choice = scores if bias is None else scores + bias.to(scores.dtype)
    idx = torch.topk(choice, k, dim=-1).indices
    weight = scores.gather(-1, idx)
    if norm_topk_prob:
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if scale != 1.0:
        weight = weight * scale
    return weight, idx


def select_topk(
    logits: torch.Tensor, k: int, norm_topk_prob: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over all experts in float32, then top-k, then optional renormalisation.

    Args:
        logits: [N, E].

    Returns:
        probs [N, E] float32, topk_weight [N, K] float32, topk_idx [N, K] int64.
    """
    probs = SoftmaxScore.scores(logits)
    weight, idx = select_experts(probs, k, norm_topk_prob=norm_topk_prob)
    return probs, weight, idx


def expert_capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Switch / GShard capacity: ceil(factor * N * K / E) assignment slots per expert."""
    return max(1, math.ceil(factor * num_tokens * k / num_experts))


def capacity_keep(
    idx: torch.Tensor, priority: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which assignments fit in their expert's capacity.

    Each expert keeps its `capacity` assignments with the highest priority (ties: earlier
    token, then earlier slot); the rest are dropped.

    Args:
        idx: [N, K] chosen experts.
        priority: [N, K] the router score of each assignment.
        num_experts: E.
        capacity: slots per expert.

    Returns:
        [N, K] bool, True = kept.
    """
    flat_e = idx.reshape(-1)
    flat_p = priority.reshape(-1).float()
    by_score = torch.sort(flat_p, descending=True, stable=True).indices
    order = by_score[torch.sort(flat_e[by_score], stable=True).indices]
    sorted_e = flat_e[order]
    counts = torch.bincount(sorted_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=idx.device) - starts[sorted_e]
    keep = torch.empty_like(flat_e, dtype=torch.bool)
    keep[order] = rank < capacity
    return keep.view_as(idx)
