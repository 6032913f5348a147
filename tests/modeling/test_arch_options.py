"""Issue 15's architecture options (attention biases, q/k norms, RoPE scaling, the shared-expert
gate, dense layers) against the transformers families' own modules and whole models, with
weights copied; and with every router variant: save/load, KV-cache generation, accounting."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tests.conftest import ROUTER_VARIANTS, tiny_config

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.modeling import MoEBlock
from rmoe.modeling.accounting import count_model, parameter_counts
from rmoe.modeling.transformer import (
    Attention,
    rope_cos_sin,
    rope_frequencies,
    scaled_rope_cos_sin,
)
from rmoe.registry import ROUTERS

D, H, KV, V = 32, 4, 2, 64
ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "longrope": {  # head_dim 8 -> 4 factors; sequences of 12 > 8 use the long ones
        "rope_type": "longrope",
        "short_factor": [1.0, 1.1, 1.3, 1.6],
        "long_factor": [1.0, 2.0, 4.0, 8.0],
        "original_max_position_embeddings": 8,
    },
}


def _hf_rope(scaling: dict | None, theta: float = 10000.0) -> dict:
    return {"rope_type": "default", **(scaling or {}), "rope_theta": theta}


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Large random weights (std 0.2, norms and biases too) so a mis-mapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)


def _hf_config(family: str, **kw):
    base = dict(
        vocab_size=V,
        hidden_size=D,
        num_attention_heads=H,
        num_key_value_heads=KV,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return getattr(transformers, f"{family}Config")(**{**base, **kw})


def _rmoe_config(**kw) -> RMoEConfig:
    base = dict(
        vocab_size=V,
        hidden_size=D,
        num_attention_heads=H,
        num_key_value_heads=KV,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        router_type="linear",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return RMoEConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
BAD = {
    "qk_norm": (dict(qk_norm="layer"), "qk_norm='layer' is not valid"),
    "gate-without-shared": (dict(shared_expert_gate=True), "needs num_shared_experts >= 1"),
    "base-linear-router": (
        dict(router_type="linear", router_base_linear=True),
        "router_type='linear' has no recurrent stage",
    ),
    "bias-not-bool": (dict(attention_bias="yes"), "attention_bias must be true or false"),
    "rope-dynamic": (
        dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        "'dynamic'.*not supported",
    ),
    "rope-unknown": (dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "'ntk' is not valid"),
    "rope-no-type": (dict(rope_scaling={"factor": 2.0}), "needs a 'rope_type'"),
    "rope-missing": (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "missing keys"),
    "rope-unknown-key": (
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 3}),
        "unknown keys \\['beta_fast'\\]",
    ),
    "rope-theta": (
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 5.0}),
        "rope_theta=5.0 differs",
    ),
    "rope-partial": (
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
        "partial_rotary_factor must be 1",
    ),
    "rope-factor": (dict(rope_scaling={"rope_type": "linear", "factor": 0}), "factor must be"),
    "rope-longrope-length": (
        dict(rope_scaling={**ROPES["longrope"], "long_factor": [1.0]}),
        "long_factor needs head_dim / 2 = 4",
    ),
    "rope-not-dict": (dict(rope_scaling=2.0), "rope_scaling must be a dict"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_config_rejects_bad_options(case):
    kw, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        tiny_config(hidden_size=32, num_attention_heads=4, **kw)


def test_every_option_is_documented_in_the_config_docstring():
    doc = RMoEConfig.__doc__
    for name in (
        "attention_bias",
        "attention_out_bias",
        "qk_norm",
        "rope_scaling",
        "shared_expert_gate",
        "router_base_linear",
        "decoder_sparse_step",  # how the families' dense-layer patterns map to mlp_only_layers
        "first_k_dense_replace",
    ):
        assert f"{name} (" in doc or name in doc.split("mlp_only_layers (")[1][:900], name


def test_rope_scaling_is_normalised_and_a_plain_field():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from transformers' property
        cfg = tiny_config(rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.to_dict()["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert tiny_config(rope_scaling={"rope_type": "default"}).rope_scaling is None
    assert RMoEConfig().rope_scaling is None and "rope_parameters" not in RMoEConfig().to_dict()


# ----------------------------------------------------------------------------------------------
# RoPE against transformers' rotary embedding
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_tables_equal_transformers(rope):
    hf_cfg = _hf_config("Qwen3Moe", head_dim=8, rope_parameters=_hf_rope(ROPES[rope]))
    hf_rope = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeRotaryEmbedding(hf_cfg)
    cfg = _rmoe_config(head_dim=8, rope_scaling=ROPES[rope])
    pos = torch.arange(12)[None].expand(2, 12)
    cos_hf, sin_hf = hf_rope(torch.zeros(1, dtype=torch.float32), pos)
    scaled = rope_frequencies(cfg, pos)
    if scaled is None:
        cos, sin = rope_cos_sin(pos, 8, cfg.rope_theta, torch.float32)
    else:
        cos, sin = scaled_rope_cos_sin(pos, *scaled, torch.float32)
    torch.testing.assert_close(cos[:, 0], cos_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[:, 0], sin_hf, rtol=1e-6, atol=1e-6)
    if rope == "longrope":  # 12 > 8 positions: the long factors, as transformers picks them
        short = rope_frequencies(cfg, pos[:, :8])[0]
        assert not torch.allclose(short, scaled[0])


# ----------------------------------------------------------------------------------------------
# Attention modules
# ----------------------------------------------------------------------------------------------
ATTENTION = {
    # id: (transformers family, its module prefix, HF config kw, rmoe config kw)
    "qwen3_moe-head-norm": ("Qwen3Moe", "qwen3_moe", dict(head_dim=12), dict(qk_norm="head")),
    "olmoe-proj-norm": ("Olmoe", "olmoe", {}, dict(qk_norm="proj")),
    "qwen2_moe-qkv-bias": ("Qwen2Moe", "qwen2_moe", {}, dict(attention_bias=True)),
    "llama-all-bias": (
        "Llama",
        "llama",
        dict(attention_bias=True, head_dim=12),
        dict(attention_bias=True, attention_out_bias=True),
    ),
}


@pytest.mark.parametrize("rope", ["default", "yarn", "longrope"])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_equals_the_families_module(case, rope):
    family, module, hf_kw, kw = ATTENTION[case]
    head_dim = hf_kw.get("head_dim", D // H)
    scaling = ROPES[rope]
    if rope == "longrope":
        scaling = {**scaling, "short_factor": [1.0] * (head_dim // 2)}
        scaling["long_factor"] = [1.0 + i for i in range(head_dim // 2)]
    hf_cfg = _hf_config(family, rope_parameters=_hf_rope(scaling), **hf_kw)
    mod = getattr(transformers.models, module)
    prefix = getattr(mod, f"modeling_{module}")
    hf_attn = getattr(prefix, f"{family}Attention")(hf_cfg, layer_idx=0).eval()
    hf_rope = getattr(prefix, f"{family}RotaryEmbedding")(hf_cfg)
    _randomize(hf_attn)
    cfg = _rmoe_config(head_dim=head_dim, rope_scaling=scaling, **kw)
    ours = Attention(cfg, layer_idx=0).eval()
    ours.load_state_dict(hf_attn.state_dict(), strict=True)

    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        want, _ = hf_attn(x, hf_rope(x, pos), None)
        cos, sin = hf_rope(x, pos)
        got = ours(x, cos[:, None], sin[:, None], None, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_qk_norm_parameter_names_and_shapes():
    head = RMoEForCausalLM(tiny_config(qk_norm="head", head_dim=12)).state_dict()
    proj = RMoEForCausalLM(tiny_config(qk_norm="proj")).state_dict()
    assert head["model.layers.0.attn.q_norm.weight"].shape == (12,)
    assert head["model.layers.2.attn.k_norm.weight"].shape == (12,)
    assert proj["model.layers.0.attn.q_norm.weight"].shape == (4 * 8,)
    assert proj["model.layers.0.attn.k_norm.weight"].shape == (2 * 8,)
    assert not any("q_norm" in k for k in RMoEForCausalLM(tiny_config()).state_dict())


# ----------------------------------------------------------------------------------------------
# MoE block with the gated shared expert
# ----------------------------------------------------------------------------------------------
def _to_rmoe_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 MoE-family state dict -> rmoe names (linear routers)."""
    out = {}
    for key, value in state.items():
        for hf, ours in (
            (".self_attn.", ".attn."),
            (".input_layernorm.", ".input_norm."),
            (".post_attention_layernorm.", ".ffn_norm."),
            ("mlp.gate.weight", "moe.router.scorer.weight.weight"),
            ("mlp.shared_expert_gate.", "moe.shared_expert_gate."),
            ("mlp.shared_expert.", "moe.shared_experts."),
            ("mlp.experts.down_proj", "moe.experts.down_proj"),
        ):
            key = key.replace(hf, ours)
        if key.endswith("mlp.experts.gate_up_proj"):
            stem = key[: -len("mlp.experts.gate_up_proj")]
            gate, up = value.chunk(2, dim=1)
            out[f"{stem}moe.experts.gate_proj"], out[f"{stem}moe.experts.up_proj"] = gate, up
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_gated_shared_expert_block_equals_qwen2_moe(norm_topk_prob):
    hf_cfg = _hf_config(
        "Qwen2Moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=16,
        norm_topk_prob=norm_topk_prob,
    )
    qwen2 = transformers.models.qwen2_moe.modeling_qwen2_moe
    hf_block = qwen2.Qwen2MoeSparseMoeBlock(hf_cfg).eval()
    _randomize(hf_block)
    cfg = _rmoe_config(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        num_shared_experts=1,
        shared_expert_intermediate_size=16,
        shared_expert_gate=True,
        norm_topk_prob=norm_topk_prob,
        experts_backend="loop",
    )
    ours = MoEBlock(cfg).eval()
    state = _to_rmoe_keys({f"mlp.{k}": v for k, v in hf_block.state_dict().items()})
    ours.load_state_dict({k.removeprefix("moe."): v for k, v in state.items()}, strict=True)
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).hidden, hf_block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(ROUTER_VARIANTS))
def test_shared_expert_gate_with_every_router(variant):
    """Block output = routed part + sigmoid(x w_gate) * shared(x), whatever the router."""
    cfg = tiny_config(**ROUTER_VARIANTS[variant], num_shared_experts=2, shared_expert_gate=True)
    model = RMoEForCausalLM(cfg).eval()
    block = model.model.layers[0].moe
    cell, shared = model.model.router_cell, model.model.router_shared
    x = torch.randn(2, 6, cfg.hidden_size)
    xf = x.reshape(-1, cfg.hidden_size)
    with torch.no_grad():
        full = block(x, cell=cell, shared=shared).hidden.reshape(-1, cfg.hidden_size)
        want = torch.sigmoid(block.shared_expert_gate(xf)) * block.shared_experts(xf)
        block.shared_experts.down_proj.weight.zero_()
        routed = block(x, cell=cell, shared=shared).hidden.reshape(-1, cfg.hidden_size)
    torch.testing.assert_close(full - routed, want, rtol=1e-5, atol=1e-6)
    assert block.shared_expert_gate.weight.shape == (1, cfg.hidden_size)


