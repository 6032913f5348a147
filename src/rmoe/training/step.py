"""One optimizer step: forward/backward over the micro-batches, then clip, mask and update.

:func:`accumulate_gradients` and :func:`apply_update` are the two halves of a training step, so
the caller can check the loss (NaN/Inf) before the weights change. Pre-training
(:mod:`rmoe.training.trainer`) uses both; fine-tuning (:mod:`rmoe.training.sft`) has its own
forward (answers only) and shares :func:`apply_update`, with a gradient masker built by its
caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..modeling.losses import training_loss


class GradientMasker(Protocol):
    """Edits the gradients after backward and before the optimizer step (e.g. MIGU)."""

    def apply_(self) -> None:
        """Mask the gradients of the covered weights in place."""


@dataclass
class StepRecord:
    """What one optimizer step measured (means over micro-batches and processes).

    Attributes:
        loss: the training objective (LM + weighted router losses).
        lm_loss: next-token cross-entropy, nats.
        aux_loss: balance loss, unweighted, mean over MoE layers (0 without MoE layers).
        z_loss: router z-loss, unweighted (0 when not computed).
        grad_norm: total gradient norm before clipping (None when clipping is off).
        routing: per-MoE-layer routing statistics of the last micro-batch, when asked for
            (see :func:`rmoe.analysis.routing.training_log_stats`).
    """

    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float | None = None
    routing: dict[str, list[float]] | None = None


def lm_losses(
    model: torch.nn.Module,
    config: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    output_router_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Forward pass on inputs x [B, T] with next tokens y [B, T].

    Returns:
        ``(loss, lm, aux, z, output)``: the objective composed by
        :func:`rmoe.modeling.losses.training_loss` with ``config``'s coefficients, its parts
        (a zero where the model computed no router loss) and the model output.
    """
    out = model(input_ids=x, use_cache=False, output_router_logits=output_router_logits)
    lm = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
    aux = out.aux_loss if out.aux_loss is not None else lm.new_zeros(())
    z = out.z_loss if out.z_loss is not None else lm.new_zeros(())
    loss = training_loss(lm, aux, z, config.router_aux_loss_coef, config.router_z_loss_coef)
    return loss, lm, aux, z, out


def accumulate_gradients(
    train_model: torch.nn.Module,
    config: Any,
    micro_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    accum: int,
    *,
    amp: torch.dtype | None = None,
    world_size: int = 1,
    log_routing: bool = False,
) -> StepRecord:
    """Forward and backward over ``accum`` micro-batches (gradients summed, each loss / accum).

    Under DDP the gradient all-reduce runs on the last micro-batch only (``no_sync`` before),
    and the logged losses are averaged over processes. ``log_routing`` asks the model for its
    router logits on the last micro-batch and records the per-layer routing statistics.
    """
    from ..analysis.routing import training_log_stats

    acc = torch.zeros(4, dtype=torch.float64)
    routing = None
    for i in range(accum):
        x, y = next(micro_batches)
        last = i == accum - 1
        skip_sync = world_size > 1 and not last and hasattr(train_model, "no_sync")
        with train_model.no_sync() if skip_sync else nullcontext():
            with torch.autocast(x.device.type, amp) if amp else nullcontext():
                loss, lm, aux, z, out = lm_losses(
                    train_model, config, x, y, output_router_logits=log_routing and last
                )
            (loss / accum).backward()
        acc += torch.tensor([loss.item(), lm.item(), aux.item(), z.item()], dtype=torch.float64)
        if log_routing and last and out.router_logits is not None:
            routing = training_log_stats(out.router_logits, config.num_experts_per_tok)
    acc /= accum
    if world_size > 1:
        acc_t = acc.to(x.device)
        dist.all_reduce(acc_t)
        acc = acc_t.cpu() / world_size
    loss_v, lm_v, aux_v, z_v = (v.item() for v in acc)
    return StepRecord(loss=loss_v, lm_loss=lm_v, aux_loss=aux_v, z_loss=z_v, routing=routing)


def apply_update(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    params: Iterable[torch.nn.Parameter],
    grad_clip: float = 0.0,
    masker: GradientMasker | None = None,
) -> float | None:
    """Mask (if a masker is given), clip to ``grad_clip`` (if > 0), step the optimizer and the
    schedule.

    Returns:
        The total gradient norm before clipping, or None when clipping is off.
    """
    if masker is not None:
        masker.apply_()
    gnorm = None
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
            norm = norm.full_tensor()
        gnorm = float(norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return gnorm
