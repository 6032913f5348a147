"""`rmoe experiment`: help, listing, dry runs and one-line errors."""

from __future__ import annotations

import pytest

from rmoe.cli.main import main


def test_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--quick" in out and "--workers" in out


def test_list(capsys):
    assert main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu-mechanism", "gpu-10min", "paper-enwik8-medium", "paper-depth"):
        assert name in out


def test_dry_run_prints_the_plan(capsys):
    assert main(["experiment", "gpu-10min", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "smoe-flops-L12-s0" in out and "8 runs" in out


def test_unknown_spec_is_one_line(capsys):
    assert main(["experiment", "cpu-mechanizm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rmoe experiment: error: unknown experiment spec") and "\n" not in err
    assert "cpu-mechanism" in err


def test_unknown_arm_in_only(capsys):
    assert main(["experiment", "cpu-mechanism", "--only", "rmoe,nope", "--dry-run"]) == 2
    assert "no arm 'nope'" in capsys.readouterr().err
