"""`rmoe upcycle`: dense Llama / Mistral / Qwen2 / Qwen3 checkpoints saved by their own classes
become rmoe MoE models; copies give the dense model's logits at the start with any router,
a neuron split gives what the docstring states."""

from __future__ import annotations

import pytest
import torch
from tests.integrations.test_import import (
    VOCAB,
    assert_same_function,
    hf_checkpoint,
    load,
)

from rmoe.cli.main import main
from rmoe.integrations.families import DENSE_FAMILIES
from rmoe.integrations.upcycle import upcycle_checkpoint


def dense(path, family: str, **overrides):
    return hf_checkpoint(path, family, DENSE_FAMILIES, intermediate_size=48, **overrides)


CASES = {
    "llama": ("llama", {}, {}),
    "llama-tied-bias-recurrent": (
        "llama",
        dict(tie_word_embeddings=True, attention_bias=True),
        dict(router="recurrent", router_dim=8),
    ),
    "mistral": ("mistral", dict(head_dim=12), dict(shared_experts=2)),
    "mistral-cosine-router": ("mistral", {}, dict(router="cosine")),
    "qwen2": ("qwen2", {}, {}),
    "qwen3": ("qwen3", dict(head_dim=12), dict(router="recurrent", router_dim=8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_copies_give_the_dense_models_logits_at_the_start(case, tmp_path):
    family, overrides, options = CASES[case]
    hf = dense(tmp_path / "hf", family, **overrides)
    res = upcycle_checkpoint(tmp_path / "hf", tmp_path / "out", experts=4, top_k=2, **options)
    assert res.source == family and res.config.num_experts == 4
    model = load(tmp_path / "out")
    assert model.config.router_type == options.get("router", "linear")
    assert_same_function(model, hf)
    experts = model.model.layers[1].moe.experts.gate_proj
    assert torch.equal(experts[0], experts[3])


def test_noise_makes_the_experts_differ(tmp_path):
    hf = dense(tmp_path / "hf", "llama")
    upcycle_checkpoint(tmp_path / "hf", tmp_path / "out", experts=4, top_k=2, noise=0.01)
    model = load(tmp_path / "out")
    experts = model.model.layers[0].moe.experts.up_proj
    dense_w = hf.model.layers[0].mlp.up_proj.weight
    rel = (experts - dense_w).std() / dense_w.std()
    assert 0.005 < rel < 0.02 and not torch.equal(experts[0], experts[1])
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - hf(ids).logits).abs().max()
    assert 1e-4 < diff < 0.5  # close, not equal


def test_split_partitions_the_neurons(tmp_path):
    """E + N groups of F / (E + N) neurons: with K = E and uniform router weights the MoE
    block is the dense MLP exactly; with the router's own init and K < E it is not."""
    hf = dense(tmp_path / "hf", "llama")
    res = upcycle_checkpoint(
        tmp_path / "hf", tmp_path / "all", experts=4, top_k=4, method="split", shared_experts=2
    )
    assert res.config.moe_intermediate_size == 48 // 6 and any("differs" in n for n in res.notes)
    model = load(tmp_path / "all")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.moe.router.scorer.weight.weight.zero_()
    assert_same_function(model, hf)
    upcycle_checkpoint(tmp_path / "hf", tmp_path / "top2", experts=4, top_k=2, method="split")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (load(tmp_path / "top2")(ids).logits - hf(ids).logits).abs().max() > 1e-2


def test_refusals_in_one_line(tmp_path, capsys):
    dense(tmp_path / "hf", "llama")
    dense(tmp_path / "mlp-bias", "llama", mlp_bias=True)
    out = str(tmp_path / "out")
    cases = [
        (["--experts", "5", "--top-k", "2", "--method", "split"], "not divisible by 5"),
        (["--experts", "2", "--top-k", "3"], "1 <= top-k <= experts"),
        (["--experts", "4", "--top-k", "2", "--set", "num_experts=8"], "set by the upcycling"),
        (["--experts", "4", "--top-k", "2", "--set", "router_dimm=8"], "not rmoe model settings"),
        (["--experts", "4", "--top-k", "2", "--router", "nope"], "router_type"),
    ]
    capsys.readouterr()
    for flags, match in cases:
        assert main(["upcycle", str(tmp_path / "hf"), "--out", out, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rmoe upcycle: error:") and match in err and "\n" not in err, err
    argv = ["upcycle", str(tmp_path / "mlp-bias"), "--out", out, "--experts", "4", "--top-k", "2"]
    assert main(argv) == 2
    assert "mlp_bias=True" in capsys.readouterr().err
    hf_checkpoint(tmp_path / "moe", "mixtral")
    capsys.readouterr()
    argv[1] = str(tmp_path / "moe")
    assert main(argv) == 2
    assert "MoE model already: read it with rmoe import" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_end_to_end_then_train(tmp_path, corpus_file, capsys):
    hf = dense(tmp_path / "hf", "mistral")
    out = tmp_path / "moe"
    argv = ["upcycle", str(tmp_path / "hf"), "--experts", "4", "--top-k", "2", "--out", str(out),
            "--router", "recurrent", "--router-dim", "8", "--set", "router_aux_loss_coef=0.02"]  # fmt: skip
    assert main(argv) == 0
    assert "upcycled mistral -> rmoe (recurrent router" in capsys.readouterr().out
    model = load(out)
    assert model.config.router_dim == 8 and model.config.router_aux_loss_coef == 0.02
    assert_same_function(model, hf)
    train = ["train", str(out / "train.yaml"), "--init-from", str(out), "--out", str(tmp_path / "run"),
             "--no-progress", "--no-gap-report", "--set", f"data.corpus=text:{corpus_file}",
             "--set", "data.seq_len=16", "--set", "data.batch_size=2",
             "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.max_steps=2",
             "--set", "train.eval_batches=1", "--set", "train.threads=1"]  # fmt: skip
    assert main(train) == 0
    assert load(tmp_path / "run").config.router_type == "recurrent"


def test_init_from_a_model_with_a_padded_vocabulary_trains(tmp_path, corpus_file):
    # Qwen / OLMoE checkpoints pad the embedding beyond the tokenizer: the run keeps the
    # model's vocabulary (80) rather than the tokenizer's (64)
    dense(tmp_path / "hf", "qwen2", vocab_size=80)
    out = tmp_path / "moe"
    upcycle_checkpoint(tmp_path / "hf", out, experts=4, top_k=2)
    train = ["train", str(out / "train.yaml"), "--init-from", str(out), "--out", str(tmp_path / "run"),
             "--no-progress", "--no-gap-report", "--set", f"data.corpus=text:{corpus_file}",
             "--set", "data.seq_len=16", "--set", "data.batch_size=2",
             "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.max_steps=2",
             "--set", "train.eval_batches=1", "--set", "train.threads=1"]  # fmt: skip
    assert main(train) == 0
    assert load(tmp_path / "run").config.vocab_size == 80
