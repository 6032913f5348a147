"""`rmoe export`: linear-router rmoe models as Mixtral / Qwen2-MoE checkpoints that the target's
own classes load with equal logits and greedy tokens; what cannot be represented is refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.cli import export as cli_export
from rmoe.cli.main import main
from rmoe.data import build_tokenizer
from rmoe.integrations.export import (
    check_exportable,
    export_model,
    export_run,
    hf_config,
    hf_config_kwargs,
)
from rmoe.integrations.families import (
    FAMILIES,
    expand,
    plan_from_hf,
    plan_from_rmoe,
    rmoe_setting,
)
from rmoe.runtime import DTYPES

VOCAB = 64


def _config(**overrides) -> RMoEConfig:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=24,
        intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
        router_type="linear",
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    kw.update(overrides)
    return RMoEConfig(**kw)


def _model(**overrides) -> RMoEForCausalLM:
    """A tiny model with large random weights (std 0.2, norms around 1): decisive routing and
    logits, so any mis-mapped tensor shows in the comparison."""
    torch.manual_seed(0)
    model = RMoEForCausalLM(_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def _load_hf(out, model_class: str):
    hf, info = getattr(transformers, model_class).from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    return hf.eval()


def _assert_same_function(model, hf) -> None:
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **greedy), hf.generate(ids[:1], **greedy))


ROUND_TRIPS = {
    "mixtral": ("mixtral", {}),
    "mixtral-gqa-head_dim-tied": ("mixtral", dict(head_dim=12, tie_word_embeddings=True)),
    "mixtral-shared-router": ("mixtral", dict(router_type="shared")),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe-shared-dense": ("qwen2_moe", dict(num_shared_experts=2, mlp_only_layers=[1])),
    "qwen2_moe-random-router-no-norm-topk-dense": (
        "qwen2_moe",
        dict(
            norm_topk_prob=False,
            mlp_only_layers=[0, 2],
            shared_expert_intermediate_size=8,
            num_shared_experts=1,
            router_type="random",
        ),
    ),
}


ROUND_TRIPS_WITH_OPTIONS = {
    "qwen3_moe-qk-norm-biases-dense": (
        "qwen3_moe",
        dict(qk_norm="head", attention_bias=True, attention_out_bias=True, mlp_only_layers=[1]),
    ),
    "olmoe-proj-norm-no-norm-topk": ("olmoe", dict(qk_norm="proj", norm_topk_prob=False)),
    "olmoe-biases": ("olmoe", dict(qk_norm="proj", attention_bias=True, attention_out_bias=True)),
    "qwen2_moe-biases-shared-gate": (
        "qwen2_moe",
        dict(attention_bias=True, num_shared_experts=1, shared_expert_gate=True),
    ),
    "mixtral-yarn": (
        "mixtral",
        dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
    ),
    "qwen2_moe-linear-rope": ("qwen2_moe", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
}  # fmt: skip


@pytest.mark.parametrize("case", [*ROUND_TRIPS, *ROUND_TRIPS_WITH_OPTIONS])
def test_round_trip_equal_logits_and_greedy_tokens(case, tmp_path):
    family, overrides = {**ROUND_TRIPS, **ROUND_TRIPS_WITH_OPTIONS}[case]
    model = _model(**overrides)
    res = export_model(model, family, tmp_path / "out")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(res.files)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family
    _assert_same_function(model, _load_hf(tmp_path / "out", res.model_class))


def test_qwen2_shared_expert_compensation_is_exact(tmp_path):
    """A zero gate gives sigmoid(0) = 0.5 exactly, and 0.5 * (x (2W)^T) == x W^T bit for bit."""
    assert torch.sigmoid(torch.zeros(3)).eq(0.5).all()
    h, w = torch.randn(50, 16), torch.randn(32, 16)
    assert torch.equal(torch.sigmoid(torch.zeros(50, 1)) * F.linear(h, 2 * w), F.linear(h, w))
    model = _model(num_shared_experts=2)
    export_model(model, "qwen2_moe", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        gate = f.get_tensor("model.layers.0.mlp.shared_expert_gate.weight")
        down = f.get_tensor("model.layers.0.mlp.shared_expert.down_proj.weight")
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    assert gate.shape == (1, 32) and not gate.any() and not bias.any()
    assert torch.equal(down, 2 * model.model.layers[0].moe.shared_experts.down_proj.weight)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tables_name_exactly_what_transformers_saves(family, tmp_path):
    """Expanding a family's table on the target's own config gives exactly the keys its
    save_pretrained writes (both directions share these rows: the import will read them)."""
    fam = FAMILIES[family]
    extra = {} if family == "mixtral" else {"mlp_only_layers": [1]}
    kw = hf_config_kwargs(_config(head_dim=8, **extra), fam)
    cfg = getattr(transformers, fam.config_class)(**kw)
    getattr(transformers, fam.model_class)(cfg).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert {k for e in expand(fam, plan_from_hf(fam, cfg)) for k in e.hf} == saved


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_config_fields_map_both_ways(family):
    fam = FAMILIES[family]
    extra = {} if family == "mixtral" else dict(mlp_only_layers=[1], num_shared_experts=1)
    ours = _config(rope_theta=5000.0, rms_norm_eps=1e-5, **extra)
    cfg = hf_config(ours, fam)
    back = {rm: getattr(cfg, hf) for hf, rm in fam.fields.items()}
    for hf, derived in fam.derived.items():
        if hf != "qkv_bias":  # always written (zeros without rmoe biases; import drops zeros)
            back.update(derived.to_rmoe(getattr(cfg, hf)))
    assert back == {k: rmoe_setting(ours, k) for k in back}
    assert all(getattr(cfg, k) == v for k, v in fam.constants.items())
    assert plan_from_hf(fam, cfg).moe_layers == plan_from_rmoe(ours).moe_layers


REFUSED = {
    "recurrent": ("mixtral", dict(router_type="recurrent"), "cross-layer recurrent router"),
    "mlp-router": ("qwen2_moe", dict(router_type="mlp"), "router_type='mlp'"),
    "router-bias": ("mixtral", dict(router_bias=True), "router_bias=True"),
    "sigmoid": ("qwen2_moe", dict(router_score_func="sigmoid"), "router_score_func='sigmoid'"),
    "expert-bias": ("mixtral", dict(router_expert_bias=True), "router_expert_bias=True"),
    "router-scale": ("qwen2_moe", dict(router_scale=2.5), "router_scale=2.5"),
    "logit-residual": ("mixtral", dict(router_logit_residual=1.0), "router_logit_residual"),
    "eval-capacity": ("qwen2_moe", dict(eval_capacity_factor=1.0), "eval_capacity_factor=1.0"),
    "mixtral-dense": ("mixtral", dict(mlp_only_layers=[1]), "mlp_only_layers=\\[1\\]"),
    "mixtral-no-norm": ("mixtral", dict(norm_topk_prob=False), "norm_topk_prob=False"),
    "mixtral-shared": ("mixtral", dict(num_shared_experts=1), "num_shared_experts=1"),
    "qwen2-head_dim": ("qwen2_moe", dict(head_dim=12), "head_dim=12: .* = 32 // 4"),
    "qwen3-qk-norm": ("qwen3_moe", {}, "qk_norm.*no per-head q/k norm.*--to qwen2_moe"),
    "qwen3-shared": ("qwen3_moe", dict(num_shared_experts=1, qk_norm="head"), "num_shared_exp"),
}


REFUSED_WITH_OPTIONS = {
    "mixtral-qk-norm": ("mixtral", dict(qk_norm="head"), "qk_norm='head'.*--to qwen3_moe"),
    "mixtral-attention-bias": ("mixtral", dict(attention_bias=True), "attention_bias=True"),
    "qwen2-out-bias": ("qwen2_moe", dict(attention_out_bias=True), "attention_out_bias=True"),
    "qwen3-qk-norm-proj": ("qwen3_moe", dict(qk_norm="proj"), "qk_norm='proj'.*qk_norm head"),
    "olmoe-qk-norm-head": ("olmoe", dict(qk_norm="head"), "qk_norm='head'.*qk_norm proj"),
    "qwen3-q-k-v-bias-only": (
        "qwen3_moe",
        dict(qk_norm="head", attention_bias=True),
        "attention_out_bias=False: .*all four",
    ),
    "olmoe-head_dim": ("olmoe", dict(qk_norm="proj", head_dim=12), "head_dim=12"),
}


@pytest.mark.parametrize("case", [*REFUSED, *REFUSED_WITH_OPTIONS])
def test_unrepresentable_options_are_refused_with_the_field_named(case):
    family, overrides, match = {**REFUSED, **REFUSED_WITH_OPTIONS}[case]
    with pytest.raises(ValueError, match=f"cannot export to {family}: .*{match}"):
        check_exportable(_config(**overrides), family)


def test_refused_export_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="needs router_type linear"):
        export_model(_model(router_type="recurrent"), "mixtral", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_training_only_settings_become_notes():
    notes = check_exportable(_config(router_jitter=0.1, capacity_factor=1.25), "mixtral")
    assert any("router_jitter" in n for n in notes) and any("capacity" in n for n in notes)


def _saved_run(path, **overrides):
    """A run directory as training leaves it: model files, tokenizer, config.yaml."""
    model = _model(
        vocab_size=258, pad_token_id=257, bos_token_id=256, eos_token_id=256, **overrides
    )
    model.save_pretrained(path)
    build_tokenizer("bytes").save(path)
    (path / "config.yaml").write_text("model: {}\n")
    return model


def test_export_run_writes_a_tokenizer_autotokenizer_loads(tmp_path):
    _saved_run(tmp_path / "run")
    res = export_run(tmp_path / "run", "qwen2_moe", tmp_path / "out")
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(res.files)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "héllo <|endoftext|> wörld"
    assert tok(text)["input_ids"] == build_tokenizer("bytes").encode(text)
    assert tok.eos_token_id == 256


def test_cli_end_to_end(tmp_path, capsys):
    model = _saved_run(tmp_path / "run")
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), "--to", "mixtral", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MixtralForCausalLM.from_pretrained" in printed
    _assert_same_function(model, _load_hf(out, "MixtralForCausalLM"))

    argv = ["export", str(tmp_path / "run"), "--to", "qwen2_moe", "--out", str(out)]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*argv, "--force", "--dtype", "bfloat16"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "qwen2_moe" and saved["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cli_refuses_a_recurrent_run_in_one_line(tmp_path, capsys):
    _saved_run(tmp_path / "run", router_type="recurrent")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "run"), "--to", "qwen2_moe", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rmoe export: error:") and "recurrent router" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_cli_choices_match_the_library():
    assert set(cli_export.TARGETS) == set(FAMILIES)
    assert set(cli_export.DTYPE_NAMES) == set(DTYPES)