# ----------------------------------------------------------------------------------------------
# Whole models: each family's own CausalLM with weights copied into rmoe
# ----------------------------------------------------------------------------------------------
FAMILIES = {
    # id: (HF family, HF config kw, rmoe config kw)
    "qwen2_moe-bias-gate-sparse-step-yarn": (
        "Qwen2Moe",
        dict(
            num_hidden_layers=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            intermediate_size=40,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            rope_parameters=_hf_rope(ROPES["yarn"]),
        ),
        dict(
            num_hidden_layers=4,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            intermediate_size=40,
            attention_bias=True,
            num_shared_experts=1,
            shared_expert_intermediate_size=16,
            shared_expert_gate=True,
            norm_topk_prob=False,
            # dense iff in mlp_only_layers or (i + 1) % decoder_sparse_step != 0
            mlp_only_layers=sorted({3} | {i for i in range(4) if (i + 1) % 2}),
            rope_scaling=ROPES["yarn"],
        ),
    ),
    "qwen3_moe-head-norm-dense-llama3": (
        "Qwen3Moe",
        dict(
            num_hidden_layers=3,
            head_dim=12,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            intermediate_size=40,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            rope_parameters=_hf_rope(ROPES["llama3"]),
        ),
        dict(
            num_hidden_layers=3,
            head_dim=12,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            intermediate_size=40,
            qk_norm="head",
            mlp_only_layers=[1],
            rope_scaling=ROPES["llama3"],
        ),
    ),
    "olmoe-proj-norm-linear": (
        "Olmoe",
        dict(
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            intermediate_size=24,
            rope_parameters=_hf_rope(ROPES["linear"]),
        ),
        dict(
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            qk_norm="proj",
            norm_topk_prob=False,
            rope_scaling=ROPES["linear"],
        ),
    ),
    "mixtral-longrope": (
        "Mixtral",
        dict(
            num_hidden_layers=2,
            head_dim=8,  # transformers' longrope validation reads it
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=24,
            rope_parameters=_hf_rope(ROPES["longrope"], theta=1e6),
        ),
        dict(
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            rope_theta=1e6,
            rope_scaling=ROPES["longrope"],
        ),
    ),
    "llama-dense-all-biases": (
        "Llama",
        dict(num_hidden_layers=2, intermediate_size=40, attention_bias=True),
        dict(
            num_hidden_layers=2,
            intermediate_size=40,
            attention_bias=True,
            attention_out_bias=True,
            mlp_only_layers=[0, 1],
        ),
    ),
}


