"""The `rmoe` command end to end on a micro run, and its one-line errors on bad input."""

import json

import pytest
import yaml

from rmoe.cli.main import build_parser, main


@pytest.fixture
def run_dir(micro_cfg, tmp_path):
    cfg = micro_cfg(train=dict(max_steps=3))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_eval_generate_info(run_dir, capsys, tmp_path):
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--max-batches", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bpb"] > 0 and res["ppl"] > 1
    sample = tmp_path / "s.txt"
    assert (
        main(
            [
                "generate",
                str(run_dir),
                "--prompt",
                "The ",
                "--max-new-tokens",
                "10",
                "--out",
                str(sample),
            ]
        )
        == 0
    )
    assert sample.read_text().startswith("The ")
    capsys.readouterr()
    assert main(["info", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["router_type"] == "recurrent" and info["total_params"] > 0


def test_info_on_preset(capsys):
    assert main(["info", "tiny", "--set", "model.router_type=linear"]) == 0
    out = capsys.readouterr().out
    assert "router:              linear" in out and "FLOPs/token" in out


def test_every_subcommand_has_help_with_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "eval", "generate", "info"} <= set(sub.choices)
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "example" in text.lower(), name


@pytest.mark.parametrize(
    "argv,needle",
    [
        (
            ["train", "tiny", "--out", "X", "--set", "model.router_typ=linear"],
            "nearest: 'model.router_type'",
        ),
        (
            ["train", "tiny", "--out", "X", "--set", "model.router_type=recurent"],
            "nearest: 'recurrent'",
        ),
        (
            ["train", "tiny", "--out", "X", "--set", "model.num_experts_per_tok=20"],
            "num_experts_per_tok",
        ),
        (["train", "tiny", "--out", "X", "--set", "optim.lr=-1"], "optim.lr must be > 0"),
        (
            ["train", "tiny", "--out", "X", "--set", "data.corpus=text:/nonexistent/x"],
            "/nonexistent/x",
        ),
        (["train", "tinyy", "--out", "X"], "nearest: 'tiny'"),
        (
            ["train", "tiny", "--out", "X", "--set", "train.max_stepz=3"],
            "nearest: 'train.max_steps'",
        ),
        (["eval", "/nonexistent/run"], "does not exist"),
    ],
)
def test_bad_input_one_line_error(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert needle in err, err
    assert not (tmp_path / "X" / "checkpoints").exists()


def test_bad_tokenizer_file(micro_cfg, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    cfg = micro_cfg(data=dict(tokenizer=str(bad)))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_missing_text_field(tmp_path, micro_cfg, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": "hello world " * 50}) for _ in range(40)))
    cfg = micro_cfg(data=dict(corpus=f"jsonl:{data}"))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "body" in capsys.readouterr().err


def test_resume_from_non_checkpoint_dir(run_dir, tmp_path, capsys, micro_cfg):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(run_dir / "config.yaml"), "--out", str(empty), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_eval_vocab_mismatch(run_dir, capsys):
    from rmoe.data import build_tokenizer

    texts = ["def add(a, b): return a + b\n" * 20, "class A: pass\n" * 20]
    bpe = build_tokenizer("bpe:300", train_texts=texts)
    bpe.save(run_dir.parent / "bpe")
    assert main(["eval", str(run_dir), "--tokenizer", str(run_dir.parent / "bpe")]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_eval_unloadable_model(run_dir, capsys):
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["vocab_size"] = 300
    (run_dir / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(run_dir)]) == 2  # the manifest catches the edit
    assert "is damaged" in capsys.readouterr().err
    (run_dir / "manifest.json").unlink()  # an edited model loaded unverified
    assert main(["eval", str(run_dir)]) == 2
    assert "could not load a model" in capsys.readouterr().err
