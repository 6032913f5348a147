"""Fault injection: a save killed or out of disk at each stage, and damaged model files.

A killed run is a forked child process (it inherits the imported modules, so it starts in
milliseconds) that SIGKILLs itself at the stage ``RMOE_FAULT`` names; the resume runs in this
process. Losses (per step) and weights must equal those of an uninterrupted run exactly.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pydoc_data.topics
import signal

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import micro_raw

from rmoe.cli.main import main
from rmoe.training import train
from rmoe.training.config import dump_config, from_dict
from rmoe.training.integrity import FAULT_STAGES, CheckpointWriteError, verify_run

FAULT_STEP = 4


def make_cfg(root, **train_kw):
    """A 6-step run saving every 2 steps (tiny model, one thread)."""
    corpus = root / "topics.txt"
    if not corpus.exists():
        text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
        corpus.write_text(text[:60_000])
    train = dict(max_steps=6, save_interval=2, keep_last=3, log_interval=1, eval_batches=1)
    return from_dict(micro_raw(corpus, root / "cache", train={**train, **train_kw}))


def losses_by_step(run_dir):
    """{step: loss} of metrics.jsonl, the last record of a step winning (a resume replays)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def assert_same_weights(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def stale(run_dir):
    found = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    return found + [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def baseline(root):
    out = root / "baseline"
    train(make_cfg(root), out, progress=False)
    return out


def _killed_child(cfg, out, stage):
    os.environ.update(RMOE_FAULT=stage, RMOE_FAULT_ACTION="kill", RMOE_FAULT_STEP=str(FAULT_STEP))
    try:
        train(cfg, out, progress=False)
    finally:
        os._exit(3)  # only reached when the fault did not fire


def run_killed(cfg, out, stage):
    """Train in a forked child that SIGKILLs itself at `stage` of the save of FAULT_STEP."""
    proc = multiprocessing.get_context("fork").Process(target=_killed_child, args=(cfg, out, stage))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL, f"child ended with {proc.exitcode}, not SIGKILL"


@pytest.mark.slow
@pytest.mark.parametrize("stage", FAULT_STAGES)
def test_kill_at_each_stage_then_resume_is_bit_identical(root, baseline, stage, caplog):
    cfg = make_cfg(root)
    out = root / f"kill-{stage}"
    run_killed(cfg, out, stage)
    had_stale = bool(stale(out))
    rest = train(cfg, out, resume=True, progress=False)
    assert rest.step == 6 and rest.status == "completed"
    if had_stale:
        assert "interrupted save" in caplog.text
    assert not stale(out)
    assert losses_by_step(out) == losses_by_step(baseline)  # exact, every step
    assert_same_weights(out, baseline)
    assert all(v.ok and v.verified for v in verify_run(out))


@pytest.mark.parametrize("stage", FAULT_STAGES)
def test_enospc_at_each_stage_keeps_previous_checkpoint(root, baseline, stage, monkeypatch):
    cfg = make_cfg(root)
    out = root / f"enospc-{stage}"
    monkeypatch.setenv("RMOE_FAULT", stage)
    monkeypatch.setenv("RMOE_FAULT_ACTION", "enospc")
    monkeypatch.setenv("RMOE_FAULT_STEP", str(FAULT_STEP))
    with pytest.raises(CheckpointWriteError) as info:
        train(cfg, out, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    want = ["step-0000002", "step-0000004"] if stage == "publish" else ["step-0000002"]
    assert names == want  # the partial one removed, no temporaries
    assert not stale(out)
    verdicts = verify_run(out)
    assert all(v.ok and v.verified for v in verdicts), [v.describe() for v in verdicts]
    if stage != "publish":
        assert "step-0000002 is intact" in msg
    monkeypatch.delenv("RMOE_FAULT")
    if stage in ("model", "publish"):  # the run continues exactly after space is freed
        train(cfg, out, resume=True, progress=False)
        assert losses_by_step(out) == losses_by_step(baseline)
        assert_same_weights(out, baseline)


def test_enospc_through_the_cli_is_one_line(root, monkeypatch, capsys):
    cfg = make_cfg(root)
    dump_config(cfg, root / "cli.yaml")
    monkeypatch.setenv("RMOE_FAULT", "state")
    monkeypatch.setenv("RMOE_FAULT_ACTION", "enospc")
    monkeypatch.setenv("RMOE_FAULT_STEP", "2")
    code = main(["train", str(root / "cli.yaml"), "--out", str(root / "cli-run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("rmoe train: error: could not write checkpoint step-0000002")
    assert "Traceback" not in "\n".join(err)


# --- damaged files through every command that loads a model -------------------------------


def damage(path, kind):
    """Truncate, break the header of, or flip one data byte of a safetensors file."""
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "header":
        data[8:16] = b"\x00garbage"
    elif kind == "header-length":
        data[0:8] = (len(data) * 4).to_bytes(8, "little")
    elif kind == "flipped":
        data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def sft_data(root):
    path = root / "qa.jsonl"
    path.write_text(
        "\n".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) for i in range(8)) + "\n"
    )
    return path


def commands(run, root, sft_data):
    out = root / f"cmd-out-{run.name}"
    return {
        "eval": ["eval", str(run), "--max-batches", "1", "--device", "cpu"],
        "generate": ["generate", str(run), "--max-new-tokens", "2", "--device", "cpu"],
        "analyze": ["analyze", str(run), "--tokens", "64", "--out", str(out / "an"),
                    "--no-progress"],
        "finetune": ["finetune", str(run), "--data", str(sft_data), "--out", str(out / "ft")],
        "init-from": ["train", str(root / "cli.yaml"), "--out", str(out / "init"),
                      "--init-from", str(run), "--no-progress"],
    }  # fmt: skip


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("kind", ["truncated", "header", "header-length", "flipped"])
def test_damaged_model_is_one_line_for_every_loader(
    root, baseline, sft_data, kind, manifest, capsys
):
    if kind == "flipped" and not manifest:
        pytest.skip("a flipped data byte is only found by the manifest's SHA-256")
    import shutil

    dump_config(make_cfg(root), root / "cli.yaml")
    run = root / f"damaged-{kind}-{manifest}"
    shutil.copytree(baseline, run, ignore=shutil.ignore_patterns("checkpoints"))
    if not manifest:
        (run / "manifest.json").unlink()
    damage(run / "model.safetensors", kind)
    for name, argv in commands(run, root, sft_data).items():
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (1, 2), name
        assert "Traceback" not in "\n".join(err), name
        assert err and "model.safetensors" in err[-1], (name, err)
        assert err[-1].startswith(f"rmoe {argv[0]}: error:"), (name, err)


def test_on_save_error_continue_keeps_training(root, baseline, monkeypatch, caplog):
    """train.on_save_error=continue: the failed save of step 4 is logged, training goes on,
    the next save (step 6) lands, and the run's losses equal the uninterrupted run's."""
    cfg = make_cfg(root, on_save_error="continue")
    out = root / "enospc-continue"
    monkeypatch.setenv("RMOE_FAULT", "state")
    monkeypatch.setenv("RMOE_FAULT_ACTION", "enospc")
    monkeypatch.setenv("RMOE_FAULT_STEP", str(FAULT_STEP))
    with caplog.at_level("WARNING"):
        train(cfg, out, progress=False)
    assert "tries again at the next save" in caplog.text
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-0000002", "step-0000006"]
    assert losses_by_step(out) == losses_by_step(baseline)
    assert all(v.ok and v.verified for v in verify_run(out))


def test_on_save_error_bad_value_is_refused():
    with pytest.raises(ValueError, match="train.on_save_error='retry'; expected stop or continue"):
        from_dict({"train": {"on_save_error": "retry"}}).validate()
