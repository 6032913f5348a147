"""The transformers MoE families that differ from the generic experts interface of
:mod:`rmoe.analysis.adapters.huggingface` in their expert function, expert layout or router
output: GPT-OSS, HY-V4, Llama 4, DBRX and JetMoE."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rmoe.analysis.adapters.capture import MoELayer
from rmoe.analysis.adapters.huggingface import DeepseekV3Adapter, HFMoEAdapter
from rmoe.analysis.adapters.spec import RoutingSpec
from rmoe.analysis.adapters.weights import GLU, ExpertWeights, alpha_silu


class GptOssAdapter(HFMoEAdapter):
    """GPT-OSS: a router with a bias; the top-k logits are softmaxed (softmax scores
    renormalised over the top-k). Experts: ``gate_up_proj`` [E, D, 2F] with gate and up
    columns interleaved, biases on both projections, and a clamped GLU:
    ``(clamp(u, ±limit) + 1) · g' σ(alpha g')`` with ``g' = min(g, limit)``."""

    family = "gpt_oss"
    model_types = ("gpt_oss",)
    norm_fixed = True
    router_text = "linear + bias; softmax over the top-k logits"

    def _glu(self) -> GLU:
        experts = self.layers[0].experts
        alpha, limit = float(experts.alpha), float(experts.limit)
        return GLU(
            alpha_silu(alpha), limit=limit, up_offset=1.0, name=f"alpha-silu GLU ({alpha:g})"
        )


class HYV4Adapter(DeepseekV3Adapter):
    """HY-V4 (hyper-connection residual streams): DeepSeek-V3's router; experts are SwiGLU
    with the gate clamped from above and the up projection on both sides at
    ``swiglu_limit``."""

    family = "hy_v4"
    model_types = ("hy_v4",)

    def _glu(self) -> GLU:
        limit = float(self.layers[0].experts.swiglu_limit)
        return GLU(self.act_fn, limit=limit, name="clamped swiglu")


class Llama4Adapter(HFMoEAdapter):
    """Llama 4: top-k logits, weights sigmoid(logit) (not renormalised) that scale the
    expert's *input*: y = shared(x) + Σ_k E_k(w_k x). The experts module runs every expert on
    every (scaled) token, so the choice is read from the router's output (its scores are 0
    outside the top-k); ``gate_up_proj`` is [E, D, 2F]. MoE layers every
    ``interleave_moe_layer_step``."""

    family = "llama4"
    model_types = ("llama4_text",)
    score = "sigmoid"
    norm_fixed = False
    capture_at = "router"
    experts_transposed = True
    router_text = "linear; sigmoid of the top-k logits, applied to the expert inputs"

    def _spec(self) -> RoutingSpec:
        return dataclasses.replace(super()._spec(), weights_scale="input")

    def parse_router_output(
        self, i: int, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The router returns (scores [N, E]: sigmoid of the chosen logits, 0 elsewhere,
        logits [N, E])."""
        scores, logits = output
        weight, idx = scores.float().topk(self.spec.top_k, dim=-1)
        return logits, idx, weight


class DbrxAdapter(HFMoEAdapter):
    """DBRX: blocks at ``transformer.blocks``, the MoE at ``ffn`` (router ``ffn.router.layer``);
    softmax -> top-k, weights divided by their p-norm (``moe_normalize_expert_weights``: 1 is
    renormalisation, None none, another p is not reproduced by :func:`route`). Experts: one
    GLU module whose ``w1``/``v1``/``w2`` are [E·F, D] (gate, up, down transposed)."""

    family = "dbrx"
    model_types = ("dbrx",)

    def _p_norm(self) -> float | None:
        p = getattr(self.layers[0].block, "moe_normalize_expert_weights", None)
        return None if p is None else float(p)

    def _norm(self) -> bool:
        return self._p_norm() is not None

    def _spec(self) -> RoutingSpec:
        p = self._p_norm()
        return dataclasses.replace(super()._spec(), reproducible=p in (None, 1.0))

    def _act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layers[0].experts.mlp.activation_fn

    def _views(self, layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, v1, w2) of the experts' GLU viewed as [E, F, D]."""
        mlp = layer.experts.mlp
        e = int(layer.experts.num_experts)
        return tuple(p.view(e, -1, self.hidden_size) for p in (mlp.w1, mlp.v1, mlp.w2))  # type: ignore[return-value]

    def _read_expert_weights(self, layer: MoELayer) -> ExpertWeights:
        act, up, down = (t.detach() for t in self._views(layer))
        return ExpertWeights(act, up, down, layout="dbrx")

    def _write_expert_weights(self, layer: MoELayer, weights: ExpertWeights, layout: str) -> None:
        with torch.no_grad():
            for view, new in zip(self._views(layer), (weights.act, weights.up, weights.down)):
                view.copy_(new)


class JetMoeAdapter(HFMoEAdapter):
    """JetMoE: the FFN MoE at ``mlp`` (its mixture-of-attention experts in ``self_attention``
    are not FFN experts and are not analysed); the router ``mlp.router`` returns its logits
    last, and softmaxes the top-k logits (= softmax scores renormalised over the top-k), so
    the capture reproduces the choice with :func:`route`. Experts: ``input_linear.weight``
    [E, 2F, D] (gate half first) and ``output_linear.weight`` [E, D, F]; the block's bias [D]
    is added to the combined output, outside the experts."""

    family = "jetmoe"
    model_types = ("jetmoe",)
    norm_fixed = True
    capture_at = "router"
    router_text = "linear; softmax over the top-k logits"

    def _make_layer(self, index: int, layer_index: int, layer: nn.Module) -> MoELayer | None:
        block = getattr(layer, "mlp", None)
        if block is None or not hasattr(block, "input_linear") or not hasattr(block, "router"):
            return None
        return MoELayer(index, layer_index, block, block.router, block, capture_at="router")

    def _act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layers[0].block.activation

    def parse_router_output(
        self, i: int, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The router returns (sorted assignments, token of each, gates, expert sizes,
        logits [N, E]); the choice is recomputed from the logits."""
        return output[4], None, None

    def _read_expert_weights(self, layer: MoELayer) -> ExpertWeights:
        act, up = layer.experts.input_linear.weight.detach().chunk(2, dim=1)
        down = layer.experts.output_linear.weight.detach().transpose(1, 2)
        return ExpertWeights(act, up, down, layout="jetmoe")

    def _write_expert_weights(self, layer: MoELayer, weights: ExpertWeights, layout: str) -> None:
        with torch.no_grad():
            layer.experts.input_linear.weight.copy_(torch.cat([weights.act, weights.up], dim=1))
            layer.experts.output_linear.weight.copy_(weights.down.transpose(1, 2))
