"""Adapters of the transformers MoE families: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rmoe.analysis.adapters.base import MoEAdapter, _decoder_layers
from rmoe.analysis.adapters.capture import MoELayer
from rmoe.analysis.adapters.spec import (
    RoutingSpec,
)

# Attribute names under which decoder layers keep their FFN / MoE block, in lookup order.
_BLOCK_ATTRS = ("mlp", "block_sparse_moe", "moe", "feed_forward")
_ROUTER_ATTRS = ("gate", "router")


class HFMoEAdapter(MoEAdapter):
    """Shared logic of the transformers MoE families (router at ``block.gate``)."""

    def _find_layers(self) -> list[MoELayer]:
        found: list[MoELayer] = []
        for li, layer in enumerate(_decoder_layers(self.model)):
            for attr in _BLOCK_ATTRS:
                block = getattr(layer, attr, None)
                if block is None or not hasattr(block, "experts"):
                    continue
                router = next((getattr(block, a) for a in _ROUTER_ATTRS if hasattr(block, a)), None)
                if router is None:
                    continue
                shared = getattr(block, "shared_expert", None)
                if shared is None:
                    shared = getattr(block, "shared_experts", None)
                found.append(
                    MoELayer(
                        index=len(found),
                        layer_index=li,
                        block=block,
                        router=router,
                        experts=block.experts,
                        shared=shared,
                        shared_gate=getattr(block, "shared_expert_gate", None),
                    )
                )
                break
        return found

    def _act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        experts = self.layers[0].experts
        fn = getattr(experts, "act_fn", None)
        if fn is None and isinstance(experts, nn.ModuleList) and len(experts):
            fn = getattr(experts[0], "act_fn", None)
        if fn is None:
            from transformers.activations import ACT2FN

            fn = ACT2FN[getattr(self.config, "hidden_act", "silu")]
        return fn

    def _top_k(self) -> int:
        router = self.layers[0].router
        k = getattr(router, "top_k", None) or getattr(self.layers[0].block, "top_k", None)
        return int(k if k is not None else self.config.num_experts_per_tok)

    def _num_experts(self) -> int:
        return int(self.router_weight(0).shape[0])

    def _norm_topk(self, default: bool) -> bool:
        router = self.layers[0].router
        value = getattr(router, "norm_topk_prob", None)
        if value is None:
            value = getattr(self.config, "norm_topk_prob", default)
        return bool(value)

    def _num_shared(self) -> int:
        return 0 if self.layers[0].shared is None else 1


class MixtralAdapter(HFMoEAdapter):
    """Mixtral: softmax over all experts -> top-k -> renormalise."""

    family = "mixtral"
    model_types = ("mixtral",)

    def _spec(self) -> RoutingSpec:
        return RoutingSpec("softmax", self._num_experts(), self._top_k(), norm_topk_prob=True)


class OlmoeAdapter(HFMoEAdapter):
    """OLMoE: softmax -> top-k, renormalised only with ``norm_topk_prob`` (default off)."""

    family = "olmoe"
    model_types = ("olmoe",)

    def _spec(self) -> RoutingSpec:
        return RoutingSpec("softmax", self._num_experts(), self._top_k(), self._norm_topk(False))


class Qwen2MoeAdapter(HFMoEAdapter):
    """Qwen1.5/2-MoE: softmax -> top-k (``norm_topk_prob``), plus a shared expert scaled by a
    sigmoid gate."""

    family = "qwen2_moe"
    model_types = ("qwen2_moe",)

    def _spec(self) -> RoutingSpec:
        gated = self.layers[0].shared_gate is not None
        return RoutingSpec(
            "softmax",
            self._num_experts(),
            self._top_k(),
            self._norm_topk(False),
            num_shared_experts=self._num_shared(),
            shared_expert_gate="sigmoid" if gated else None,
        )


class Qwen3MoeAdapter(HFMoEAdapter):
    """Qwen3-MoE: softmax -> top-k, renormalised with ``norm_topk_prob``; no shared expert."""

    family = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def _spec(self) -> RoutingSpec:
        return RoutingSpec("softmax", self._num_experts(), self._top_k(), self._norm_topk(True))


class DeepseekV2Adapter(HFMoEAdapter):
    """DeepSeek-V2: softmax -> greedy or group-limited greedy top-k (a group scores its best
    expert), no renormalisation, weights × ``routed_scaling_factor``; shared experts; the first
    ``first_k_dense_replace`` layers are dense."""

    family = "deepseek_v2"
    model_types = ("deepseek_v2",)

    def _spec(self) -> RoutingSpec:
        router = self.layers[0].router
        method = getattr(router, "topk_method", getattr(self.config, "topk_method", "greedy"))
        grouped = method == "group_limited_greedy"
        return RoutingSpec(
            "softmax",
            self._num_experts(),
            self._top_k(),
            norm_topk_prob=False,
            routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
            group_score="max" if grouped else None,
            num_groups=int(getattr(router, "num_group", 1) or 1) if grouped else 1,
            topk_groups=int(getattr(router, "topk_group", 1) or 1) if grouped else 1,
            num_shared_experts=int(getattr(self.config, "n_shared_experts", 0) or 0),
        )


class DeepseekV3Adapter(HFMoEAdapter):
    """DeepSeek-V3: sigmoid scores; selection on scores + ``e_score_correction_bias`` within the
    best ``topk_group`` of ``n_group`` groups (a group scores the sum of its two best);
    weights = unbiased scores, renormalised with ``norm_topk_prob``, × ``routed_scaling_factor``;
    shared experts; the first ``first_k_dense_replace`` layers are dense."""

    family = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def _spec(self) -> RoutingSpec:
        router = self.layers[0].router
        return RoutingSpec(
            "sigmoid",
            self._num_experts(),
            self._top_k(),
            self._norm_topk(True),
            routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
            group_score="top2_sum",
            num_groups=int(getattr(router, "num_group", 1) or 1),
            topk_groups=int(getattr(router, "topk_group", 1) or 1),
            score_correction_bias=hasattr(router, "e_score_correction_bias"),
            num_shared_experts=int(getattr(self.config, "n_shared_experts", 0) or 0),
        )
