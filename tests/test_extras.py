"""A missing optional dependency is one line naming the extra, never a traceback."""

from __future__ import annotations

import sys

import pytest

from rmoe.cli.main import main
from rmoe.extras import MissingExtraError, missing_extra_message, require


def _without(monkeypatch, module: str) -> None:
    """Make ``import module`` fail, and forget every rmoe module that may have imported it."""
    for name in list(sys.modules):
        if (
            name == module
            or name.startswith(module + ".")
            or name.startswith(("rmoe.analysis", "rmoe.experiments"))
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def test_message_names_the_extra():
    exc = ModuleNotFoundError("No module named 'scipy.optimize'", name="scipy.optimize")
    assert missing_extra_message(exc, "rmoe analyze") == (
        "rmoe analyze needs scipy: pip install 'rmoe[analysis]'"
    )
    assert missing_extra_message(ModuleNotFoundError("x", name="nothing_optional"), "f") is None


def test_require(monkeypatch):
    _without(monkeypatch, "scipy")
    with pytest.raises(MissingExtraError, match=r"pip install 'rmoe\[analysis\]'"):
        require("scipy.stats", "the paired t-test")


def test_analyze_without_scipy_is_one_line(tmp_path, monkeypatch, capsys):
    from rmoe import RMoEConfig, RMoEForCausalLM
    from rmoe.data.tokenizer import Tokenizer

    model_dir = tmp_path / "model"
    config = RMoEConfig(
        vocab_size=258,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
    )
    RMoEForCausalLM(config).save_pretrained(model_dir)
    Tokenizer.bytes().save(model_dir)
    _without(monkeypatch, "scipy")
    capsys.readouterr()
    assert main(["analyze", str(model_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rmoe analyze needs scipy: pip install 'rmoe[analysis]'"]


def test_experiment_list_needs_no_scipy(monkeypatch, capsys):
    _without(monkeypatch, "scipy")
    assert main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.strip(), "no specs listed"


def test_train_with_a_hub_corpus_without_datasets_is_one_line(tmp_path, monkeypatch, capsys):
    """Any subcommand: the missing extra is caught once, in cli.main."""
    _without(monkeypatch, "datasets")
    for name in list(sys.modules):
        if name.startswith("rmoe.data"):
            monkeypatch.delitem(sys.modules, name)
    argv = ["train", "tiny", "--out", str(tmp_path / "run"), "--no-progress",
            "--set", "data.corpus=hf:someone/some-corpus", "--set", "train.max_steps=1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "rmoe train needs datasets: pip install 'rmoe[data]'"
