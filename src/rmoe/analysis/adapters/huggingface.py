"""Adapters of the transformers MoE families that follow transformers 5's experts interface.

One generic adapter, :class:`HFMoEAdapter`, finds each decoder layer's MoE block (its router
at ``gate`` or ``router``, its experts at ``experts``, its shared expert under any of the
usual names) and captures the routing at the experts module: a forward pre-hook sees
``experts(hidden_states [N, D], top_k_index [N, K], top_k_weights [N, K])`` exactly as the
model dispatches, however the family's router computed them. The expert matrices are read
through the same interface (``gate_up_proj``/``down_proj`` with the ``is_transposed``,
``is_concatenated`` and bias flags of ``use_experts_implementation``).

What differs per family is only the routing *function* (:class:`RoutingSpec`, needed to turn
logits into probabilities and to reproduce the gate), stated declaratively by the class
attributes below; families with their own expert function or layout live in
:mod:`rmoe.analysis.adapters.hf_custom`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from rmoe.analysis.adapters.base import MoEAdapter, _decoder_layers
from rmoe.analysis.adapters.capture import MoELayer
from rmoe.analysis.adapters.spec import RoutingSpec

# Attribute names under which decoder layers keep their FFN / MoE block, in lookup order.
_BLOCK_ATTRS = ("mlp", "block_sparse_moe", "moe", "feed_forward", "ffn")
_ROUTER_ATTRS = ("gate", "router")
_SHARED_ATTRS = ("shared_expert", "shared_experts", "shared_mlp")
# Linear submodules that hold a router module's [E, D] rows (when it has no ``weight``).
_ROUTER_LINEARS = ("gate", "wg", "layer", "proj", "linear", "classifier")
# Where a selection bias lives: (on the router or the block, dotted attribute path).
_BIAS_PATHS = (
    ("router", "e_score_correction_bias"),
    ("router", "moe_statics.e_score_correction_bias"),
    ("block", "e_score_correction_bias"),
    ("block", "expert_bias"),
)


def _get_path(module: nn.Module, path: str) -> object:
    obj: object = module
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def router_linear(router: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [E, D], bias [E] or None) of a router's linear map: its own ``weight`` (and
    ``bias``), or those of a linear submodule (``gate``, ``wg``, ``layer``, ...)."""
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        bias = getattr(router, "bias", None)
        return weight, bias if isinstance(bias, torch.Tensor) else None
    for name in _ROUTER_LINEARS:
        child = getattr(router, name, None)
        if isinstance(child, nn.Linear):
            return child.weight, child.bias
    raise ValueError(
        f"cannot find the router's linear map in {type(router).__name__}: expected a 2-D "
        f"`weight` or a linear submodule named one of {', '.join(_ROUTER_LINEARS)}"
    )


