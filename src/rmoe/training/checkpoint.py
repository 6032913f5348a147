"""Atomic checkpoints and exact resume.

Layout of a run directory:
    config.yaml            resolved TrainConfig
    env.json               torch / python / device facts
    metrics.jsonl          one JSON record per logged step and per evaluation
    config.json, model.safetensors, generation_config.json, tokenizer files
                           the latest model in save_pretrained format (loadable with
                           AutoModelForCausalLM.from_pretrained(run_dir) and AutoTokenizer)
                           and manifest.json (sizes and SHA-256 of those files, published last)
    checkpoints/step-0000100/
        config.json, model.safetensors, tokenizer files, trainer_state.pt, manifest.json

Every checkpoint is written into a temporary directory ``.tmp-step-N-<pid>-*`` (files, manifest,
fsync) and renamed into place, so a crash or Ctrl-C at any moment leaves the previous checkpoint
intact; what a killed save leaves behind is removed when the run next starts
(:func:`~rmoe.training.integrity.clean_stale`). A write error (a full disk) removes the partial
checkpoint and raises :class:`~rmoe.training.integrity.CheckpointWriteError`. ``--resume``
continues from the newest checkpoint that passes its manifest (:func:`resume_checkpoint`). trainer_state.pt holds only tensors and
plain Python values and is read with torch.load(weights_only=True).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .integrity import (
    MANIFEST,
    CheckpointWriteError,
    IntegrityError,
    Verdict,
    checkpoint_dirs,
    clean_stale,
    damage_message,
    fault_point,
    file_entry,
    newest_intact_checkpoint,
    read_manifest,
    require_intact,
    verify_dir,
    write_manifest,
)

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"
WRITE_ERROR_POLICIES = ("stop", "continue")
"""What :class:`Checkpointer` does when a save fails (``on_write_error``)."""


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


def _fsync_dir_files(directory: Path) -> None:
    """Flush every file of a folder to disk (so the rename publishes complete files)."""
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _write_files(
    tmp: Path, step: int, model, tokenizer, state: dict[str, Any], model_sd: dict | None
) -> None:
    """The checkpoint's files in their temporary folder, with the fault points between them."""
    if model_sd is not None:
        model.save_pretrained(tmp, state_dict=model_sd, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(tmp)
    fault_point("model", step)
    torch.save(state, tmp / STATE_FILE)
    fault_point("state", step)
    _fsync_dir_files(tmp)
    write_manifest(tmp, step=step)


def _write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError; torch.save's RuntimeError; safetensors' error."""
    try:
        from safetensors import SafetensorError

        return (OSError, RuntimeError, SafetensorError)
    except ImportError:  # pragma: no cover
        return (OSError, RuntimeError)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    state: dict[str, Any],
    keep_last: int,
    model_state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically (files, manifest, fsync, rename), refresh the
    run-level model files, prune old ones.

    `model_state_dict` overrides the model's own (e.g. the gathered full state of an FSDP model).

    Raises:
        CheckpointWriteError: a file could not be written (e.g. a full disk); the partial
            checkpoint is removed and the previous ones are untouched.
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    final = root / f"step-{step:07d}"
    previous = latest_checkpoint(run_dir)
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:07d}-{os.getpid()}-", dir=root))
        _write_files(tmp, step, model, tokenizer, state, model_state_dict)
        fault_point("rename", step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except _write_errors() as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = (
            f"the previous checkpoint {previous} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointWriteError(
            f"could not write checkpoint {final.name} in {root}: {_one_line(exc)}; removed the "
            f"partial checkpoint; {prev}. {_fix(exc)}, then continue with --resume"
        ) from exc
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        publish_model(final, run_dir, step)
    except _write_errors() as exc:
        raise CheckpointWriteError(
            f"checkpoint {final} is saved, but the run-level model in {run_dir} could not be "
            f"updated: {_one_line(exc)}. {_fix(exc)}, then continue with --resume (it "
            "republishes the model)"
        ) from exc
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fix(exc: BaseException) -> str:
    import errno

    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in str(exc)
    return "Free disk space" if full else "Fix the cause"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def published_files(src: Path) -> list[Path]:
    """The files of a checkpoint that belong to the run-level model (all but the trainer
    state, the manifest and temporaries)."""
    return [
        f
        for f in sorted(Path(src).iterdir())
        if f.is_file() and f.name not in (STATE_FILE, MANIFEST) and not f.name.startswith(".")
    ]


def publish_model(src: Path, run_dir: Path, step: int | None = None) -> None:
    """Copy a checkpoint's model and tokenizer files to the run directory, file by file
    atomically (copy to ``.<name>.<pid>.tmp``, then rename), then its manifest last.

    While the files change, the run-level manifest still describes the previous model, so an
    interrupted publish is found as damage (and repaired on the next start) rather than
    loaded as a mix of two steps."""
    src, run_dir = Path(src), Path(run_dir)
    files = published_files(src)
    entries = read_manifest(src)
    pid = os.getpid()
    for i, f in enumerate(files):
        tmp = run_dir / f".{f.name}.{pid}.tmp"
        try:
            shutil.copyfile(f, tmp)
            if i == 0:
                fault_point("publish", step)
            os.replace(tmp, run_dir / f.name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    if entries is None or any(f.name not in entries for f in files):
        entries = {f.name: file_entry(run_dir / f.name) for f in files}
    write_manifest(run_dir, {f.name: entries[f.name] for f in files}, stage=None)


@dataclass
class ResumeChoice:
    """Which checkpoint a resume continues from.

    Attributes:
        checkpoint: the newest intact checkpoint, or None when the run has none.
        skipped: the newer checkpoints found damaged (with what is wrong).
    """

    checkpoint: Path | None
    skipped: list[Verdict] = field(default_factory=list)

    def notes(self) -> list[str]:
        """One line per skipped checkpoint."""
        to = self.checkpoint.name if self.checkpoint is not None else "none"
        return [
            f"checkpoint {v.path.name} is damaged ({'; '.join(v.problems[:2])}); resuming "
            f"from {to} instead"
            for v in self.skipped
        ]


def choose_resume_checkpoint(run_dir: str | Path) -> ResumeChoice:
    """The newest checkpoint that passes verification; damaged newer ones are listed."""
    skipped = []
    for ck in reversed(checkpoint_dirs(Path(run_dir))):
        verdict = verify_dir(ck)
        for need in (STATE_FILE, "config.json"):
            if not (ck / need).is_file() and f"{need}: missing" not in verdict.problems:
                verdict = Verdict(
                    ck, False, verdict.verified, [*verdict.problems, f"{need}: missing"]
                )
        if verdict.ok:
            return ResumeChoice(ck, skipped)
        skipped.append(verdict)
    return ResumeChoice(None, skipped)


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newest intact one (a warning names each
    damaged newer one), or None when the run has no checkpoint.

    Raises:
        IntegrityError: every checkpoint of the run is damaged.
    """
    choice = choose_resume_checkpoint(run_dir)
    if choice.checkpoint is None and choice.skipped:
        newest = choice.skipped[0]
        raise IntegrityError(
            f"--resume: every checkpoint of {run_dir} is damaged (newest: {newest.path.name}: "
            f"{'; '.join(newest.problems[:2])}); start a new run or restore the files"
        )
    for note in choice.notes():
        log.warning("%s", note)
    return choice.checkpoint


def repair_published(run_dir: str | Path) -> Path | None:
    """Republish the newest intact checkpoint when the run-level model fails its manifest
    (an interrupted publish); returns the checkpoint used, or None when nothing was done."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file() or verify_dir(run_dir).ok:
        return None
    ck = newest_intact_checkpoint(run_dir)
    if ck is None:
        return None
    publish_model(ck, run_dir)
    log.warning("the run-level model in %s was damaged; republished it from %s", run_dir, ck)
    return ck


def load_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.pt of a checkpoint (weights_only: no arbitrary pickles).

    Raises:
        FileNotFoundError: no trainer_state.pt.
        IntegrityError: the checkpoint fails its manifest, or the file cannot be read.
    """
    ckpt = Path(ckpt)
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a checkpoint: {STATE_FILE} is missing")
    require_intact(ckpt)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        verdict = Verdict(ckpt, False, False, [f"{STATE_FILE}: unreadable ({_one_line(exc)})"])
        raise IntegrityError(damage_message(verdict)) from exc


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
        on_write_error: what a failed save (e.g. a full disk) does: ``stop`` raises
            :class:`~rmoe.training.integrity.CheckpointWriteError` (one line; the previous
            checkpoint is intact, the partial one removed); ``continue`` logs a warning,
            records ``(step, message)`` in ``failed_saves`` and tries again at the next save.

    Constructing one on the main process removes what an interrupted save of this run left
    behind (``cleaned``) and republishes the run-level model when it fails its manifest
    (``republished``).
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
        on_write_error: str = "stop",
    ) -> None:
        self.run_dir, self.model, self.optimizer = Path(run_dir), model, optimizer
        self.scheduler, self.sampler, self.tokenizer = scheduler, sampler, tokenizer
        self.config, self.keep_last, self.fsdp, self.is_main = config, keep_last, fsdp, is_main
        if on_write_error not in WRITE_ERROR_POLICIES:
            raise ValueError(
                f"on_write_error={on_write_error!r}: expected one of {WRITE_ERROR_POLICIES}"
            )
        self.on_write_error = on_write_error
        self.failed_saves: list[tuple[int, str]] = []
        self.cleaned: list[Path] = []
        self.republished: Path | None = None
        if is_main:
            self.cleaned = clean_stale(self.run_dir)
            self.republished = repair_published(self.run_dir)

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
        try:
            return save_checkpoint(
                self.run_dir, step, self.model, self.tokenizer, state, self.keep_last, model_sd
            )
        except CheckpointWriteError as exc:
            if self.on_write_error == "stop":
                raise
            self.failed_saves.append((step, str(exc)))
            log.warning("%s; training continues and tries again at the next save", exc)
            return None

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
