"""One optimizer step: forward/backward over the micro-batches, then clip, mask and update.

:func:`accumulate_gradients` and :func:`apply_update` are the two halves of a training step, so
the caller can check the loss (NaN/Inf) before the weights change. Pre-training
(:mod:`rmoe.training.trainer`) uses both; fine-tuning (:mod:`rmoe.training.sft`) has its own
forward (answers only) and shares :func:`apply_update`, with a gradient masker built by its
caller.

Router state that lives for one optimizer step (the expert loads the aux-loss-free bias update
reads, the "global" balance loss's accumulated counts) is closed by an optimizer-step pre-hook
that :func:`attach_router_step` installs on the unwrapped model: the bias moves once per
optimizer step, from the loads summed over the step's micro-batches and all-reduced over
processes, whatever loop drives the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from ..modeling.balancing import Balancer, bias_routers, install_router_step_hook
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
        routing: per-MoE-layer routing statistics of the last micro-batch (on this process),
            when asked for (see :func:`rmoe.analysis.routing.training_log_stats`: load_cv,
            max_violation, entropy, aux, dropped, and bias_range with an expert bias).
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
    output_routing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """Forward pass on inputs x [B, T] with next tokens y [B, T] (``output_routing``: the
    output carries every MoE layer's `RoutingResult` as ``.routing``).

    Returns:
        ``(loss, lm, aux, z, output)``: the objective composed by
        :func:`rmoe.modeling.losses.training_loss` with ``config``'s coefficients, its parts
        (a zero where the model computed no router loss) and the model output.
    """
    kw = {"output_routing": True} if output_routing else {}
    out = model(input_ids=x, use_cache=False, output_router_logits=output_router_logits, **kw)
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
    routing (`RoutingResult` per MoE layer) on the last micro-batch and records the per-layer
    routing statistics, with the routers' expert biases (the values this step routed with).
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
                    train_model, config, x, y, output_routing=log_routing and last
                )
            (loss / accum).backward()
        acc += torch.tensor([loss.item(), lm.item(), aux.item(), z.item()], dtype=torch.float64)
        if log_routing and last and getattr(out, "routing", None):
            biases = [r.expert_bias for r in bias_routers(train_model)] or None
            routing = training_log_stats(out.routing, biases)
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


def discard_router_step(model: torch.nn.Module) -> None:
    """Forget the router state of the current optimizer step without acting on it: the expert
    loads recorded since the last bias update and the balance losses' step buffers (e.g. the
    "global" loss's counts). The biases do not move."""
    for router in bias_routers(model):
        router.take_load()
    for module in model.modules():
        if isinstance(module, Balancer):
            module.reset_step()


def attach_router_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, update_bias: bool = True
) -> RemovableHandle:
    """Close the routers' step state once per ``optimizer.step()`` (an optimizer-step pre-hook).

    State recorded before the call (forward passes in training mode outside any step) is
    discarded first, so the first step's bias update reads that step's loads only. With
    ``update_bias`` the hook is :func:`rmoe.modeling.balancing.install_router_step_hook`
    (expert biases += rate * sign(mean load - load) from the step's loads, summed over
    micro-batches and all-reduced over processes; balance-loss buffers reset); without it the
    state is only discarded (frozen routers: the biases stay as they are).

    Args:
        model: the unwrapped model (its modules are the wrapper's too).
        optimizer: the optimizer whose steps end the router steps.

    Returns:
        The hook's handle (``.remove()`` to uninstall).
    """
    discard_router_step(model)
    if update_bias:
        return install_router_step_hook(model, optimizer)

    def hook(opt, args, kwargs) -> None:
        discard_router_step(model)

    return optimizer.register_step_pre_hook(hook)
