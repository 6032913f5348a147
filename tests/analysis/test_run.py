"""`analyze` end to end on tiny saved models, model-directory resolution, and `rmoe analyze`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.analysis.run import analyze, find_tokenizer, resolve_model_dir
from rmoe.cli.main import main
from rmoe.data import build_tokenizer

_WORDS = (
    "router expert token layer state balance entropy gate neuron matrix python def return "
    "class import for while if else yield lambda self value index"
).split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A single text file: its [90%, 95%) slice (about 6 KB) is the valid split."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(_WORDS), (24000,), generator=gen).tolist()
    lines = [" ".join(_WORDS[i] for i in idx[s : s + 12]) for s in range(0, len(idx), 12)]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(lines))
    return f"text:{path}"


def _save_rmoe(path: Path, router_type: str, tokenizer: bool = True) -> Path:
    torch.manual_seed(0)
    cfg = RMoEConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        moe_intermediate_size=32,
        intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        router_dim=8,
        router_type=router_type,
        num_shared_experts=1 if router_type == "linear" else 0,
    )
    RMoEForCausalLM(cfg).save_pretrained(path)
    if tokenizer:
        build_tokenizer("bytes").save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return _save_rmoe(root / "smoe", "linear"), _save_rmoe(root / "rmoe", "recurrent")


def _kwargs(corpus: str, out: Path, tmp: Path) -> dict:
    return dict(
        data=corpus,
        tokens=512,
        out_dir=out,
        seq_len=64,
        batch_size=4,
        output_tokens=96,
        grad_batch_size=2,
        cache_dir=tmp / "cache",
    )


def _check_report(out: Path) -> list[str]:
    html = (out / "report.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs, "the report shows no figure"
    for src in srcs:
        assert (out / src).is_file() and (out / src).stat().st_size > 0, src
    pngs = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert pngs == set(srcs)  # every written figure is in the report
    return srcs


@pytest.mark.slow
def test_analyze_two_paths_end_to_end(models, corpus, tmp_path):
    smoe, rmoe_dir = models
    out = tmp_path / "report"
    calls: list[str] = []

    def progress(iterable, total=None, desc=""):
        calls.append(desc)
        return iterable

    result = analyze([smoe, rmoe_dir], progress=progress, **_kwargs(corpus, out, tmp_path))
    assert any("forward" in c for c in calls) and "figures" in calls
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["models"]) == {"smoe", "rmoe"} == set(result["key_numbers"])
    srcs = _check_report(out)
    assert len(srcs) >= 12 and len(result["outputs"]["figures"]) == len(srcs)

    for name, model in data["models"].items():
        assert model["tokenizer_fallback"] is False
        assert model["data"]["tokens_used"] == 512 and model["data"]["seq_len"] == 64
        routing = model["routing"]
        assert len(routing["per_layer"]) == 3
        assert len(routing["mi_binned"]) == 3 and len(routing["mi_index"][0]) == 3
        for layer in routing["per_layer"]:
            assert sum(layer["load"]["counts"]) == 512 * 2
            assert 0 <= layer["entropy"]["mean"] <= math.log(4) + 1e-6
        experts = model["experts"]["per_layer"]
        assert len(experts) == 3
        for layer in experts:
            assert set(layer["weight_similarity"]) == {"act", "up", "down"}
            assert len(layer["weight_similarity"]["act"]) == 4
            assert set(layer["router_regression"]) == {"act", "up", "down"}
            dyn = layer["dynamic"]
            assert dyn["num_tokens"] == 96
            assert sum(map(sum, dyn["rank_counts"])) == 96 * 4
            assert 0 <= dyn["activation_ratio"] <= 1
        grads = model["router_gradients"]
        assert grads["lm"]["total"] > 0 and grads["balance"]["total"] > 0
        assert len(grads["lm"]["per_layer"]) == 3
        key = data["key_numbers"][name]
        assert all(
            key[k] is not None
            for k in ("lm_loss", "entropy_normalized", "mi_index_offdiag", "diversity_score")
        )
    # The SMoE run has a shared expert (included in the neuron-averaged map); RMoE a shared cell.
    assert data["models"]["smoe"]["experts"]["per_layer"][0]["neuron_avg_includes_shared"]
    assert (
        len(data["models"]["smoe"]["experts"]["per_layer"][0]["neuron_avg_similarity"]["act"]) == 5
    )
    assert data["models"]["rmoe"]["router_gradients"]["lm"]["shared_cell"] > 0
    assert data["models"]["smoe"]["router_gradients"]["lm"]["shared_cell"] is None
    comparison = data["comparison"]
    assert comparison["same_tokens"] and len(comparison["agreement"]) == 3
    assert 0 <= comparison["top1_agreement_mean"] <= 1


@pytest.mark.slow
def test_analyze_hf_model_without_tokenizer(corpus, tmp_path):
    torch.manual_seed(0)
    cfg = DeepseekV3Config(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        kv_lora_rank=8,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        pad_token_id=257,
        bos_token_id=256,
        eos_token_id=256,
    )
    path = tmp_path / "dsv3"
    DeepseekV3ForCausalLM(cfg).save_pretrained(path)
    out = tmp_path / "out"
    result = analyze([path], **_kwargs(corpus, out, tmp_path))
    model = result["models"]["dsv3"]
    assert model["tokenizer_fallback"] is True and "byte tokenizer" in model["tokenizer_note"]
    assert model["adapter"]["family"] == "deepseek_v3"
    assert model["adapter"]["routing"]["score"] == "sigmoid"
    assert model["adapter"]["moe_layer_indices"] == [1, 2]
    assert len(model["routing"]["per_layer"]) == 2
    assert result["comparison"] is None
    _check_report(out)


def test_resolve_model_dir(tmp_path):
    def model_at(p: Path) -> Path:
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text("{}")
        return p

    assert resolve_model_dir(model_at(tmp_path / "plain")) == tmp_path / "plain"
    assert resolve_model_dir(tmp_path / "plain" / "config.json") == tmp_path / "plain"
    run = tmp_path / "run"
    model_at(run / "checkpoints" / "step-0000100")
    newest = model_at(run / "checkpoints" / "step-0000200")
    (run / "checkpoints" / "step-0000300").mkdir()  # incomplete: no config.json
    assert resolve_model_dir(run) == newest
    hf = model_at(tmp_path / "hf" / "checkpoint-7")
    model_at(tmp_path / "hf" / "checkpoint-12")
    assert resolve_model_dir(tmp_path / "hf") == tmp_path / "hf" / "checkpoint-12"
    assert hf.exists()
    assert resolve_model_dir(model_at(tmp_path / "r2" / "final").parent).name == "final"
    assert resolve_model_dir(model_at(tmp_path / "r3" / "model").parent).name == "model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(tmp_path / "empty")


def test_find_tokenizer_in_run_directory(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-1"
    ckpt.mkdir(parents=True)
    assert find_tokenizer(ckpt, run) is None
    build_tokenizer("bytes").save(run)
    assert find_tokenizer(ckpt, run) == run.resolve()
    assert find_tokenizer(ckpt, ckpt) is None  # never looks above the given path


def test_analyze_rejects_bad_arguments(models, tmp_path):
    with pytest.raises(ValueError, match="one or two model paths"):
        analyze([models[0]] * 3, out_dir=tmp_path)
    with pytest.raises(ValueError, match="tokens"):
        analyze([models[0]], tokens=0, out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze([models[0], tmp_path / "nope"], out_dir=tmp_path)


def test_cli_nonexistent_path_is_one_line_exit_2(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("rmoe analyze: error:") and "does not exist" in err[0]
    )
    assert not (tmp_path / "o").exists()


def test_cli_bad_numbers_exit_2(models, tmp_path, capsys):
    assert main(["analyze", str(models[0]), "--tokens", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokens" in err[0]


def test_cli_help_has_example(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert "rmoe analyze runs/tiny-smoe runs/tiny-rmoe" in out and "--tokens" in out


@pytest.mark.slow
def test_cli_prints_report_and_key_numbers(models, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RMOE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "cli"
    args = ["analyze", str(models[1]), "--data", corpus, "--tokens", "256", "--seq-len", "64"]
    args += ["--output-tokens", "64", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"report:  {out / 'report.html'}" in text
    assert "router entropy / ln E" in text and "‖∇ router‖ from LM loss" in text
    _check_report(out)
