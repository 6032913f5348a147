"""`rmoe verify`: one line per checkpoint and the run-level model; exit 0 / 1 / 2."""

from __future__ import annotations

import pytest

from rmoe.cli.main import build_parser, main
from rmoe.training import train


@pytest.fixture
def run(micro_cfg, tmp_path):
    cfg = micro_cfg(train=dict(max_steps=4, save_interval=2, keep_last=3, eval_batches=1))
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    return out


def test_verify_intact_run(run, capsys):
    assert main(["verify", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("ok") and "checkpoints/step-0000002" in lines[0]
    assert "checkpoints/step-0000004" in lines[1] and "run-level model" in lines[2]
    assert all("manifest verified" in line for line in lines)


def test_verify_damaged_run_and_single_dirs(run, capsys):
    path = run / "checkpoints" / "step-0000004" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("damaged")]
    assert len(bad) == 1 and "step-0000004" in bad[0] and "model.safetensors" in bad[0]
    assert "1 of 3 damaged" in out
    assert main(["verify", str(run / "checkpoints" / "step-0000002")]) == 0
    (run / "manifest.json").unlink()  # an unverified model: headers only
    capsys.readouterr()
    assert main(["verify", str(run / "checkpoints" / "step-0000002")]) == 0
    assert main(["verify", str(run)]) == 1
    assert "safetensors headers ok" in capsys.readouterr().out


def test_verify_bad_input_exits_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("rmoe verify: error:") for e in err)


def test_verify_help_has_an_example():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["verify"].format_help()
    assert "examples:" in text and "rmoe verify runs/" in text and "exit status" in text
