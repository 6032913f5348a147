"""Device, dtype, threads, seeds and the process group: the one place that resolves each.

Every entry point (training, fine-tuning, evaluation, analysis, experiments) calls these, so a
``device="auto"`` means the same thing everywhere: ``cuda:LOCAL_RANK`` when CUDA is available,
else the CPU.
"""

from __future__ import annotations

import os
import platform
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Names accepted wherever a dtype is given as a string (besides ``"auto"``)."""


@dataclass(frozen=True)
class DistInfo:
    """Process-group facts (world_size 1 when not distributed).

    Attributes:
        rank: this process's global rank.
        world_size: number of processes.
        local_rank: rank on this node (the CUDA device index under torchrun).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files."""
        return self.rank == 0


def local_rank() -> int:
    """``LOCAL_RANK`` set by torchrun / accelerate (0 when not distributed)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; other names as
    given, checked.

    Raises:
        ValueError: a CUDA device was asked for but CUDA is not available.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use cpu or auto")
    return dev


def autocast_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``train.dtype``-style setting (None = plain float32).

    ``auto`` is bf16 on CUDA and float32 elsewhere; ``float32`` is always None; ``bfloat16`` /
    ``float16`` autocast to that dtype on any device."""
    if name is None or name == "float32" or (name == "auto" and device.type != "cuda"):
        return None
    if name in ("auto", "bfloat16"):
        return torch.bfloat16
    if name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"dtype must be one of {['auto', *DTYPES]}; got {name!r}")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype to load weights in: ``auto``/None = bf16 on CUDA, float32 elsewhere.

    Raises:
        ValueError: an unknown dtype name (the valid ones are listed).
    """
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}; got {dtype!r}")
    return DTYPES[dtype]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when ``threads`` is a positive number (0/None: leave as is)."""
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lone_launch_warning(env: Mapping[str, str] | None = None) -> str | None:
    """A warning when ``accelerate launch`` was asked for several processes but started only
    this one, else None.

    accelerate's simple launcher (what ``accelerate launch --cpu --num_processes N`` uses) runs
    ONE process and sets ``MASTER_ADDR`` (because N > 1) but no ``WORLD_SIZE``, so the run
    trains alone. ``--multi_gpu`` (without ``--cpu``; on a machine without GPUs its processes
    use the CPU) and ``torchrun --nproc-per-node N`` start N processes.
    """
    env = os.environ if env is None else env
    launched_by_accelerate = any(k.startswith("ACCELERATE_") for k in env)
    if not launched_by_accelerate or "MASTER_ADDR" not in env or "WORLD_SIZE" in env:
        return None
    return (
        "warning: accelerate launch asked for more than one process but this one runs alone "
        "(world size 1): accelerate's --cpu launcher starts a single process. For N CPU "
        "processes use `torchrun --nproc-per-node N -m rmoe.cli.main train ...` or "
        "`accelerate launch --multi_gpu --num_processes N -m rmoe.cli.main train ...` "
        "(without --cpu)."
    )


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun / accelerate set up through the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank())


def environment(device: torch.device, world: int) -> dict[str, Any]:
    """Facts recorded in a run's env.json: torch, python, platform, device, processes."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "world_size": world,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
