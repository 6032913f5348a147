"""Router losses as pure functions (float32), each with a reference test: the Switch,
sequence-wise and counts-based (global) balance losses, the z-loss and the training objective.
Which balance loss a layer uses is a registered class in `rmoe.modeling.balancing`.

Shapes: N flattened tokens, E experts, K chosen experts per token.
"""

from __future__ import annotations

import math

import torch


def load_balancing_loss(
    probs: torch.Tensor,
    topk_idx: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of ONE MoE layer.

    loss = E * sum_e f_e * P_e, where f_e is the share of the layer's top-k assignments that go
    to expert e and P_e the mean router probability of expert e, both over the valid tokens.
    Under perfectly uniform routing the loss is 1.

    Args:
        probs: [N, E] softmax over all experts (float32).
        topk_idx: [N, K] chosen experts.
        token_mask: [N] bool/0-1, True for real (non-padding) tokens; None = all valid.

    Returns:
        Scalar float32 tensor.
    """
    n, e = probs.shape
    probs = probs.float()
    if token_mask is None:
        weights = probs.new_ones(n)
    else:
        weights = token_mask.reshape(n).to(probs.dtype)
    n_valid = weights.sum().clamp_min(1.0)
    k = topk_idx.shape[-1]
    counts = torch.zeros(e, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, topk_idx.reshape(-1), weights.repeat_interleave(k))
    f = counts / (n_valid * k)
    p_mean = (probs * weights[:, None]).sum(0) / n_valid
    return e * torch.sum(f * p_mean)


def expert_counts(
    topk_idx: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Assignments per expert: [E] float32 counts of topk_idx [N, K] over the valid tokens
    (token_mask [N], None = all)."""
    k = topk_idx.shape[-1]
    w = torch.ones(topk_idx.shape[0], device=topk_idx.device)
    if token_mask is not None:
        w = token_mask.reshape(-1).to(w.dtype)
    counts = torch.zeros(num_experts, device=topk_idx.device)
    return counts.index_add_(0, topk_idx.reshape(-1), w.repeat_interleave(k))


def balance_loss_from_counts(
    probs: torch.Tensor,
    counts: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """E * sum_e f_e * P_e with f_e = counts_e / sum(counts) (given, e.g. global counts) and
    P_e the mean probability over the valid local tokens. probs [N, E], counts [E].

    With the layer's own counts this is `load_balancing_loss`."""
    n, e = probs.shape
    probs = probs.float()
    weights = probs.new_ones(n) if token_mask is None else token_mask.reshape(n).to(probs.dtype)
    f = counts.float() / counts.sum().clamp_min(1.0)
    p_mean = (probs * weights[:, None]).sum(0) / weights.sum().clamp_min(1.0)
    return e * torch.sum(f * p_mean)


def sequence_balance_loss(
    probs: torch.Tensor,
    topk_idx: torch.Tensor,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (without its alpha).

    Per sequence of T valid tokens: f_e = E / (K * T) * #{t : e chosen for t},
    P_e = mean_t probs[t, e]; loss_seq = sum_e f_e P_e (1 under uniform routing); the result
    is the mean over sequences with at least one valid token.

    Args:
        probs: [B, T, E] distribution over experts (the normalised scores s').
        topk_idx: [B, T, K] chosen experts.
        token_mask: [B, T] True for real tokens; None = all valid.

    Returns:
        Scalar float32 tensor.
    """
    b, t, e = probs.shape
    k = topk_idx.shape[-1]
    probs = probs.float()
    w = probs.new_ones(b, t) if token_mask is None else token_mask.reshape(b, t).to(probs.dtype)
    n_valid = w.sum(1)
    onehot = torch.zeros(b, t, e, device=probs.device).scatter_add_(
        2, topk_idx, torch.ones_like(topk_idx, dtype=probs.dtype)
    )
    f = e / (k * n_valid.clamp_min(1.0))[:, None] * (onehot * w[..., None]).sum(1)
    p = (probs * w[..., None]).sum(1) / n_valid.clamp_min(1.0)[:, None]
    per_seq = (f * p).sum(-1)
    has = (n_valid > 0).to(per_seq.dtype)
    return (per_seq * has).sum() / has.sum().clamp_min(1.0)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over valid tokens of logsumexp(logits)^2.

    Args:
        logits: [N, E] router logits.
        token_mask: [N] True for real tokens; None = all valid.

    Returns:
        Scalar float32 tensor.
    """
    z = torch.logsumexp(logits.float(), dim=-1).square()
    if token_mask is None:
        return z.mean()
    w = token_mask.reshape(-1).to(z.dtype)
    return (z * w).sum() / w.sum().clamp_min(1.0)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-token router entropy divided by ln E, in [0, 1].

    Args:
        probs: [N, E] probabilities.

    Returns:
        [N] float32.
    """
    p = probs.float()
    e = p.shape[-1]
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return h / math.log(e) if e > 1 else torch.zeros_like(h)


def training_loss(
    lm_loss: torch.Tensor,
    aux_loss: torch.Tensor | None,
    z_loss: torch.Tensor | None,
    aux_coef: float,
    z_coef: float,
) -> torch.Tensor:
    """The training objective, composed here only: ``lm + aux_coef * aux (+ z_coef * z)``.

    The z-loss term is added only when ``z_coef > 0``; a missing (None) router loss adds
    nothing (models without MoE layers, or router losses not computed)."""
    loss = lm_loss
    if aux_loss is not None:
        loss = loss + aux_coef * aux_loss
    if z_loss is not None and z_coef > 0:
        loss = loss + z_coef * z_loss
    return loss
