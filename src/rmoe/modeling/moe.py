"""The MoE block: route -> dispatch -> combine, plus shared experts and GW-MoE broadcasting;
the balance loss of the layer comes from its registered `Balancer` (`router_aux_loss_type`), and
in training the block records the expert loads the aux-loss-free bias update reads.

Shapes: B batch, T positions, N = B*T tokens, D width, E experts, K top-k, P router state width.

GW-MoE is switched by a `GWPolicy` value that each block holds: built from the config at
construction, replaced only through `RMoEPreTrainedModel.set_gw_policy` (never by mutating the
config, and never inside forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import RMoEConfig, check_gw_policy
from .balancing import build_balancer
from .experts import DenseMLP, Experts
from .losses import normalized_entropy, router_z_loss
from .routing import RecurrentCell, RoutingResult, build_router


@dataclass(frozen=True)
class GWPolicy:
    """Which tokens GW-MoE broadcasts to every expert, in training mode only.

    Attributes:
        threshold: normalised router entropy H / ln E in [0, 1] above which a token is
            uncertain; None = GW-MoE off.
        max_tokens_per_seq: at most this many uncertain tokens per sequence (the
            highest-entropy ones); None = no cap.
        selection: "entropy" (GW-MoE) or "random" (the same count per sequence, drawn at
            random: the control).
    """

    threshold: float | None
    max_tokens_per_seq: int | None = None
    selection: str = "entropy"

    def __post_init__(self) -> None:
        check_gw_policy(self.threshold, self.max_tokens_per_seq, self.selection)

    @classmethod
    def from_config(cls, config: RMoEConfig) -> GWPolicy:
        """The policy `config` describes (gw_entropy_threshold, gw_max_tokens_per_seq,
        gw_selection)."""
        return cls(config.gw_entropy_threshold, config.gw_max_tokens_per_seq, config.gw_selection)

    @property
    def enabled(self) -> bool:
        """Whether any token can be broadcast (a threshold is set)."""
        return self.threshold is not None


@dataclass
class MoEOutput:
    """Result of one MoE block.

    Attributes:
        hidden: [B, T, D] block output (before the residual add).
        routing: the router's `RoutingResult` (tensors over N = B*T tokens).
        aux_loss: scalar float32 load-balancing loss of this layer (unscaled), or None.
        z_loss: scalar float32 router z-loss of this layer (unscaled), or None.
        gw_tokens: number of tokens that got the dense all-expert mixture (GW-MoE), 0 if off.
    """

    hidden: torch.Tensor
    routing: RoutingResult
    aux_loss: torch.Tensor | None
    z_loss: torch.Tensor | None
    gw_tokens: int


def select_gw_tokens(
    probs: torch.Tensor,
    batch_shape: tuple[int, int],
    threshold: float,
    max_per_seq: int | None,
    token_mask: torch.Tensor | None,
    selection: str = "entropy",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which tokens GW-MoE broadcasts to all experts.

    A token is uncertain when its normalised router entropy H / ln E exceeds `threshold`; at
    most `max_per_seq` per sequence are kept (the highest-entropy ones). With
    selection="random" (the control) the same number of tokens per sequence is drawn uniformly
    at random from the valid tokens instead.

    Args:
        probs: [N, E] router probabilities, N = B*T.
        batch_shape: (B, T).
        threshold: in [0, 1].
        max_per_seq: cap per sequence, or None.
        token_mask: [B, T] True for real tokens, or None.
        selection: "entropy" or "random".

    Returns:
        [B, T] bool mask of broadcast tokens.
    """
    b, t = batch_shape
    ent = normalized_entropy(probs.detach()).view(b, t)
    valid = (
        torch.ones(b, t, dtype=torch.bool, device=probs.device)
        if token_mask is None
        else token_mask.bool()
    )
    chosen = (ent > threshold) & valid
    if max_per_seq is not None and max_per_seq < t:
        score = ent.masked_fill(~chosen, -1.0)
        top_v, top_i = score.topk(max_per_seq, dim=1)
        capped = torch.zeros_like(chosen)
        capped.scatter_(1, top_i, top_v > -0.5)
        chosen = capped
    if selection == "random":
        count = chosen.sum(dim=1, keepdim=True)
        r = torch.rand(b, t, device=probs.device, generator=generator).masked_fill(~valid, -1.0)
        rank = r.argsort(dim=1, descending=True).argsort(dim=1)
        chosen = (rank < count) & valid
    return chosen