class HFMoEAdapter(MoEAdapter):
    """The generic adapter of the transformers MoE families; a family sets these:

    Attributes:
        score: "softmax" or "sigmoid" scores of the logits.
        norm_fixed: the family always (True) or never (False) renormalises the top-k weights;
            None = read ``norm_topk_prob`` from the router, then the config, else
            ``norm_default``. (Selecting the top-k logits and softmaxing them is softmax
            scores renormalised over the top-k: ``norm_fixed = True``.)
        group_score: "top2_sum" for DeepSeek-V3-style group-limited selection, else None.
        reproducible: see :attr:`RoutingSpec.reproducible`.
        router_text: the :attr:`RoutingSpec.router` description.
        capture_at: :attr:`MoELayer.capture_at` for layers whose experts are one module.
    """

    score: ClassVar[str] = "softmax"
    norm_fixed: ClassVar[bool | None] = None
    norm_default: ClassVar[bool] = False
    group_score: ClassVar[str | None] = None
    reproducible: ClassVar[bool] = True
    router_text: ClassVar[str] = "linear"
    capture_at: ClassVar[str] = "experts"

    def _make_layer(self, index: int, layer_index: int, layer: nn.Module) -> MoELayer | None:
        """The MoE layer of one decoder layer, or None for a dense layer."""
        for attr in _BLOCK_ATTRS:
            block = getattr(layer, attr, None)
            if block is None or not hasattr(block, "experts"):
                continue
            router = next((getattr(block, a) for a in _ROUTER_ATTRS if hasattr(block, a)), None)
            if router is None:
                continue
            shared = next(
                (getattr(o, a) for o in (block, layer) for a in _SHARED_ATTRS if hasattr(o, a)),
                None,
            )
            experts = block.experts
            return MoELayer(
                index=index,
                layer_index=layer_index,
                block=block,
                router=router,
                experts=experts,
                shared=shared,
                shared_gate=getattr(block, "shared_expert_gate", None),
                capture_at="router" if isinstance(experts, nn.ModuleList) else self.capture_at,
            )
        return None

    def _find_layers(self) -> list[MoELayer]:
        found: list[MoELayer] = []
        for li, layer in enumerate(_decoder_layers(self.model)):
            moe = self._make_layer(len(found), li, layer)
            if moe is not None:
                found.append(moe)
        return found

    # -- reading the routing function -------------------------------------------------------
    def router_weight(self, i: int) -> torch.Tensor:
        """[E, D] the router's rows at MoE layer ``i``."""
        return router_linear(self._layer(i).router)[0].detach()

    def router_bias(self, i: int) -> torch.Tensor | None:
        """[E] the router's linear bias (GPT-OSS), else None."""
        b = router_linear(self._layer(i).router)[1]
        return None if b is None else b.detach()

    def score_correction_bias(self, i: int) -> torch.Tensor | None:
        """[E] float32 selection bias (``e_score_correction_bias`` on the router or block,
        ERNIE's ``moe_statics``, LFM2/AFMoE's ``expert_bias``), else None."""
        layer = self._layer(i)
        for owner, path in _BIAS_PATHS:
            b = _get_path(layer.router if owner == "router" else layer.block, path)
            if isinstance(b, torch.Tensor):
                return b.detach().float().reshape(-1)
        return None

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
        counts = {int(self.router_weight(i).shape[0]) for i in range(len(self.layers))}
        if len(counts) > 1:
            raise ValueError(
                f"the MoE layers have different numbers of experts ({sorted(counts)}); the "
                "analysis needs one E for all layers"
            )
        return counts.pop()

    def _norm_topk(self, default: bool) -> bool:
        value = getattr(self.layers[0].router, "norm_topk_prob", None)
        if value is None:
            value = getattr(self.config, "norm_topk_prob", None)
        return bool(default if value is None else value)

    def _num_shared(self) -> int:
        if self.layers[0].shared is None:
            return 0
        for name in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"):
            n = getattr(self.config, name, None)
            if isinstance(n, int) and n > 0:
                return n
        return 1

    def _score(self) -> str:
        return self.score

    def _norm(self) -> bool:
        return (
            self.norm_fixed if self.norm_fixed is not None else self._norm_topk(self.norm_default)
        )

    def _scaling(self) -> float:
        router = self.layers[0].router
        for name in ("routed_scaling_factor", "route_scale", "router_scaling_factor"):
            value = getattr(router, name, None)
            if isinstance(value, (int, float)):
                return float(value)
        return 1.0

    def _groups(self) -> tuple[int, int]:
        """(groups, groups kept) of group-limited selection."""
        router = self.layers[0].router
        groups = getattr(router, "num_group", None) or getattr(self.config, "n_group", None)
        keep = getattr(router, "topk_group", None) or getattr(self.config, "topk_group", None)
        return int(groups or 1), int(keep or 1)

    def _spec(self) -> RoutingSpec:
        groups, keep = self._groups() if self.group_score is not None else (1, 1)
        return RoutingSpec(
            self._score(),
            self._num_experts(),
            self._top_k(),
            self._norm(),
            routed_scaling_factor=self._scaling(),
            group_score=self.group_score if groups > 1 else None,
            num_groups=groups,
            topk_groups=keep,
            score_correction_bias=self.score_correction_bias(0) is not None,
            num_shared_experts=self._num_shared(),
            shared_expert_gate="sigmoid" if self.layers[0].shared_gate is not None else None,
            router=self.router_text,
            reproducible=self.reproducible,
        )


# --------------------------------------------------------------------------------------------
# softmax routers
# --------------------------------------------------------------------------------------------


class MixtralAdapter(HFMoEAdapter):
    """Mixtral: softmax over all experts -> top-k -> renormalise."""

    family = "mixtral"
    model_types = ("mixtral",)
    norm_fixed = True


class MiniMaxAdapter(HFMoEAdapter):
    """MiniMax-Text-01 (lightning-attention hybrid): Mixtral's gate (softmax, top-k,
    renormalised)."""

    family = "minimax"
    model_types = ("minimax",)
    norm_fixed = True


class HunYuanMoeAdapter(HFMoEAdapter):
    """HunYuan-MoE-V1: the gate's linear ``wg``; softmax -> top-k -> renormalise; a shared MLP
    (``shared_mlp``) added ungated. Per-layer expert counts (list-valued ``num_experts``) are
    rejected."""

    family = "hunyuan_v1_moe"
    model_types = ("hunyuan_v1_moe",)
    norm_fixed = True


class TopKSoftmaxAdapter(HFMoEAdapter):
    """Routers that pick the top-k logits and softmax only those (GraniteMoE and its shared,
    hybrid and sliding-window variants, Aria): softmax scores renormalised over the top-k."""

    family = "granitemoe"
    model_types = (
        "granitemoe",
        "granitemoeshared",
        "granitemoehybrid",
        "granitemoe_swa",
        "aria_text",
    )
    norm_fixed = True
    router_text = "linear; softmax over the top-k logits"


class OlmoeAdapter(HFMoEAdapter):
    """OLMoE: softmax -> top-k, renormalised only with ``norm_topk_prob`` (default off)."""

    family = "olmoe"
    model_types = ("olmoe",)


class FlexOlmoAdapter(HFMoEAdapter):
    """OLMoE's gate, renormalised with the router's ``norm_topk_prob``: FlexOlmo, Lara-Mini,
    Mellum."""

    family = "flex_olmo"
    model_types = ("flex_olmo", "lara_mini", "mellum")


