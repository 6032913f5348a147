"""Issue 17: one trainer per run directory."""

import logging
import os
import signal
import subprocess
import sys

import pytest

from rmoe.training.lock import LOCK_NAME, RunLock, RunLockedError

from .test_sigterm import start_trainer, wait_for_steps, write_config


def test_second_lock_on_the_same_dir_fails_naming_the_pid(tmp_path):
    with RunLock(tmp_path / "run") as first:
        assert first.held and (tmp_path / "run" / LOCK_NAME).is_file()
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()  # another fd: flock conflicts in-process too
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with RunLock(tmp_path / "run"):  # free again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(f"pid={dead.pid} host=elsewhere\n")
    with caplog.at_level(logging.WARNING, logger="rmoe.training.lock"), RunLock(run):
        assert f"pid={os.getpid()} " in (run / LOCK_NAME).read_text()
    assert f"PID {dead.pid}" in caplog.text and "took over" in caplog.text


def test_lock_on_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        RunLock(tmp_path / "file").acquire()


def test_second_rmoe_train_on_a_running_dir_exits_2(corpus_file, tmp_path, capsys):
    from rmoe.cli.main import main

    config = write_config(tmp_path / "run.yaml", corpus_file, tmp_path / "cache", 100_000)
    out = tmp_path / "run"
    proc = start_trainer(config, out)
    try:
        wait_for_steps(proc, out, 1)
        assert main(["train", str(config), "--out", str(out), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"PID {proc.pid}" in err[0], err
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=120)


def test_failed_start_leaves_no_empty_run_directory(tmp_path):
    """A lock that created --out (and its parents) removes them again when nothing was written
    there (e.g. --resume of a run that does not exist); a folder with files stays."""
    from rmoe.training.lock import RunLock

    out = tmp_path / "a" / "b" / "run"
    with RunLock(out):
        assert (out / ".lock").is_file()
    assert not (tmp_path / "a").exists()
    with RunLock(out):
        (out / "metrics.jsonl").write_text("{}\n")
    assert (out / "metrics.jsonl").is_file() and not (out / ".lock").exists()
