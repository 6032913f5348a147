"""The adapter of rmoe's own RMoEForCausalLM (any router type, including the recurrent one)."""

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
    """What the analysis needs to know about an rmoe router type.

    Attributes:
        space: what the router rows live in (``MoELayer.router_space``).
        description: the ``RoutingSpec.router`` text (e.g. "recurrent:gru+linear").
        stateful: the logits depend on the router state passed from the previous layer.
    """

    space: str
    description: str
    stateful: bool


class RMoEAdapter(MoEAdapter):
    """rmoe's own RMoEForCausalLM: any router type, including the recurrent (RMoE) router,
    whose rows live in the router-state space P (the per-layer scorer on h_i)."""

    family = "rmoe"
    model_types = ("rmoe",)

    def _router_type(self) -> RouterTypeFacts:
        """What the router registry says about ``config.router_type`` (the router class's
        ``routing_space`` and ``uses_cell``)."""
        from rmoe.registry import ROUTERS

        cfg = self.config
        router = getattr(cfg, "router_type", "linear")
        cls = ROUTERS.get(router)
        space = cls.routing_space(cfg) if cls is not None else "router"
        stateful = bool(cls is not None and cls.uses_cell)
        if stateful:
            router = f"{router}:{cfg.router_cell}+{cfg.router_scorer}"
            if not cfg.router_pass_state:
                router += " (no state passing)"
        return RouterTypeFacts(space, router, stateful)

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
                    router_space=space,
                )
            )
        return found

    def _spec(self) -> RoutingSpec:
        cfg = self.config
        return RoutingSpec(
            "softmax",
            int(cfg.num_experts),
            int(cfg.num_experts_per_tok),
            bool(cfg.norm_topk_prob),
            num_shared_experts=int(cfg.num_shared_experts),
            router=self._router_type().description,
        )

    def router_weight(self, i: int) -> torch.Tensor:
        """[E, R]: the linear scorer's weight, the cosine/XMoE expert embeddings, or the MLP
        router's output layer; for the recurrent router, the per-layer scorer on the state."""
        scorer = self._layer(i).router.scorer
        if hasattr(scorer, "expert_embeddings"):
            return scorer.expert_embeddings.detach()
        if hasattr(scorer, "fc2"):
            return scorer.fc2.weight.detach()
        return scorer.weight.weight.detach()

    def router_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """[N, E] logits of a stateless router on x [N, D]; the recurrent router's logits need
        the state of the previous layer, so use :meth:`capture` instead."""
        router = self._layer(i).router
        if self._router_type().stateful:
            raise ValueError(
                "the recurrent router's logits depend on the router state from the previous "
                "layer; run the model inside adapter.capture() to record them"
            )
        with torch.no_grad():
            shared = getattr(getattr(self.model, "model", self.model), "router_shared", None)
            logits, _ = router.compute_logits(x.reshape(-1, x.shape[-1]), None, None, shared)
        return logits.float()

    def parse_router_output(
        self, i: int, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """rmoe routers return a ``RoutingResult``."""
        if hasattr(output, "topk_idx"):
            return output.logits, output.topk_idx, output.topk_weight
        return super().parse_router_output(i, output)

    def shared_router_parameters(self) -> list[nn.Parameter]:
        """The recurrent cell shared by all MoE layers (empty for other routers)."""
        cell = getattr(getattr(self.model, "model", self.model), "router_cell", None)
        return [] if cell is None else [p for p in cell.parameters() if p.requires_grad]
