"""The one loader: where the model is, which tokenizer goes with it, the missing-tokenizer rule."""

from __future__ import annotations

import pytest
import torch

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.data import build_tokenizer
from rmoe.loading import Loaded, find_model_dir, load_model, load_weights


def _save(path, with_tokenizer=True, vocab=258):
    torch.manual_seed(0)
    model = RMoEForCausalLM(
        RMoEConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                   router_dim=8, max_position_embeddings=32)
    )  # fmt: skip
    model.save_pretrained(path)
    if with_tokenizer:
        build_tokenizer("bytes").save(path)
    return model


def test_load_model_returns_eval_model_tokenizer_and_run_config(tmp_path):
    ref = _save(tmp_path / "m")
    (tmp_path / "m" / "config.yaml").write_text("data: {seq_len: 32}\n")
    loaded = load_model(tmp_path / "m", device="cpu")
    assert isinstance(loaded, Loaded) and not loaded.model.training
    assert loaded.run_config == {"data": {"seq_len": 32}}
    assert loaded.tokenizer.vocab_size == 258 and not loaded.tokenizer_fallback
    model, tok, cfg = loaded  # unpacks like the old three-tuple
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n


def test_missing_tokenizer_is_an_error_that_names_the_fix(tmp_path):
    _save(tmp_path / "m", with_tokenizer=False)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*--tokenizer bytes"):
        load_model(tmp_path / "m", device="cpu")
    explicit = load_model(tmp_path / "m", device="cpu", tokenizer="bytes")
    assert explicit.tokenizer.vocab_size == 258 and not explicit.tokenizer_fallback
    fallback = load_model(tmp_path / "m", device="cpu", missing_tokenizer="bytes")
    assert fallback.tokenizer_fallback and "byte tokenizer" in fallback.notes[0]
    with pytest.raises(ValueError, match="missing_tokenizer"):
        load_model(tmp_path / "m", missing_tokenizer="guess")


def test_tokenizer_found_in_run_directory_above_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    _save(run / "checkpoints" / "step-0000004", with_tokenizer=False)
    _save(run / "checkpoints" / "step-0000010", with_tokenizer=False)
    build_tokenizer("bytes").save(run)
    assert find_model_dir(run).name == "step-0000010"
    loaded = load_model(run, device="cpu")
    assert loaded.model_dir.name == "step-0000010"
    assert loaded.tokenizer_dir == run.resolve()


def test_tokenizer_larger_than_vocabulary_is_rejected(tmp_path):
    _save(tmp_path / "m", with_tokenizer=False, vocab=100)
    with pytest.raises(ValueError, match="vocabulary of 100"):
        load_model(tmp_path / "m", device="cpu", tokenizer="bytes")


def test_unreadable_model_and_missing_path(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the model config"):
        load_model(tmp_path / "bad", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_load_weights_into_a_built_model_checks_names(tmp_path):
    ref = _save(tmp_path / "m")
    torch.manual_seed(1)
    other = RMoEForCausalLM(ref.config)
    load_weights(other, tmp_path / "m")
    assert torch.equal(other.lm_head.weight, ref.lm_head.weight)
    wider = RMoEForCausalLM(RMoEConfig(**{**ref.config.to_dict(), "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="missing"):
        load_weights(wider, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_weights(other, tmp_path)
