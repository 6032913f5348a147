"""`rmoe import`: Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE checkpoints saved by their own
transformers classes become rmoe models with the same logits and greedy tokens; what rmoe
cannot represent is refused in one line; retrofitting keeps the logits at the start."""

from __future__ import annotations

import dataclasses
import json
import re
import string

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file
from tests.integrations.test_export import _model as rmoe_model

from rmoe.cli import import_hf as cli_import
from rmoe.cli.main import main
from rmoe.data import build_tokenizer
from rmoe.integrations.export import export_model
from rmoe.integrations.families import BASE_INERT, DENSE_FAMILIES, FAMILIES
from rmoe.integrations.importing import ROUTERS, import_checkpoint
from rmoe.loading import load_model
from rmoe.runtime import DTYPES

VOCAB = 64


# ----------------------------------------------------------------------------------------------
# Tiny checkpoints saved by the families' own classes
# ----------------------------------------------------------------------------------------------
def save_tokenizer(path, vocab_size: int = VOCAB) -> None:
    """A character-level tokenizer with exactly `vocab_size` tokens: <unk> 0, <s> 1, </s> 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = list(string.ascii_lowercase + string.digits + " .,!?-'\n")
    names = ["<unk>", "<s>", "</s>", *chars]
    names += [f"<extra_{i}>" for i in range(vocab_size - len(names))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(path)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large random weights (std 0.2, norms around 1): decisive routing and logits, so any
    mis-mapped tensor shows in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = {
    "mixtral": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=40,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=20,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2
    ),
}


def hf_checkpoint(path, family: str, families=FAMILIES, **overrides):
    """A `family` model with random weights saved by its own class (and a tokenizer)."""
    fam = families[family]
    shard = overrides.pop("_shard", "5GB")
    kw = {**BASE, **MOE.get(family, {"intermediate_size": 40}), **overrides}
    cfg = getattr(transformers, fam.config_class)(**kw)
    torch.manual_seed(0)
    model = randomize(getattr(transformers, fam.model_class)(cfg))
    model.save_pretrained(path, max_shard_size=shard)
    save_tokenizer(path)
    return model


def assert_same_function(ours, theirs, tol: float = 1e-4) -> None:
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= tol, diff
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:1], **greedy), theirs.generate(ids[:1], **greedy))


def load(path):
    return load_model(path, device="cpu").model


CASES = {
    "mixtral": ("mixtral", {}),
    "mixtral-tied-head_dim": ("mixtral", dict(tie_word_embeddings=True, head_dim=12)),
    "mixtral-rope-theta": ("mixtral", dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "olmoe": ("olmoe", {}),
    "olmoe-bias-norm-topk": ("olmoe", dict(attention_bias=True, norm_topk_prob=True)),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe-dense": ("qwen2_moe", dict(mlp_only_layers=[0], norm_topk_prob=True)),
    "qwen2_moe-sparse-step": ("qwen2_moe", dict(decoder_sparse_step=2)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=12)),
    "qwen3_moe-dense-bias": ("qwen3_moe", dict(mlp_only_layers=[1], attention_bias=True)),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_import_gives_the_same_logits_and_greedy_tokens(case, tmp_path):
    family, overrides = CASES[case]
    hf = hf_checkpoint(tmp_path / "hf", family, **overrides)
    res = import_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert {"config.json", "model.safetensors", "tokenizer.json", "train.yaml"} <= set(res.files)
    assert res.source == family and res.router == "linear"
    if "decoder_sparse_step" in overrides:  # layers 0 and 2 are off the step: dense layers
        assert res.config.mlp_only_layers == [0, 2] and any("sparse_step" in n for n in res.notes)
    assert_same_function(load(tmp_path / "out"), hf)


def test_sharded_checkpoint_and_dtype(tmp_path):
    hf = hf_checkpoint(tmp_path / "hf", "mixtral", _shard="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_checkpoint(tmp_path / "hf", tmp_path / "out")
    assert_same_function(load(tmp_path / "out"), hf)
    import_checkpoint(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16")
    assert load(tmp_path / "bf16").model.embed_tokens.weight.dtype == torch.bfloat16


def test_tokenizer_and_special_tokens(tmp_path):
    hf_checkpoint(tmp_path / "hf", "mixtral", pad_token_id=3)
    res = import_checkpoint(tmp_path / "hf", tmp_path / "out")
    tok = build_tokenizer(str(tmp_path / "out"))
    assert tok.eos_id == 2 and tok.pad_id == 3  # pad taken from config.json
    assert any("pad_token" in n for n in res.notes)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.encode("hello, world") == ref("hello, world")["input_ids"]
    loaded = load_model(tmp_path / "out", device="cpu")
    assert loaded.model.config.eos_token_id == 2 and not loaded.tokenizer_fallback
    save_tokenizer(tmp_path / "hf", vocab_size=50)  # smaller than the embedding (as Qwen's)
    res = import_checkpoint(tmp_path / "hf", tmp_path / "out", force=True)
    assert any("50 tokens" in n and "padded embedding" in n for n in res.notes)


TRIPS = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", dict(num_shared_experts=1)),
    "qwen3_moe": ("qwen3_moe", dict(qk_norm="head", attention_bias=True, attention_out_bias=True)),
    "olmoe": ("olmoe", dict(qk_norm="proj")),
}


@pytest.mark.parametrize("case", list(TRIPS))
def test_import_export_round_trip_keeps_the_weights(case, tmp_path):
    """rmoe -> family -> rmoe gives back the same tensors, bit for bit (Qwen2-MoE's ungated
    shared expert travels as a doubled down projection behind a zero gate, and back)."""
    family, options = TRIPS[case]
    ours = rmoe_model(**options)
    export_model(ours, family, tmp_path / family)
    save_tokenizer(tmp_path / family)
    import_checkpoint(tmp_path / family, tmp_path / "back")
    back = load(tmp_path / "back")
    a, b = ours.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_function(back, ours, tol=1e-5)


# ----------------------------------------------------------------------------------------------
# What rmoe cannot represent: refused in one line, exit status 2, nothing written
# ----------------------------------------------------------------------------------------------
def _edit_config(path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _add_tensor(path, key: str) -> None:
    state = load_file(str(path / "model.safetensors"))
    state[key] = torch.ones(3)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


REFUSED = {
    "gelu": (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    "sliding-window": (dict(sliding_window=16), "sliding-window attention .*16 < max_pos"),
    "quantized": (dict(quantization_config={"quant_method": "gptq"}), "quantized"),
    "rope-partial": (
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
        "partial_rotary_factor",
    ),
    "rope-type": (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "rope"),
    "dense-model-type": (dict(model_type="llama"), "model_type 'llama'.*rmoe upcycle"),
    "unknown-model-type": (dict(model_type="dbrx"), "model_type 'dbrx'.*mixtral"),
    "extra-tensor": ("model.layers.0.self_attn.rel_bias", "no place for .*rel_bias"),
    "pickle": ("pickle", "pickle"),
    "corrupt-safetensors": ("corrupt", "cannot read .*model.safetensors as safetensors"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_unrepresentable_checkpoints_are_refused_in_one_line(case, tmp_path, capsys):
    change, match = REFUSED[case]
    hf = hf_checkpoint(tmp_path / "hf", "mixtral")
    if isinstance(change, dict):
        _edit_config(tmp_path / "hf", **change)
    elif change == "pickle":
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    elif change == "corrupt":
        (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x00" * 64)
    else:
        _add_tensor(tmp_path / "hf", change)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rmoe import: error:") and len(err.splitlines()) == 1, err
    assert re.search(match, err), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_olmoe_clip_qkv_is_refused(tmp_path):
    hf_checkpoint(tmp_path / "hf", "olmoe", clip_qkv=4.0)
    with pytest.raises(ValueError, match="clip_qkv=4.0"):
        import_checkpoint(tmp_path / "hf", tmp_path / "out")


def test_cli_end_to_end_and_refusals(tmp_path, capsys):
    hf = hf_checkpoint(tmp_path / "hf", "mixtral")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "imported mixtral -> rmoe (linear router" in printed and "train.yaml" in printed
    assert_same_function(load(out), hf)
    assert main(["import", str(tmp_path / "hf"), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "hf"), "--out", str(out), "--force"]) == 0
    assert main(["import", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    argv = ["import", str(tmp_path / "hf"), "--out", str(tmp_path / "o3"), "--router-dim", "8"]
    assert main(argv) == 2  # a router setting without --router recurrent
    assert "would change the imported linear model" in capsys.readouterr().err
    assert main(["import", str(out), "--out", str(tmp_path / "o4")]) == 2  # already rmoe
    assert "--router recurrent" in capsys.readouterr().err


def test_every_transformers_config_field_is_judged():
    """Each field of each family's config class is mapped, fixed, derived, accepted or inert,
    so a field transformers adds later cannot slip through an import unjudged."""
    for fam in (*FAMILIES.values(), *DENSE_FAMILIES.values()):
        cls = getattr(transformers, fam.config_class)
        known = {*fam.fields, *fam.constants, *fam.derived, *fam.accepts, *BASE_INERT}
        assert {f.name for f in dataclasses.fields(cls)} <= known, fam.name


def test_cli_lists_match_the_library(capsys):
    assert set(cli_import.ROUTERS) == set(ROUTERS)
    assert set(cli_import.DTYPE_NAMES) == set(DTYPES)
    for command in ("import", "upcycle"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "examples:" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The output folder trains: rmoe train --init-from, rmoe finetune
# ----------------------------------------------------------------------------------------------
def test_train_init_from_an_imported_model(tmp_path, corpus_file, capsys):
    hf_checkpoint(tmp_path / "hf", "mixtral")
    out = tmp_path / "out"
    import_checkpoint(tmp_path / "hf", out)
    model = yaml.safe_load((out / "train.yaml").read_text())["model"]
    assert model["num_experts"] == 4 and model["router_type"] == "linear"
    argv = ["train", str(out / "train.yaml"), "--init-from", str(out), "--out", str(tmp_path / "run"),
            "--no-progress", "--no-gap-report", "--set", f"data.corpus=text:{corpus_file}",
            "--set", "data.seq_len=16", "--set", "data.batch_size=2",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.max_steps=2",
            "--set", "train.eval_batches=1", "--set", "train.threads=1"]  # fmt: skip
    assert main(argv) == 0
    assert "at step 2" in capsys.readouterr().out
    trained = load(tmp_path / "run")
    start = load(out)
    assert trained.config.num_experts == 4
    w = "model.layers.0.moe.experts.gate_proj"
    assert not torch.equal(trained.state_dict()[w], start.state_dict()[w])


def test_finetune_an_imported_model(tmp_path, capsys):
    hf_checkpoint(tmp_path / "hf", "mixtral")
    import_checkpoint(tmp_path / "hf", tmp_path / "out")
    rows = [{"prompt": f"q{i} ", "answer": "yes" if i % 2 else "no"} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["finetune", str(tmp_path / "out"), "--data", str(tmp_path / "qa.jsonl"),
            "--out", str(tmp_path / "ft"), "--steps", "1", "--batch-size", "4",
            "--no-eval-before", "--device", "cpu", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    assert load(tmp_path / "ft").config.num_experts == 4


# ----------------------------------------------------------------------------------------------
# Retrofitting a recurrent router
# ----------------------------------------------------------------------------------------------
def test_retrofit_on_import_keeps_the_logits_then_trains_apart(tmp_path):
    hf = hf_checkpoint(tmp_path / "hf", "mixtral")
    res = import_checkpoint(tmp_path / "hf", tmp_path / "out", router="recurrent", router_dim=8)
    assert res.router == "recurrent"
    model = load(tmp_path / "out")
    assert_same_function(model, hf)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    model.train()
    router = [p for n, p in model.named_parameters() if "router" in n]
    opt = torch.optim.SGD(router, lr=0.5)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() > 1e-3


def test_retrofit_an_rmoe_run(tmp_path, capsys):
    ours = rmoe_model(vocab_size=258, pad_token_id=257, bos_token_id=256, eos_token_id=256)
    ours.save_pretrained(tmp_path / "run")
    build_tokenizer("bytes").save(tmp_path / "run")
    argv = ["import", str(tmp_path / "run"), "--router", "recurrent", "--router-dim", "8",
            "--out", str(tmp_path / "rec")]  # fmt: skip
    assert main(argv) == 0
    rec = load(tmp_path / "rec")
    assert rec.config.router_type == "recurrent"
    assert_same_function(rec, ours, tol=1e-5)
