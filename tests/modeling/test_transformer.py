import pytest
import torch
from tests.conftest import ROUTER_VARIANTS, randomize_expert_biases, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from rmoe import RMoEConfig, RMoEForCausalLM, RMoEModel


@pytest.mark.parametrize("variant", list(ROUTER_VARIANTS))
def test_save_load_identical_logits(tmp_path, variant):
    kw = ROUTER_VARIANTS[variant]
    router_type = kw["router_type"]
    cfg = tiny_config(num_shared_experts=1, mlp_only_layers=[1], **kw)
    model = RMoEForCausalLM(cfg).eval()
    randomize_expert_biases(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RMoEForCausalLM)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(ids).logits, loaded(ids).logits, rtol=0, atol=0)
    if router_type == "random":  # still frozen after loading: a training step leaves it alone
        router = loaded.model.layers[0].moe.router
        before = [p.detach().clone() for p in router.parameters()]
        loaded.train()
        opt = torch.optim.AdamW(loaded.parameters(), lr=0.1, weight_decay=0.0)
        loaded(ids, labels=ids).loss.backward()
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, router.parameters()))


def test_tied_embeddings_roundtrip(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    model = RMoEForCausalLM(cfg)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_auto_classes_registered(tmp_path):
    cfg = tiny_config()
    cfg.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RMoEConfig)
    assert isinstance(AutoModel.from_config(cfg), RMoEModel)
    assert isinstance(AutoModelForCausalLM.from_config(cfg), RMoEForCausalLM)


def _greedy_no_cache(model, ids, n):
    for _ in range(n):
        logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("variant", list(ROUTER_VARIANTS))
def test_generate_with_cache_equals_recompute(variant):
    cfg = tiny_config(**ROUTER_VARIANTS[variant])
    model = RMoEForCausalLM(cfg).double().eval()
    randomize_expert_biases(model)
    prompt = torch.randint(0, 256, (2, 5))
    ref = _greedy_no_cache(model, prompt, 8)
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        use_cache=True,
        pad_token_id=cfg.pad_token_id,
    )
    assert torch.equal(out, ref)


def test_left_padding_matches_unpadded():
    cfg = tiny_config(router_type="recurrent")
    model = RMoEForCausalLM(cfg).double().eval()
    a = torch.randint(0, 256, (1, 6))
    b = torch.randint(0, 256, (1, 4))
    batch = torch.cat([torch.cat([torch.full((1, 2), 257), b], 1), a])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    out = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[1], model(a).logits[0])
    torch.testing.assert_close(out[0, 2:], model(b).logits[0])


def test_gqa_and_head_dim():
    cfg = tiny_config(num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    model = RMoEForCausalLM(cfg)
    assert model.model.layers[0].attn.k_proj.weight.shape == (16, 32)
    assert model(torch.randint(0, 256, (2, 4))).logits.shape == (2, 4, 258)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(num_experts_per_tok=9, num_experts=8), "num_experts_per_tok"),
        (dict(router_type="recurent"), "nearest: 'recurrent'"),
        (dict(router_cell="gruu"), "router_cell"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(mlp_only_layers=[7]), "mlp_only_layers"),
        (dict(gw_entropy_threshold=2.0), "gw_entropy_threshold"),
    ],
)
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        tiny_config(**kw)


def test_initialisation_is_documented_scale():
    cfg = tiny_config(router_type="recurrent", initializer_range=0.02, num_hidden_layers=2)
    model = RMoEForCausalLM(cfg)
    std = model.model.layers[0].moe.experts.gate_proj.std().item()
    std_out = model.model.layers[0].moe.experts.down_proj.std().item()
    assert 0.015 < std < 0.025
    assert 0.007 < std_out < 0.013  # 0.02 / sqrt(2 * 2)
    cell = model.model.router_cell
    assert cell.weight_hh.abs().max() <= 1 / cfg.router_dim**0.5


def test_seeded_init_shares_non_router_weights_across_routers():
    models = {}
    for rt, extra in [
        ("linear", {}),
        ("recurrent", {}),
        ("xmoe", {}),
        ("recurrent", {"router_dim": 16}),
    ]:
        m = RMoEForCausalLM(tiny_config(router_type=rt, **extra))
        m.init_weights_seeded(123)
        models[(rt, tuple(extra.items()))] = m
    ref = next(iter(models.values()))
    ref_sd = {k: v for k, v in ref.state_dict().items() if ".router." not in k}
    for m in models.values():
        sd = m.state_dict()
        for k, v in ref_sd.items():
            assert torch.equal(sd[k], v), k
    a = RMoEForCausalLM(tiny_config(router_type="recurrent"))
    a.init_weights_seeded(123)
    b = RMoEForCausalLM(tiny_config(router_type="recurrent"))
    b.init_weights_seeded(124)
    assert not torch.equal(a.model.router_cell.weight_hh, b.model.router_cell.weight_hh)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    # tied embeddings stay tied
    t = RMoEForCausalLM(tiny_config(tie_word_embeddings=True))
    t.init_weights_seeded(0)
    assert t.lm_head.weight.data_ptr() == t.model.embed_tokens.weight.data_ptr()


def test_batched_left_padded_generate_equals_single():
    cfg = tiny_config(router_type="recurrent")
    model = RMoEForCausalLM(cfg).double().eval()
    a = torch.randint(0, 256, (1, 6))
    b = torch.randint(0, 256, (1, 3))
    batch = torch.cat([torch.cat([torch.full((1, 3), cfg.pad_token_id), b], 1), a])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=cfg.pad_token_id)
    out = model.generate(batch, attention_mask=mask, **kw)
    single_a = model.generate(a, attention_mask=torch.ones_like(a), **kw)
    single_b = model.generate(b, attention_mask=torch.ones_like(b), **kw)
    assert torch.equal(out[1], single_a[0])
    assert torch.equal(out[0, 3:], single_b[0])


def test_residual_output_projections_are_explicit_modules():
    """attention o_proj and the dense FFN's down_proj get std / sqrt(2L); the shared experts'
    down_proj keeps std (as before the marker attribute was replaced by a module type)."""
    from rmoe.modeling.experts import OutputProjection

    cfg = tiny_config(num_hidden_layers=2, mlp_only_layers=[1], num_shared_experts=1)
    model = RMoEForCausalLM(cfg)
    outs = {n for n, m in model.named_modules() if isinstance(m, OutputProjection)}
    assert outs == {
        "model.layers.0.attn.o_proj",
        "model.layers.1.attn.o_proj",
        "model.layers.1.mlp.down_proj",
    }
    assert not any(hasattr(m, "_rmoe_residual_out") for m in model.modules())
    model.init_weights_seeded(0)
    big = torch.nn.Linear(4096, 64)  # many samples: the std is measured to ~1 %
    for std, module in ((0.02 / 2, OutputProjection(4096, 64)), (0.02, big)):
        model._init_module(module, torch.nn.init, torch.Generator().manual_seed(0))
        assert abs(module.weight.std().item() / std - 1) < 0.03


def test_decoder_layer_arguments_after_the_first_are_keyword_only():
    cfg = tiny_config()
    model = RMoEForCausalLM(cfg)
    layer = model.model.layers[0]
    h = torch.randn(1, 3, cfg.hidden_size)
    with pytest.raises(TypeError):
        layer(h, None, None, None, None, None, None, None, False)
