"""Atomic checkpoints and exact resume.

Layout of a run directory:
    config.yaml            resolved TrainConfig
    env.json               torch / python / device facts
    metrics.jsonl          one JSON record per logged step and per evaluation
    config.json, model.safetensors, generation_config.json, tokenizer files
                           the latest model in save_pretrained format (loadable with
                           AutoModelForCausalLM.from_pretrained(run_dir) and AutoTokenizer)
    checkpoints/step-0000100/
        config.json, model.safetensors, tokenizer files, trainer_state.pt

Every checkpoint is written into a temporary directory and renamed into place, so a crash or
Ctrl-C at any moment leaves the previous checkpoint intact. trainer_state.pt holds only tensors and
plain Python values and is read with torch.load(weights_only=True).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

_STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / "config.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    state: dict[str, Any],
    keep_last: int,
    model_state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically, refresh the run-level model files, prune old ones.

    `model_state_dict` overrides the model's own (e.g. the gathered full state of an FSDP model)."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:07d}-", dir=root))
    try:
        if model_state_dict is not None:
            model.save_pretrained(tmp, state_dict=model_state_dict, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_model(final, run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def publish_model(src: Path, run_dir: Path) -> None:
    """Copy a checkpoint's model and tokenizer files to the run directory, file by file
    atomically (copy to a temporary name, then rename)."""
    for f in src.iterdir():
        if f.name == STATE_FILE or not f.is_file():
            continue
        tmp = run_dir / f".{f.name}.tmp"
        shutil.copyfile(f, tmp)
        os.replace(tmp, run_dir / f.name)


def load_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint (weights_only: no arbitrary pickles)."""
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint: {STATE_FILE} is missing")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer touches."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype("int64")),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: model, optimizer,
    schedule, sampler position, RNG streams and the config.

    Under FSDP :meth:`save` gathers the full (unsharded) states on every rank (a collective)
    and only the main process writes; :meth:`restore` loads a full optimizer state into the
    sharded optimizer.

    Args:
        run_dir: the run directory (checkpoints go to ``run_dir/checkpoints/step-N``).
        model: the unwrapped model (its ``save_pretrained`` writes the weights).
        optimizer, scheduler, sampler: objects with ``state_dict`` / ``load_state_dict``.
        tokenizer: saved with every checkpoint.
        config: the run config as a dict (stored in the state, checked on resume).
        keep_last: checkpoints kept after pruning.
        fsdp: the model is sharded with FSDP.
        is_main: this process writes files.
    """

    def __init__(
        self,
        run_dir: Path,
        model,
        optimizer,
        scheduler,
        sampler,
        tokenizer,
        config: dict[str, Any],
        keep_last: int,
        fsdp: bool = False,
        is_main: bool = True,
    ) -> None:
        self.run_dir, self.model, self.optimizer = Path(run_dir), model, optimizer
        self.scheduler, self.sampler, self.tokenizer = scheduler, sampler, tokenizer
        self.config, self.keep_last, self.fsdp, self.is_main = config, keep_last, fsdp, is_main

    def _full_states(self) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        if not self.fsdp:
            return None, self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        return model_sd, get_optimizer_state_dict(self.model, self.optimizer, options=opts)

    def save(self, step: int) -> Path | None:
        """Write ``checkpoints/step-N`` atomically (main process); the path, or None elsewhere."""
        model_sd, optim_sd = self._full_states()
        if not self.is_main:
            return None
        state = {
            "step": step,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "config": self.config,
        }
        return save_checkpoint(
            self.run_dir, step, self.model, self.tokenizer, state, self.keep_last, model_sd
        )

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpoint's trainer state (the weights are loaded before wrapping); returns
        its step."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                self.model,
                self.optimizer,
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        return int(state["step"])
