"""Manifests, verification, resume fallback, stale temporaries, write-error policy, --init-from."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from rmoe.cli.main import main
from rmoe.loading import load_model
from rmoe.training import train
from rmoe.training.checkpoint import Checkpointer, load_state, resume_checkpoint
from rmoe.training.integrity import (
    FORMAT,
    MANIFEST,
    CheckpointWriteError,
    IntegrityError,
    clean_stale,
    newest_intact_checkpoint,
    safetensors_problem,
    sha256_file,
    verify_dir,
)


@pytest.fixture
def run(micro_cfg, tmp_path):
    """A 6-step run with checkpoints at steps 2, 4 and 6."""
    cfg = micro_cfg(train=dict(max_steps=6, save_interval=2, keep_last=3, eval_batches=1))
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    return cfg, out


def ckpt(out, step):
    return out / "checkpoints" / f"step-{step:07d}"


def flip(path, at=-10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifests_list_sizes_and_hashes(run):
    _, out = run
    m = json.loads((ckpt(out, 6) / MANIFEST).read_text())
    assert m["format"] == FORMAT
    files = m["files"]
    assert {"config.json", "model.safetensors", "trainer_state.pt", "tokenizer.json"} <= set(files)
    for name, entry in files.items():
        p = ckpt(out, 6) / name
        assert entry == {"size": p.stat().st_size, "sha256": sha256_file(p)}
    top = json.loads((out / MANIFEST).read_text())["files"]
    assert "trainer_state.pt" not in top and top["model.safetensors"] == files["model.safetensors"]
    for name, entry in top.items():
        assert sha256_file(out / name) == entry["sha256"], name
    assert verify_dir(out).verified and verify_dir(ckpt(out, 2)).ok


def test_resume_skips_a_damaged_checkpoint_and_says_so(run, caplog):
    cfg, out = run
    expect = {k: v for k, v in load_file_all(out).items()}
    flip(ckpt(out, 6) / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        assert resume_checkpoint(out) == ckpt(out, 4)
    assert "step-0000006 is damaged" in caplog.text and "from step-0000004 instead" in caplog.text
    res = train(cfg, out, resume=True, progress=False)  # redoes steps 5 and 6 exactly
    assert res.step == 6
    for k, v in load_file_all(out).items():
        assert torch.equal(v, expect[k]), k
    assert verify_dir(ckpt(out, 6), use_cache=False).ok


def load_file_all(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_every_checkpoint_damaged_is_one_line(run):
    _, out = run
    for step in (2, 4, 6):
        (ckpt(out, step) / "trainer_state.pt").write_bytes(b"broken")
    with pytest.raises(IntegrityError, match="every checkpoint") as info:
        resume_checkpoint(out)
    assert "\n" not in str(info.value)


def test_damaged_checkpoint_names_the_newest_intact_one(run):
    _, out = run
    (ckpt(out, 6) / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="newest intact checkpoint instead: .*step-0000004"):
        load_model(ckpt(out, 6), device="cpu")
    with pytest.raises(IntegrityError, match="step-0000004"):
        load_state(ckpt(out, 6))
    assert newest_intact_checkpoint(out) == ckpt(out, 4)


def test_unreadable_state_without_manifest_is_one_line(run):
    _, out = run
    (ckpt(out, 6) / MANIFEST).unlink()
    (ckpt(out, 6) / "trainer_state.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(IntegrityError, match="trainer_state.pt: unreadable") as info:
        load_state(ckpt(out, 6))
    assert "\n" not in str(info.value)


def test_model_without_manifest_loads_unverified(run):
    _, out = run
    (out / MANIFEST).unlink()
    v = verify_dir(out)
    assert v.ok and not v.verified
    loaded = load_model(out, device="cpu")
    assert loaded.model_dir == out


def test_safetensors_header_checks(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}, str(path))
    assert safetensors_problem(path) is None
    good = path.read_bytes()
    path.write_bytes(good[:-1])
    assert "truncated" in safetensors_problem(path)
    path.write_bytes(good[:5])
    assert "too short" in safetensors_problem(path)
    path.write_bytes((10**12).to_bytes(8, "little") + good[8:])
    assert "exceeds" in safetensors_problem(path)
    n = int.from_bytes(good[:8], "little")
    header = good[8 : 8 + n].replace(b'"F32"', b'"F64"')
    path.write_bytes(good[:8] + header + good[8 + n :])
    assert "damaged header" in safetensors_problem(path)


def test_clean_stale_spares_live_writers(run, caplog):
    _, out = run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getppid()
    root = out / "checkpoints"
    legacy, stale, live = (root / ".tmp-step-0000008-abc_12", root / f".tmp-step-0000008-"
                           f"{dead.pid}-xyz", root / f".tmp-step-0000008-{alive}-xyz")  # fmt: skip
    for d in (legacy, stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    files = {
        "legacy": out / ".model.safetensors.tmp",
        "stale": out / f".config.json.{dead.pid}.tmp",
        "live": out / f".tokenizer.json.{alive}.tmp",
        "other": out / ".notes.txt.tmp",
    }
    for p in files.values():
        p.write_text("x")
    with caplog.at_level(logging.WARNING):
        removed = clean_stale(out)
    assert set(removed) == {legacy, stale, files["legacy"], files["stale"]}
    assert live.exists() and files["live"].exists() and files["other"].exists()
    assert "interrupted save" in caplog.text


def test_interrupted_publish_is_repaired_on_start(run):
    cfg, out = run
    shutil.copyfile(ckpt(out, 2) / "model.safetensors", out / "model.safetensors")  # half-done
    assert not verify_dir(out).ok
    with pytest.raises(ValueError, match="newest intact checkpoint instead: .*step-0000006"):
        load_model(out, device="cpu")
    from rmoe.training.prepare import prepare_run

    prepared = prepare_run(cfg, out, resume=True)
    assert prepared.checkpointer.republished == ckpt(out, 6)
    assert verify_dir(out, use_cache=False).ok


def test_write_error_policy_continue(micro_cfg, tmp_path, monkeypatch):
    cfg = micro_cfg(train=dict(max_steps=4, save_interval=2, keep_last=3, eval_batches=1))
    from rmoe.training.prepare import prepare_run

    prepared = prepare_run(cfg, tmp_path / "run")
    ck = prepared.checkpointer
    with pytest.raises(ValueError, match="on_write_error"):
        Checkpointer(tmp_path / "x", None, None, None, None, None, {}, 1, on_write_error="retry")
    ck.on_write_error = "continue"
    monkeypatch.setenv("RMOE_FAULT", "model")
    monkeypatch.setenv("RMOE_FAULT_ACTION", "enospc")
    monkeypatch.setenv("RMOE_FAULT_STEP", "2")
    assert ck.save(2) is None and ck.failed_saves[0][0] == 2
    assert ck.save(4) is not None
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000004"]
    ck.on_write_error = "stop"
    with pytest.raises(CheckpointWriteError, match="step-0000004 is intact"):
        ck.save(2)


def test_init_from_another_width_names_the_fields(run, micro_cfg, tmp_path, capsys):
    _, base = run
    wide = micro_cfg(model=dict(hidden_size=64), train=dict(max_steps=1))
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(wide.to_dict()))
    argv = ["train", str(path), "--out", str(tmp_path / "w"), "--init-from", str(base),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rmoe train: error:") and "hidden_size 32 vs 64" in err[-1]
    assert "size mismatch" not in "\n".join(err)


def test_init_from_a_damaged_tokenizer_is_one_line(run, micro_cfg, tmp_path, capsys):
    _, base = run
    (base / "tokenizer.json").write_text("{")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(micro_cfg(train=dict(max_steps=1)).to_dict()))
    argv = ["train", str(path), "--out", str(tmp_path / "c"), "--init-from", str(base),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "tokenizer.json" in err[-1] and "step-0000006" in err[-1], err