@pytest.mark.parametrize("case", list(FAMILIES))
def test_whole_model_equals_the_family(case):
    family, hf_kw, kw = FAMILIES[case]
    hf_cfg = _hf_config(family, **hf_kw)
    hf = getattr(transformers, f"{family}ForCausalLM")(hf_cfg).eval()
    _randomize(hf)
    ours = RMoEForCausalLM(_rmoe_config(**kw)).eval()
    ours.load_state_dict(_to_rmoe_keys(hf.state_dict()), strict=True)
    ids = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Every router variant with the options on: save/load, KV cache, accounting
# ----------------------------------------------------------------------------------------------
def _all_options(variant: str, rope: str = "yarn") -> RMoEConfig:
    kw = dict(ROUTER_VARIANTS[variant])
    uses_cell = ROUTERS.lookup(kw["router_type"]).uses_cell
    return tiny_config(
        **kw,
        attention_bias=True,
        attention_out_bias=True,
        qk_norm="head" if list(ROUTER_VARIANTS).index(variant) % 2 else "proj",
        rope_scaling=ROPES[rope],
        num_shared_experts=1,
        shared_expert_gate=True,
        mlp_only_layers=[1],
        router_base_linear=uses_cell,
    )


@pytest.mark.parametrize("variant", list(ROUTER_VARIANTS))
def test_options_save_load_and_accounting_with_every_router(variant, tmp_path):
    cfg = _all_options(variant)
    model = RMoEForCausalLM(cfg).eval()
    _randomize(model)
    model.save_pretrained(tmp_path)
    back = RMoEForCausalLM.from_pretrained(tmp_path).eval()
    for name in ("attention_bias", "qk_norm", "rope_scaling", "shared_expert_gate"):
        assert getattr(back.config, name) == getattr(cfg, name)
    assert back.config.router_base_linear == cfg.router_base_linear
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    counts = parameter_counts(model)
    assert count_model(model).total_params == counts["total"]
    assert count_model(model).router_params == counts["router"]


