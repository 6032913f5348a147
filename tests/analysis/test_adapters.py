"""Adapters: each family's tiny random model routes and computes exactly as its own forward."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.analysis.adapters import (
    ExpertWeights,
    RoutingSpec,
    expert_forward,
    get_adapter,
    route,
    supported_families,
)

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
DEEPSEEK = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
)


def _mixtral() -> nn.Module:
    return MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2))


def _olmoe() -> nn.Module:
    return OlmoeForCausalLM(OlmoeConfig(**COMMON, num_experts=6, num_experts_per_tok=2))


def _qwen2_moe() -> nn.Module:
    cfg = Qwen2MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    )
    return Qwen2MoeForCausalLM(cfg)


def _qwen3_moe() -> nn.Module:
    cfg = Qwen3MoeConfig(
        **COMMON,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
    )
    return Qwen3MoeForCausalLM(cfg)


def _deepseek_v2() -> nn.Module:
    cfg = DeepseekV2Config(
        **COMMON,
        **DEEPSEEK,
        topk_method="group_limited_greedy",
        q_lora_rank=None,
        routed_scaling_factor=2.0,
    )
    return DeepseekV2ForCausalLM(cfg)


def _deepseek_v3() -> nn.Module:
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**COMMON, **DEEPSEEK, q_lora_rank=16))
    with torch.no_grad():  # a non-zero correction bias so that selection != plain top-k
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.3)
    return model


def _rmoe(router_type: str = "recurrent", shared: int = 1) -> nn.Module:
    cfg = RMoEConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        moe_intermediate_size=16,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        router_dim=8,
        router_type=router_type,
        num_shared_experts=shared,
        mlp_only_layers=[1],
    )
    return RMoEForCausalLM(cfg)


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "rmoe": _rmoe,
}


def _build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # larger router weights give decisive, varied routing
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "scorer.weight.weight")):
                p.normal_(0.0, 0.5)
    return model


def _block_outputs(adapter) -> tuple[list, Callable[[], None]]:
    """Hook every MoE block; returns (list of (input, output) per call, remover)."""
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    handles = []
    for layer in adapter.layers:

        def hook(module, args, output, i=layer.index):
            y = output.hidden if hasattr(output, "hidden") else output
            seen.append((i, args[0].detach(), y.detach()))

        handles.append(layer.block.register_forward_hook(hook))
    return seen, lambda: [h.remove() for h in handles]


def test_every_family_is_registered():
    # the other registered families are tested in test_adapter_families.py
    assert set(FAMILIES) <= set(supported_families())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_matches_model_forward(family: str):
    model = _build(family)
    adapter = get_adapter(model)
    assert adapter.family == family
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    blocks, remove = _block_outputs(adapter)
    with torch.no_grad(), adapter.capture(store_inputs=1000, store_outputs=True) as cap:
        out = model(ids, output_router_logits=True, use_cache=False)
    remove()
    spec = adapter.spec
    assert len(out.router_logits) == adapter.num_layers == cap.num_layers
    for i, lc in enumerate(cap.layers):
        n = ids.numel()
        assert lc.num_tokens == n and lc.topk_idx.shape == (n, spec.top_k)
        # The hooks saw the logits the model reports.
        torch.testing.assert_close(lc.logits, out.router_logits[i].float().reshape(n, -1))
        # Probabilities: a softmax over all experts (sigmoid scores normalised for DeepSeek-V3).
        torch.testing.assert_close(lc.probs.sum(-1), torch.ones(n))
        expected_scores = (
            torch.softmax(lc.logits, -1) if spec.score == "softmax" else torch.sigmoid(lc.logits)
        )
        torch.testing.assert_close(lc.scores, expected_scores)
        # The adapter's routing function reproduces the model's own choice and weights.
        decision = adapter.route(i, out.router_logits[i].float().reshape(n, -1))
        assert torch.equal(decision.topk_idx, lc.topk_idx)
        torch.testing.assert_close(decision.topk_weight, lc.topk_weight)
        # Router logits recomputed from the captured inputs (linear routers).
        if family != "rmoe":
            torch.testing.assert_close(adapter.router_logits(i, lc.inputs), lc.logits)
        # The block output equals sum_k w_k E_k(x) (+ shared expert) from the adapter's pieces.
        x = lc.inputs
        assert x.shape == (n, model.config.hidden_size)
        outs = lc.expert_outputs
        assert outs.shape == (spec.num_experts, n, x.shape[1])
        y = (outs[lc.topk_idx, torch.arange(n)[:, None]] * lc.topk_weight[..., None]).sum(1)
        layer = adapter.layers[i]
        if layer.shared is not None:
            with torch.no_grad():
                s = layer.shared(x)
                if layer.shared_gate is not None:
                    s = torch.sigmoid(layer.shared_gate(x)) * s
            y = y + s
        (block_y,) = [b[2] for b in blocks if b[0] == i]
        torch.testing.assert_close(y, block_y.reshape(n, -1), rtol=1e-4, atol=1e-5)
        # Activations are act(W_act x).
        w = adapter.expert_weights(i)
        torch.testing.assert_close(
            lc.activations, F.silu(torch.einsum("nd,efd->enf", x, w.act.float()))
        )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expert_weights_round_trip(family: str):
    model = _build(family)
    adapter = get_adapter(model)
    for i in range(adapter.num_layers):
        w = adapter.expert_weights(i)
        e, f, d = w.act.shape
        assert w.up.shape == w.down.shape == (e, f, d) and d == model.config.hidden_size
        assert e == adapter.spec.num_experts
        experts = adapter.layers[i].experts
        if w.layout == "fused":  # the native fused tensor is [act; up] and down^T
            torch.testing.assert_close(torch.cat([w.act, w.up], dim=1), experts.gate_up_proj)
            torch.testing.assert_close(w.down.transpose(1, 2), experts.down_proj)
        # Each expert in canonical form computes what the model's expert container computes.
        x = torch.randn(5, d)
        for k in range(e):
            idx = torch.full((5, 1), k)
            with torch.no_grad():
                ref = experts(x, idx, torch.ones(5, 1))
            got, _ = expert_forward(x, w, adapter.act_fn, experts=[k])
            torch.testing.assert_close(got[0], ref, rtol=1e-4, atol=1e-6)
        # Writing permuted experts back and reading them again gives the permutation.
        perm = torch.randperm(e)
        before = {k: v.clone() for k, v in w.as_dict().items()}
        permuted = ExpertWeights(*(before[k][perm] for k in ("act", "up", "down")))
        adapter.set_expert_weights(i, permuted)
        again = adapter.expert_weights(i)
        for k in ("act", "up", "down"):
            torch.testing.assert_close(getattr(again, k), before[k][perm])
        if family in ("qwen2_moe", "deepseek_v2", "deepseek_v3") or (
            family == "rmoe" and adapter.spec.num_shared_experts
        ):
            assert again.shared is not None and again.shared["down"].shape[1] == d


class _LegacyExpert(nn.Module):
    """transformers 4.x MixtralBlockSparseTop2MLP: w1 (act), w3 (up), w2 (down)."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class _LegacyBlock(nn.Module):
    """A per-expert-module MoE block whose gate is a plain nn.Linear returning logits."""

    def __init__(self, d: int, f: int, e: int, k: int) -> None:
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = nn.ModuleList(_LegacyExpert(d, f) for _ in range(e))
        self.chosen: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = h.reshape(-1, d)
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        self.chosen.append(idx)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            y.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return y.view(b, t, d)


