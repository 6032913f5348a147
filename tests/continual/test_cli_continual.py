"""`rmoe finetune`, `rmoe continual ...` and `rmoe train` with continual pre-training options,
end to end on micro models."""

from __future__ import annotations

import json

import pytest
import yaml

from rmoe.cli.main import build_parser, main
from rmoe.loading import load_model

from .conftest import write_jsonl


def _qa(tmp_path):
    rows = [{"q": f"copy {a}{b} =", "a": f" {b}{a}"} for a in "abcdef" for b in "xyz"]
    write_jsonl(tmp_path / "qa_train.jsonl", rows)
    write_jsonl(tmp_path / "qa_test.jsonl", rows[:6])
    return tmp_path / "qa_train.jsonl", tmp_path / "qa_test.jsonl"


def test_finetune_cli_with_gw_and_frozen_router(tmp_path, saved_model, capsys):
    train, test = _qa(tmp_path)
    out = tmp_path / "ft"
    argv = ["finetune", str(saved_model), "--data", str(train), "--eval-data", str(test),
            "--prompt-field", "q", "--answer-field", "a", "--steps", "4", "--batch-size", "6",
            "--freeze-router", "--gw-threshold", "0.2", "--gw-max-tokens-per-seq", "3",
            "--out", str(out), "--threads", "1", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "before: exact match" in text and "GW broadcast" in text and "router frozen" in text
    res = json.loads((out / "finetune.json").read_text())
    assert res["steps"] == 4 and len(res["gw_tokens"]) == 4
    assert res["final_eval"]["n"] == 6 and res["before"]["n"] == 6
    assert res["config"]["freeze_router"] and res["frozen"]
    model, tok, _ = load_model(out, device="cpu")
    assert model.config.gw_entropy_threshold is None  # GW is a training-time setting
    before, _, _ = load_model(saved_model, device="cpu")
    router = "model.layers.0.moe.router.proj.weight"
    assert (model.state_dict()[router] == before.state_dict()[router]).all()


def test_finetune_cli_migu_and_holdout(tmp_path, saved_model, capsys):
    train, _ = _qa(tmp_path)
    out = tmp_path / "ft"
    argv = ["finetune", str(saved_model), "--data", str(train), "--prompt-field", "q",
            "--answer-field", "a", "--steps", "2", "--migu-ratio", "0.7", "--holdout", "0.2",
            "--out", str(out), "--no-eval-before", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["config"]["migu_ratio"] == 0.7 and res["eval_examples"] == 4
    assert res["train_examples"] == 14 and res["before"] is None


def test_finetune_cli_errors(tmp_path, saved_model, capsys):
    train, _ = _qa(tmp_path)
    base = ["finetune", str(saved_model), "--data", str(train), "--out", str(tmp_path / "x")]
    assert main(base) == 2
    assert "no field 'prompt'" in capsys.readouterr().err
    assert main([*base, "--prompt-field", "q", "--answer-field", "a", "--gw-random"]) == 2
    assert "need --gw-threshold" in capsys.readouterr().err
    extra = ["--prompt-field", "q", "--answer-field", "a"]
    assert main([*base, *extra, "--migu-ratio", "0.7", "--random-mask-ratio", "0.7"]) == 2
    assert "not both" in capsys.readouterr().err
    nothing = ["--migu-ratio", "0.7", "--mask-targets", "*.no_such_layer"]
    assert main([*base, *extra, "--steps", "1", "--threads", "1", *nothing]) == 2
    assert "found no layer to cover" in capsys.readouterr().err


def test_finetune_cli_mask_targets_experts_only(tmp_path, saved_model):
    train, _ = _qa(tmp_path)
    out = tmp_path / "ft"
    argv = ["finetune", str(saved_model), "--data", str(train), "--prompt-field", "q",
            "--answer-field", "a", "--steps", "1", "--lr", "0.01", "--grad-clip", "0",
            "--migu-ratio", "0.7", "--mask-targets", "*.experts.*", "--out", str(out),
            "--no-eval-before", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "finetune.json").read_text())
    assert res["config"]["mask_targets"] == ["*.experts.*"]
    before, _, _ = load_model(saved_model, device="cpu")
    after, _, _ = load_model(out, device="cpu")
    b, a = before.state_dict(), after.state_dict()
    # experts: masked per expert row (most rows still); a linear layer: every row moved
    gate = "model.layers.0.moe.experts.gate_proj"
    moved = (a[gate] != b[gate]).any(dim=2)  # [E, F]
    assert 0 < moved.float().mean() < 0.5
    q = "model.layers.0.attn.q_proj.weight"
    assert (a[q] != b[q]).any(dim=1).all()


def test_continual_run_cli(tmp_path, saved_model, two_tasks, capsys):
    out = tmp_path / "cl"
    argv = ["continual", "run", "--model", str(saved_model), "--out", str(out),
            "--task", str(two_tasks[0]), "--task", f"second={two_tasks[1]}#train=12",
            "--methods", "plain,migu+replay", "--steps-per-task", "2", "--batch-size", "4",
            "--metric", "tf_exact_match", "--replay-size", "3", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| migu+replay |" in text and "after second" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"plain", "migu+replay"}
    assert [t["name"] for t in summary["tasks"]] == ["upper", "second"]
    assert (out / "migu_replay" / "accuracy_matrix.png").is_file()


def test_continual_tasks_cli(tmp_path, capsys):
    assert main(["continual", "tasks", "--out", str(tmp_path), "--train-per-task", "5",
                 "--eval-per-task", "3"]) == 0  # fmt: skip
    rows = (tmp_path / "naming" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 5 and json.loads(rows[0])["prompt"].startswith("naming: ")
    assert (tmp_path / "topic" / "test.jsonl").is_file()


def test_continual_help_has_examples(capsys):
    parser = build_parser()
    for argv in (["continual", "--help"], ["continual", "run", "--help"], ["finetune", "--help"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "example" in capsys.readouterr().out
    assert main(["continual"]) == 1


@pytest.fixture
def base_run(micro_cfg, tmp_path):
    cfg = micro_cfg(train=dict(max_steps=3))
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "base"
    assert main(["train", str(path), "--out", str(out), "--no-progress"]) == 0
    return out, cfg


def test_train_cli_continual_pretraining_and_gap(base_run, tmp_path, capsys):
    base, cfg = base_run
    old = cfg.data.corpus  # the base run's corpus is the old domain
    cfg.data.corpus = "pydoc-topics"
    cfg.train.max_steps = 4
    path = tmp_path / "cpt.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "cpt"
    argv = ["train", str(path), "--out", str(out), "--init-from", str(base), "--no-progress",
            "--subset-tokens", "3000", "--epochs", "1", "--chunk-chars", "500",
            "--replay", "python-stdlib", "--replay-ratio", "0.25",
            "--set", "train.eval_log_points=3"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "stability gap:" in printed.out and "continual pre-training data" in printed.err
    manifest = json.loads((out / "cpt_manifest.json").read_text())
    assert manifest["old_corpus"] == old and manifest["new_corpus"] == "pydoc-topics"
    assert manifest["replay_share"] == pytest.approx(0.25, abs=0.1)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["corpus"] == f"text:{(out / 'cpt_data').resolve()}"
    assert saved["data"]["extra_eval"] == [old]
    assert saved["train"]["max_steps"] == manifest["max_steps"]
    gap = json.loads((out / "gap.json").read_text())
    assert set(gap["curves"]) == {"new", "old"}
    steps = gap["curves"]["new"]["steps"]
    assert steps[0] == 0 and steps[-1] == manifest["max_steps"]
    assert (out / "gap.png").is_file()
    capsys.readouterr()
    assert main(["continual", "gap", str(out), "--out", str(tmp_path / "g")]) == 0
    assert "| cpt | new |" in capsys.readouterr().out


def test_train_cli_cpt_needs_init_from(micro_cfg, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(micro_cfg().to_dict()))
    assert main(["train", str(path), "--out", str(tmp_path / "o"), "--epochs", "2"]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_cpt_keeps_the_starting_runs_bpe_tokenizer(micro_cfg, tmp_path):
    from rmoe.continual.cpt import CPTOptions, prepare_continual_pretraining

    cfg = micro_cfg(data=dict(tokenizer="bpe:300"), train=dict(max_steps=2))
    path = tmp_path / "bpe.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    base = tmp_path / "base"
    assert main(["train", str(path), "--out", str(base), "--no-progress"]) == 0
    cfg.data.corpus = "pydoc-topics"
    cfg, _ = prepare_continual_pretraining(
        cfg, tmp_path / "cpt", base, CPTOptions(subset_tokens=2000, chunk_chars=400)
    )
    assert cfg.data.tokenizer == str(base.resolve())  # not a BPE retrained on the new corpus
