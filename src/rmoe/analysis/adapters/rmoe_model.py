"""The adapter of rmoe's own RMoEForCausalLM: every registered router with every router stage
(score function, routed scale, expert bias, capacity, logit residual, S-proj).

Everything it needs to know about a router comes from the config and from the router registry
(the class's ``uses_cell`` and ``routing_space``); it never branches on a router's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rmoe.analysis.adapters.base import MoEAdapter, _decoder_layers
from rmoe.analysis.adapters.capture import MoELayer
from rmoe.analysis.adapters.spec import RoutingSpec


@dataclass(frozen=True)
class RouterTypeFacts:
    """What the analysis needs to know about an rmoe router configuration.

    Attributes:
        space: what the router rows live in (``MoELayer.router_space``).
        description: the ``RoutingSpec.router`` text, e.g. "recurrent:gru+linear" or
            "linear; sigmoid; expert bias (gamma 0.001); no aux loss".
        stateful: the logits depend on what the previous layer passes on (a recurrent cell's
            state, or the previous layer's logits with a logit residual).
    """

    space: str
    description: str
    stateful: bool


def _producer_text(cfg: Any, uses_cell: bool) -> str:
    """The logits producer: its name, the cell and scorer, and the cross-layer options."""
    text = str(getattr(cfg, "router_type", "linear"))
    if uses_cell:
        text += f":{cfg.router_cell}+{cfg.router_scorer}"
        if not getattr(cfg, "router_pass_state", True):
            text += " (no state passing)"
        elif getattr(cfg, "router_detach_state", False):
            text += " (detached state)"
    if getattr(cfg, "router_share_proj", False):
        text += " + S-proj (one projector for all layers)"
    if getattr(cfg, "router_base_linear", False):
        text += " + linear base (retrofit: W_i x_i + G_i h_i)"
    alpha = float(getattr(cfg, "router_logit_residual", 0.0) or 0.0)
    if alpha > 0:
        detached = ", detached" if getattr(cfg, "router_detach_residual", False) else ""
        text += f" + logit residual (alpha {alpha:g}{detached})"
    return text


def _stage_texts(cfg: Any) -> list[str]:
    """The score function, the balancing and the capacity, each only when not the default."""
    out = []
    score = str(getattr(cfg, "router_score_func", "softmax"))
    scale = float(getattr(cfg, "router_scale", 1.0))
    if score != "softmax" or scale != 1.0:
        out.append(score + (f" x {scale:g}" if scale != 1.0 else ""))
    if getattr(cfg, "router_expert_bias", False):
        out.append(f"expert bias (gamma {float(cfg.router_bias_update_rate):g})")
    loss = str(getattr(cfg, "router_aux_loss_type", "switch"))
    coef = float(getattr(cfg, "router_aux_loss_coef", 0.0))
    if coef <= 0:
        out.append("no aux loss")
    elif loss != "switch":
        out.append(f"{loss} aux loss ({coef:g})")
    train_cap = getattr(cfg, "capacity_factor", None)
    eval_cap = getattr(cfg, "eval_capacity_factor", None)
    if train_cap is not None or eval_cap is not None:

        def fmt(v: float | None) -> str:
            return "dropless" if v is None else f"{float(v):g}"

        out.append(f"capacity {fmt(train_cap)} (eval {fmt(eval_cap)})")
    return out


def router_facts(cfg: Any) -> RouterTypeFacts:
    """:class:`RouterTypeFacts` of an :class:`~rmoe.RMoEConfig` (or any object with its
    router fields), from the router registry and the config's router-stage fields."""
    from rmoe.registry import ROUTERS

    cls = ROUTERS.get(getattr(cfg, "router_type", "linear"))
    uses_cell = bool(cls is not None and cls.uses_cell)
    space = cls.routing_space(cfg) if cls is not None else "router"
    residual = float(getattr(cfg, "router_logit_residual", 0.0) or 0.0) > 0
    text = "; ".join([_producer_text(cfg, uses_cell), *_stage_texts(cfg)])
    return RouterTypeFacts(space, text, uses_cell or residual)


def _scoring_rows(scorer: nn.Module) -> torch.Tensor:
    """[E, R] the rows a scorer scores the experts with: the cosine/XMoE expert embeddings,
    the MLP scorer's output layer, or the linear scorer's weight."""
    if hasattr(scorer, "expert_embeddings"):
        return scorer.expert_embeddings.detach()
    if hasattr(scorer, "fc2"):
        return scorer.fc2.weight.detach()
    return scorer.weight.weight.detach()


class RMoEAdapter(MoEAdapter):
    """rmoe's own RMoEForCausalLM: any router type, including the recurrent (RMoE) router,
    whose rows live in the router-state space P (the per-layer scorer on h_i), and the shared
    (Omni-Router) router, whose one weight the model owns."""

    family = "rmoe"
    model_types = ("rmoe",)

    def _router_type(self) -> RouterTypeFacts:
        """What the config and the router registry say about this model's router."""
        return router_facts(self.config)

    def _backbone(self) -> nn.Module:
        return getattr(self.model, "model", self.model)

    def _find_layers(self) -> list[MoELayer]:
        space = self._router_type().space
        found: list[MoELayer] = []
        for li, layer in enumerate(_decoder_layers(self.model)):
            moe = getattr(layer, "moe", None)
            if moe is None:
                continue
            found.append(
                MoELayer(
                    index=len(found),
                    layer_index=li,
                    block=moe,
                    router=moe.router,
                    experts=moe.experts,
                    shared=moe.shared_experts,
                    shared_gate=getattr(moe, "shared_expert_gate", None),
                    router_space=space,
                )
            )
        return found

    def _spec(self) -> RoutingSpec:
        cfg = self.config
        return RoutingSpec(
            str(getattr(cfg, "router_score_func", "softmax")),
            int(cfg.num_experts),
            int(cfg.num_experts_per_tok),
            bool(cfg.norm_topk_prob),
            routed_scaling_factor=float(getattr(cfg, "router_scale", 1.0)),
            score_correction_bias=bool(getattr(cfg, "router_expert_bias", False)),
            num_shared_experts=int(cfg.num_shared_experts),
            shared_expert_gate="sigmoid" if getattr(cfg, "shared_expert_gate", False) else None,
            router=self._router_type().description,
        )

    def score_correction_bias(self, i: int) -> torch.Tensor | None:
        """[E] float32 expert bias of MoE layer ``i`` (aux-loss-free balancing), else None."""
        b = getattr(self._layer(i).router, "expert_bias", None)
        return b.detach().float() if isinstance(b, torch.Tensor) else None

    def router_weight(self, i: int) -> torch.Tensor:
        """[E, R]: the linear scorer's weight, the cosine/XMoE expert embeddings, or the MLP
        router's output layer; for the recurrent router, the per-layer scorer on the state;
        for a router that owns no scorer (the shared router), the model's shared one (the
        same rows at every layer)."""
        router = self._layer(i).router
        scorer = getattr(router, "scorer", None)
        if scorer is None:
            scorer = getattr(self._backbone(), "router_shared", None)
        if scorer is None:
            raise ValueError(
                f"MoE layer {i}'s router ({type(router).__name__}) has no scorer and the model "
                "has no shared router weight (model.model.router_shared)"
            )
        return _scoring_rows(scorer)

    def router_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """[N, E] logits of a stateless router on x [N, D]; a stateful router's logits (the
        recurrent router, or any router with a logit residual) need what the previous layer
        passes on, so use :meth:`capture` instead."""
        router = self._layer(i).router
        if self._router_type().stateful:
            raise ValueError(
                "this router's logits depend on the router state or logits from the previous "
                "layer; run the model inside adapter.capture() to record them"
            )
        with torch.no_grad():
            shared = getattr(self._backbone(), "router_shared", None)
            logits, _ = router.compute_logits(x.reshape(-1, x.shape[-1]), None, None, shared)
        return logits.float()

    def parse_router_output(
        self, i: int, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """rmoe routers return a ``RoutingResult``."""
        if hasattr(output, "topk_idx"):
            return output.logits, output.topk_idx, output.topk_weight
        return super().parse_router_output(i, output)

    def parse_dropped(self, i: int, output: Any) -> torch.Tensor | None:
        """[N, K] bool: the assignments the capacity dropped (``RoutingResult.dropped``)."""
        return getattr(output, "dropped", None)

    def shared_router_parameters(self) -> list[nn.Parameter]:
        """Trainable router parameters every MoE layer uses: the recurrent cell and the
        model's shared router module (Omni-Router's weight, S-proj's projector); empty for
        routers that share nothing."""
        backbone = self._backbone()
        params: list[nn.Parameter] = []
        for name in ("router_cell", "router_shared"):
            module = getattr(backbone, name, None)
            if module is not None:
                params += [p for p in module.parameters() if p.requires_grad]
        return params