def test_per_expert_module_layout():
    torch.manual_seed(0)
    model = _mixtral().eval()
    for layer in model.model.layers:
        layer.mlp = _LegacyBlock(32, 48, 4, 2)
    adapter = get_adapter(model)
    assert adapter.num_layers == 2
    w = adapter.expert_weights(1)
    assert w.layout == "modules" and w.act.shape == (4, 48, 32)
    torch.testing.assert_close(w.down[2], model.model.layers[1].mlp.experts[2].w2.weight.T)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad(), adapter.capture(store_inputs=16, store_outputs=True) as cap:
        model(ids, use_cache=False)
    for i, lc in enumerate(cap.layers):
        block = adapter.layers[i].block
        # The router returns only logits; the capture reproduces the block's own choice.
        assert torch.equal(lc.topk_idx, block.chosen[-1])
        with torch.no_grad():
            ref = block.experts[3](lc.inputs)
        torch.testing.assert_close(lc.expert_outputs[3], ref, rtol=1e-4, atol=1e-6)
    w2 = ExpertWeights(w.act.flip(0), w.up.flip(0), w.down.flip(0))
    adapter.set_expert_weights(1, w2)
    torch.testing.assert_close(model.model.layers[1].mlp.experts[0].w1.weight, w.act[3])


def test_route_group_limited_and_bias():
    spec = RoutingSpec(
        "sigmoid",
        num_experts=4,
        top_k=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
        group_score="top2_sum",
        num_groups=2,
        topk_groups=1,
        score_correction_bias=True,
    )
    logits = torch.tensor([[3.0, -3.0, 2.0, 2.5]])
    # Without a bias group {2, 3} wins (2.0 + 2.5 vs 3.0 - 3.0 in sigmoid space).
    d = route(logits, spec)
    assert d.topk_idx.tolist() == [[3, 2]]
    torch.testing.assert_close(d.topk_weight.sum(), torch.tensor(2.0))
    # A large bias on expert 1 moves the choice to group {0, 1}; weights stay unbiased.
    d = route(logits, spec, bias=torch.tensor([0.0, 5.0, 0.0, 0.0]))
    assert d.topk_idx.tolist() == [[1, 0]]
    s = torch.sigmoid(logits[0, [1, 0]])
    torch.testing.assert_close(d.topk_weight[0], 2.0 * s / s.sum())
    torch.testing.assert_close(d.probs.sum(), torch.tensor(1.0))


def test_route_softmax_without_renormalisation():
    spec = RoutingSpec("softmax", num_experts=8, top_k=2, norm_topk_prob=False)
    d = route(torch.zeros(3, 8), spec)
    torch.testing.assert_close(d.topk_weight, torch.full((3, 2), 1 / 8))
    assert math.isclose(float(d.probs[0].sum()), 1.0, rel_tol=1e-6)


def test_rmoe_router_rows_and_shared_cell():
    recurrent = get_adapter(_rmoe("recurrent").eval())
    assert recurrent.router_weight(0).shape == (4, 8)  # rows in the state space P
    assert recurrent.shared_router_parameters()
    with pytest.raises(ValueError, match="previous layer"):
        recurrent.router_logits(0, torch.randn(3, 32))
    linear = get_adapter(_rmoe("linear", shared=0).eval())
    assert linear.router_weight(1).shape == (4, 32)
    assert linear.layer_indices == [0, 2] and not linear.shared_router_parameters()
    x = torch.randn(3, 32)
    torch.testing.assert_close(
        linear.router_logits(0, x), x @ linear.router_weight(0).T, rtol=1e-5, atol=1e-6
    )


def test_unknown_family_is_rejected():
    class Dummy(nn.Module):
        config = type("C", (), {"model_type": "mixtrall"})()

    with pytest.raises(ValueError, match="nearest: 'mixtral'"):
        get_adapter(Dummy())