class JambaAdapter(HFMoEAdapter):
    """Jamba (Mamba hybrid, MoE every other layer): softmax -> top-k, not renormalised."""

    family = "jamba"
    model_types = ("jamba",)
    norm_fixed = False


class Qwen2MoeAdapter(HFMoEAdapter):
    """Qwen1.5/2-MoE: softmax -> top-k (``norm_topk_prob``), plus a shared expert scaled by a
    sigmoid gate."""

    family = "qwen2_moe"
    model_types = ("qwen2_moe",)


class Qwen3MoeAdapter(HFMoEAdapter):
    """Qwen3-MoE: softmax -> top-k, renormalised with ``norm_topk_prob``; no shared expert."""

    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    norm_default = True


class Qwen3NextAdapter(HFMoEAdapter):
    """Qwen3-Next (gated-DeltaNet hybrid) and Qwen3.5-MoE: softmax -> top-k (Qwen3-Next:
    ``norm_topk_prob``; Qwen3.5 always renormalises), plus a sigmoid-gated shared expert."""

    family = "qwen3_next"
    model_types = ("qwen3_next", "qwen3_5_moe_text")
    norm_default = True


class PhimoeAdapter(HFMoEAdapter):
    """Phi-3.5-MoE: sparsemixer routing. The chosen experts are the top-k logits, but the
    weights come from masked softmaxes that :func:`route` does not reproduce (the capture
    records the model's own); probabilities are the softmax of the logits."""

    family = "phimoe"
    model_types = ("phimoe",)
    norm_fixed = True
    reproducible = False
    router_text = "linear; sparsemixer"


class ErnieMoeAdapter(HFMoEAdapter):
    """ERNIE-4.5-MoE: softmax scores; selection on scores + ``moe_statics`` bias; weights =
    unbiased scores renormalised; shared experts."""

    family = "ernie4_5_moe"
    model_types = ("ernie4_5_moe",)
    norm_fixed = True


class Cohere2MoeAdapter(HFMoEAdapter):
    """Cohere2-MoE: top-k logits, then softmax over them or sigmoid (renormalised with
    ``norm_topk_prob``), as the router's ``expert_selection_fn`` says."""

    family = "cohere2_moe"
    model_types = ("cohere2_moe",)

    def _score(self) -> str:
        return str(getattr(self.layers[0].router, "expert_selection_fn", "softmax"))

    def _norm(self) -> bool:
        return True if self._score() == "softmax" else self._norm_topk(False)


# --------------------------------------------------------------------------------------------
# sigmoid routers
# --------------------------------------------------------------------------------------------


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
            routed_scaling_factor=self._scaling(),
            group_score="max" if grouped else None,
            num_groups=int(getattr(router, "num_group", 1) or 1) if grouped else 1,
            topk_groups=int(getattr(router, "topk_group", 1) or 1) if grouped else 1,
            num_shared_experts=self._num_shared(),
        )


class DeepseekV3Adapter(HFMoEAdapter):
    """DeepSeek-V3 and the families that share its router (GLM-4.5/4.6/4.7 and GLM-4.7-Flash
    ``glm4_moe_lite``, GLM-5 ``glm_moe_dsa``, dots.llm1, DeepSeek-V3.2, Kimi-Linear,
    EXAONE-MoE, Solar-Open, MiMo-V2-Flash, Ling/Ring hybrid ``bailing_hybrid``): sigmoid
    scores; selection on scores + ``e_score_correction_bias`` within the best ``topk_group``
    of ``n_group`` groups (a group scores the sum of its two best); weights = unbiased scores,
    renormalised with ``norm_topk_prob``, × ``routed_scaling_factor``; shared experts; leading
    dense layers."""

    family = "deepseek_v3"
    model_types = (
        "deepseek_v3",
        "deepseek_v32",
        "glm4_moe",
        "glm4_moe_lite",
        "glm_moe_dsa",
        "dots1",
        "kimi_linear",
        "exaone_moe",
        "solar_open",
        "mimo_v2_flash",
        "bailing_hybrid",
    )
    score = "sigmoid"
    norm_default = True
    group_score = "top2_sum"


class SigmoidBiasAdapter(HFMoEAdapter):
    """Sigmoid routers with a selection bias and no groups, always renormalised: MiniMax-M2
    (``e_score_correction_bias`` on the block), AFMoE (``expert_bias``, × ``route_scale``),
    HY-V3 (bias on the block, × ``router_scaling_factor``)."""

    family = "minimax_m2"
    model_types = ("minimax_m2", "afmoe", "hy_v3")
    score = "sigmoid"
    norm_fixed = True


class Lfm2MoeAdapter(HFMoEAdapter):
    """Sigmoid top-k routers renormalised with the router's ``norm_topk_prob``: LFM2-MoE
    (short-convolution hybrid; optional ``expert_bias`` for the selection, ×
    ``routed_scaling_factor``) and Flint (no bias)."""

    family = "lfm2_moe"
    model_types = ("lfm2_moe", "flint")
    score = "sigmoid"
    norm_default = True
