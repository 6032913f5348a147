"""Router losses as pure functions (float32), each with a reference test.

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
