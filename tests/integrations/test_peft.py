"""LoRA with PEFT on rmoe: experts through target_parameters, attention / shared / dense linears
through target_modules, routers untouched unless asked; training, merging, PEFT's pitfalls."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from rmoe import RMoEConfig, RMoEForCausalLM  # noqa: E402
from rmoe.integrations.peft import lora_config, lora_targets  # noqa: E402
from rmoe.modeling.accounting import is_router_parameter  # noqa: E402

VOCAB = 64
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")


def _model(**overrides) -> RMoEForCausalLM:
    torch.manual_seed(0)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=16,
        intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        router_dim=8,
        num_shared_experts=1,
        mlp_only_layers=[1],
        max_position_embeddings=64,
        experts_backend="sorted",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    kw.update(overrides)
    return RMoEForCausalLM(RMoEConfig(**kw))


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def _train(peft_model, steps: int = 8) -> list[float]:
    ids = _batch()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_targets_name_each_part_once():
    targets = lora_targets(_model())
    assert targets["target_parameters"] == [
        "moe.experts.down_proj",
        "moe.experts.gate_proj",
        "moe.experts.up_proj",
    ]
    assert targets["target_modules"] == sorted(
        [f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + [f"{m}.{p}" for m in ("mlp", "moe.shared_experts") for p in ("gate_proj", "up_proj", "down_proj")]
    )  # fmt: skip
    with_router = lora_targets(_model(), router=True, attention=False, dense_mlp=False)
    assert "moe.router.scorer.weight" in with_router["target_modules"]
    assert not any("attn" in t or t.startswith("mlp.") for t in with_router["target_modules"])
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora_targets(_model(num_shared_experts=0), attention=False, experts=False, dense_mlp=False)


@pytest.mark.parametrize("router_type", ["recurrent", "linear"])
def test_lora_trains_experts_and_attention_and_leaves_the_router_alone(router_type):
    model = _model(router_type=router_type)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft.get_peft_model(model, lora_config(model, r=4, alpha=8))
    lora = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert any(".experts." in n for n in lora) and any(".attn." in n for n in lora)
    assert not any(is_router_parameter(n.replace(".base_layer", "")) for n in lora)

    losses = _train(peft_model)
    assert losses[-1] < losses[0] - 0.05
    after = dict(peft_model.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in lora.items() if "lora_B" in n)

    peft_model.eval()
    ids = _batch()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, RMoEForCausalLM)
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapted).abs().max().item() < 1e-5
    merged_params = dict(merged.named_parameters())
    for name, value in before.items():
        if is_router_parameter(name):
            assert torch.equal(merged_params[name], value), name
    changed = ("moe.experts.gate_proj", "attn.q_proj.weight", "moe.shared_experts.up_proj.weight")
    for name in ("model.layers.0." + c for c in changed):
        assert not torch.equal(merged_params[name], before[name]), name


def test_router_true_adapts_the_router_linears():
    model = _model(router_type="linear")
    config = lora_config(model, r=2, alpha=4, router=True, attention=False, experts=False)
    peft_model = peft.get_peft_model(model, config)
    router_lora = [n for n, _ in peft_model.named_parameters() if "lora_B" in n and ".router." in n]
    assert len(router_lora) == 2  # the two MoE layers' scorers
    _train(peft_model, steps=3)
    assert all(peft_model.get_parameter(n).abs().sum() > 0 for n in router_lora)


def test_peft_pitfalls_the_docstring_names():
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(_model(), peft.LoraConfig(target_modules=["experts"]))
    all_linear = peft.get_peft_model(_model(), peft.LoraConfig(target_modules="all-linear"))
    assert any(".router." in n and "lora_A" in n for n, _ in all_linear.named_parameters())
