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