def _greedy_recompute(model, ids, n):
    """n greedy tokens without the cache; `model.generate` is told there is no EOS."""
    model.generation_config.eos_token_id = None
    for _ in range(n):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
    return ids


@pytest.mark.parametrize("rope", ["linear", "yarn", "llama3"])
@pytest.mark.parametrize("variant", ["linear", "recurrent", "recurrent-sproj"])
def test_generate_with_cache_equals_recompute_with_qk_norm_and_rope_scaling(variant, rope):
    model = RMoEForCausalLM(_all_options(variant, rope)).eval()
    _randomize(model)
    model.double()
    ids = torch.randint(0, 256, (2, 5))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=257)
    with torch.no_grad():
        ref = _greedy_recompute(model, ids, 6)
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
    assert torch.equal(cached, ref)


def test_accounting_counts_the_new_parameters_and_flops():
    plain_model = RMoEForCausalLM(tiny_config(num_shared_experts=1))
    cfg = tiny_config(
        num_shared_experts=1,
        shared_expert_gate=True,
        attention_bias=True,
        attention_out_bias=True,
        qk_norm="proj",
        router_base_linear=True,
    )
    model = RMoEForCausalLM(cfg)
    plain, rich = count_model(plain_model), count_model(model)
    d, e, n_layers = cfg.hidden_size, cfg.num_experts, cfg.num_hidden_layers
    qd, kvd = 4 * 8, 2 * 8
    attn = (qd + 2 * kvd) + d + (qd + kvd)  # q/k/v biases, o_proj bias, q/k norms
    extra = n_layers * (attn + d + d * e)  # + shared-expert gate, retrofit base
    assert rich.total_params - plain.total_params == extra
    real = parameter_counts(model)["total"] - parameter_counts(plain_model)["total"]
    assert real == extra
    assert rich.router_flops_per_token - plain.router_flops_per_token == 2 * n_layers * d * e
    assert rich.breakdown["shared"] - plain.breakdown["shared"] == 2 * n_layers * d
    assert rich.breakdown["attention"] == plain.breakdown["attention"]  # biases: no matmuls


def test_dense_only_model_runs_and_generates():
    """A dense model before upcycling: every layer in mlp_only_layers, a linear router type."""
    model = RMoEForCausalLM(tiny_config(router_type="linear", mlp_only_layers=[0, 1, 2])).eval()
    ids = torch.randint(0, 256, (1, 5))
    out = model(ids, labels=ids)
    assert out.aux_loss is None and torch.isfinite(out.loss)
    assert count_model(model).expert_params == 0 == parameter_counts(model)["router"]
    assert count_model(model).total_params == parameter_counts(model)["total"]
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=257)
    with torch.no_grad():
        ref = _greedy_recompute(model.double(), ids, 4)
        assert torch.equal(model.generate(ids, **greedy), ref)