class MoEBlock(nn.Module):
    """Routed experts (+ optional shared experts, optionally sigmoid-gated: `shared_expert_gate`
    [1, D], Qwen2-MoE) for one decoder layer.

    `gw_policy` (a `GWPolicy`, from the config at construction) decides GW-MoE broadcasting in
    training; the model's `set_gw_policy` replaces it on every block.

    `checkpoint` (from `activation_checkpointing == "moe"`): in training with gradients, the
    block's activations are recomputed in backward (non-reentrant `torch.utils.checkpoint`,
    so the gradient reaches x and the incoming router state); the expert-load record is taken
    once, outside the recomputed region.
    """

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__()
        self.config = config  # read at construction only (forward reads gw_policy)
        self.num_experts = config.num_experts
        self.gw_policy = GWPolicy.from_config(config)
        self.checkpoint = config.activation_checkpointing == "moe"
        self.router = build_router(config)
        self.balancer = build_balancer(config)
        self.experts = Experts(
            config.num_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            backend=config.experts_backend,
        )
        self.shared_experts = (
            DenseMLP(
                config.hidden_size,
                config.num_shared_experts * config.shared_expert_intermediate_size,
            )
            if config.num_shared_experts > 0
            else None
        )
        # Qwen2-MoE's sigmoid gate on the shared experts' output (only built when on)
        self.shared_expert_gate = (
            nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        )

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        cell: RecurrentCell | None = None,
        token_mask: torch.Tensor | None = None,
        compute_losses: bool = True,
        *,
        shared: nn.Module | None = None,
        record_load: bool = True,
    ) -> MoEOutput:
        """Route, dispatch and combine.

        Args:
            x: [B, T, D] normalised FFN input; experts and router both consume it.
            state: [N, P] incoming router state (recurrent router) or None.
            cell: the model's shared recurrent cell, or None.
            token_mask: [B, T] True for real tokens (padding excluded from the losses).
            compute_losses: compute the balance and z losses.
            shared: the model's module shared by every layer's router, or None.
            record_load: record the expert loads (training with an expert bias); a caller that
                recomputes this forward under its own checkpoint passes False and calls
                `record_routing` once itself.
        """
        if self.checkpoint and self.training and torch.is_grad_enabled():
            out = checkpoint(
                self._compute,
                x,
                state,
                cell,
                token_mask,
                compute_losses,
                shared,
                use_reentrant=False,
            )
        else:
            out = self._compute(x, state, cell, token_mask, compute_losses, shared)
        if record_load:
            self.record_routing(out.routing, token_mask)
        return out

    def record_routing(self, routing: RoutingResult, token_mask: torch.Tensor | None) -> None:
        """In training with an expert bias, add this step's expert loads to the router's record
        (routing over N = B*T tokens; token_mask [B, T] or None)."""
        if self.training and self.router.expert_bias is not None:
            mask = None if token_mask is None else token_mask.reshape(-1)
            self.router.record_load(routing.topk_idx, mask)

    def _compute(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None,
        cell: RecurrentCell | None,
        token_mask: torch.Tensor | None,
        compute_losses: bool,
        shared: nn.Module | None,
    ) -> MoEOutput:
        """`forward` without the load record (what a checkpoint recomputes); same arguments."""
        b, t, d = x.shape
        xf = x.reshape(b * t, d)
        mask = None if token_mask is None else token_mask.reshape(-1)
        routing = self.router(xf, state, cell, shared)
        y = self.experts(xf, routing.topk_idx, routing.topk_weight)

        gw_tokens = 0
        gw = self.gw_policy
        if self.training and gw.threshold is not None:
            chosen = select_gw_tokens(
                routing.probs,
                (b, t),
                gw.threshold,
                gw.max_tokens_per_seq,
                token_mask,
                gw.selection,
            ).reshape(-1)
            ui = torch.nonzero(chosen, as_tuple=True)[0]
            gw_tokens = int(ui.numel())
            if gw_tokens:
                e = self.num_experts
                all_idx = torch.arange(e, device=x.device).expand(gw_tokens, e)
                dense = self.experts(xf[ui], all_idx, routing.probs[ui], token_index=ui)
                y = y.index_copy(0, ui, dense)

        if self.shared_experts is not None:
            shared_y = self.shared_experts(xf)
            if self.shared_expert_gate is not None:  # [N, 1] gate, Qwen2-MoE
                shared_y = torch.sigmoid(self.shared_expert_gate(xf)) * shared_y
            y = y + shared_y

        aux = z = None
        if compute_losses:
            aux = self.balancer(routing, (b, t), mask)
            z = router_z_loss(routing.logits, mask)
        return MoEOutput(y.view(b, t, d), routing, aux, z, gw_tokens)
