"""Balancing: the balance losses an MoE layer can use, and the aux-loss-free expert bias update.

Shapes: N tokens, B sequences of T positions, E experts, K experts per token.

Balance losses are registered classes (`rmoe.registry.BALANCERS`, config field
`router_aux_loss_type`); the math is in `rmoe.modeling.losses` as pure functions.

State that lives for one optimizer step — the expert loads the bias update reads (kept on each
`Router`) and the "global" loss's accumulated counts (kept on each `GlobalBalance`) — is closed
by `end_router_step(model)`, which runs once per optimizer step, after the step's last
backward. `install_router_step_hook(model, optimizer)` runs it in an optimizer-step pre-hook
(as torchtitan does for its expert bias), so gradient accumulation and data parallelism stay
exact whatever loop drives the optimizer. Nothing here runs inside a forward pass except the
loss and the recording of counts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..config import RMoEConfig
from ..registry import BALANCERS
from .losses import (
    balance_loss_from_counts,
    expert_counts,
    load_balancing_loss,
    sequence_balance_loss,
)
from .routing import Router, RoutingResult


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Balancer(nn.Module):
    """Base balance loss: (routing of one layer, (B, T), token mask) -> scalar float32 loss."""

    name: ClassVar[str]

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts

    def forward(
        self,
        routing: RoutingResult,
        batch_shape: tuple[int, int],
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """routing: tensors over N = B*T tokens; token_mask [N] (True = real token) or None."""
        raise NotImplementedError

    def reset_step(self) -> None:
        """Forget the state of the optimizer step that just ended (nothing by default)."""


@BALANCERS.register
class SwitchBalance(Balancer):
    """Switch Transformer loss on this micro-batch: E * sum_e f_e P_e (`load_balancing_loss`)."""

    name = "switch"

    def forward(self, routing, batch_shape, token_mask=None):
        return load_balancing_loss(routing.probs, routing.topk_idx, token_mask)


@BALANCERS.register
class SequenceBalance(Balancer):
    """DeepSeek-V3's sequence-wise loss: the Switch loss per sequence, then the mean over
    sequences (`sequence_balance_loss`)."""

    name = "sequence"

    def forward(self, routing, batch_shape, token_mask=None):
        b, t = batch_shape
        mask = None if token_mask is None else token_mask.reshape(b, t)
        return sequence_balance_loss(
            routing.probs.view(b, t, -1), routing.topk_idx.view(b, t, -1), mask
        )


@BALANCERS.register
class GlobalBalance(Balancer):
    """Global-batch balance loss (Qiu et al., arXiv 2501.11873): E * sum_e f_e P_e with f from
    the counts of every data-parallel rank (all-reduced in forward) and P from the local tokens.

    Within one micro-batch step this is exactly the loss on the global micro-batch: averaging
    the ranks' gradients (DDP) gives the gradient of the one-process loss on all ranks'
    tokens. Under gradient accumulation the counts are summed over the step's micro-batches so
    far (the paper's buffer): micro-batch m sees f from micro-batches 1..m of every rank, which
    equals the whole step's f only at the last micro-batch; earlier micro-batches use a partial
    estimate. (An exact f for every micro-batch would need a routing pre-pass over the whole
    step, an extra forward; not built.) Outside training mode f is the local batch's.
    """

    name = "global"

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        self._step_counts: torch.Tensor | None = None

    def forward(self, routing, batch_shape, token_mask=None):
        counts = expert_counts(routing.topk_idx, self.num_experts, token_mask)
        if self.training:
            if _world_size() > 1:
                dist.all_reduce(counts)
            if self._step_counts is not None:
                counts = counts + self._step_counts
            self._step_counts = counts
        return balance_loss_from_counts(routing.probs, counts, token_mask)

    @property
    def step_counts(self) -> torch.Tensor | None:
        """[E] counts accumulated over this optimizer step (all ranks), or None."""
        return self._step_counts

    def reset_step(self) -> None:
        self._step_counts = None


def build_balancer(config: RMoEConfig) -> Balancer:
    """The balance loss named by `config.router_aux_loss_type`."""
    return BALANCERS.lookup(config.router_aux_loss_type)(config)


def bias_routers(model: nn.Module) -> list[Router]:
    """The routers of `model` that carry an expert bias, in module order."""
    return [m for m in model.modules() if isinstance(m, Router) and m.expert_bias is not None]


@torch.no_grad()
def update_expert_biases(model: nn.Module) -> None:
    """b += rate * sign(mean load - load) for every router with an expert bias, from the loads
    recorded since the last update (summed over micro-batches, all-reduced over ranks); the
    recorded loads are reset. Underloaded experts go up, overloaded ones down."""
    routers = bias_routers(model)
    if not routers:
        return
    loads = torch.stack([r.take_load().to(r.expert_bias.device) for r in routers])
    if _world_size() > 1:
        dist.all_reduce(loads)
    for router, load in zip(routers, loads):
        router.expert_bias.add_(router.bias_update_rate * torch.sign(load.mean() - load))


def end_router_step(model: nn.Module) -> None:
    """Close one optimizer step: update the expert biases and reset the balancers' step state.
    Call it once per optimizer step, after the last backward (or use the hook)."""
    update_expert_biases(model)
    for module in model.modules():
        if isinstance(module, Balancer):
            module.reset_step()


def install_router_step_hook(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Run `end_router_step(model)` before every `optimizer.step()` (an optimizer-step pre-hook);
    returns the handle (``.remove()`` to uninstall)."""

    def hook(opt, args, kwargs) -> None:
        end_router_step(model)

    return optimizer.register_step_pre_hook(hook)
