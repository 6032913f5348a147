"""Device and dtype resolution: one rule everywhere."""

from __future__ import annotations

import pytest
import torch

from rmoe.runtime import (
    DistInfo,
    autocast_dtype,
    lone_launch_warning,
    model_device,
    resolve_device,
    resolve_dtype,
    setup_distributed,
)

CPU = torch.device("cpu")


def test_resolve_device_auto_and_explicit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)  # torchrun's local rank


def test_autocast_and_weight_dtypes():
    cuda = torch.device("cuda", 0)
    assert autocast_dtype("auto", CPU) is None and autocast_dtype("float32", cuda) is None
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("bfloat16", CPU) is torch.bfloat16
    assert (
        resolve_dtype(None, CPU) is torch.float32 and resolve_dtype("auto", cuda) is torch.bfloat16
    )
    assert resolve_dtype("float16", CPU) is torch.float16
    for bad in (lambda: resolve_dtype("fp8", CPU), lambda: autocast_dtype("fp8", CPU)):
        with pytest.raises(ValueError, match="dtype must be one of"):
            bad()


def test_single_process_and_model_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup_distributed(CPU)
    assert info == DistInfo() and info.is_main and not DistInfo(rank=1, world_size=2).is_main
    assert model_device(torch.nn.Linear(2, 2)) == CPU
    assert model_device(torch.nn.Identity()) == CPU


def test_lone_accelerate_launch_is_detected():
    # what `accelerate launch --cpu --num_processes 2` gives its one process (checked with
    # accelerate 1.15): MASTER_ADDR because N > 1, no WORLD_SIZE
    lone = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}
    lone["MASTER_ADDR"] = "127.0.0.1"
    msg = lone_launch_warning(lone)
    assert msg is not None and "torchrun --nproc-per-node N" in msg and "--multi_gpu" in msg
    # --multi_gpu / torchrun: WORLD_SIZE is set -> no warning
    assert lone_launch_warning({**lone, "WORLD_SIZE": "2"}) is None
    # a single-process accelerate launch (no MASTER_ADDR) and a plain run: no warning
    assert lone_launch_warning({"ACCELERATE_MIXED_PRECISION": "no"}) is None
    assert lone_launch_warning({"MASTER_ADDR": "127.0.0.1"}) is None
    assert lone_launch_warning({}) is None


def test_rmoe_train_prints_the_lone_launch_warning(monkeypatch, tmp_path, capsys):
    from rmoe.cli.main import main

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # an unknown preset fails right after the check: the warning comes first, nothing trains
    assert main(["train", "no-such-preset", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "accelerate launch asked for more than one process" in err
