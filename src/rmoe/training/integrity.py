"""Integrity of saved models and checkpoints: manifests, verification, stale temporaries, faults.

Every checkpoint directory (``RUN/checkpoints/step-N/``) and the run-level model (the files
:func:`~rmoe.training.checkpoint.publish_model` copies into ``RUN/``) holds a ``manifest.json``:

.. code-block:: json

    {"format": "rmoe-manifest/1",
     "files": {"model.safetensors": {"size": 123456, "sha256": "9f86d0..."}, ...}}

A checkpoint's manifest is written inside its temporary directory before the directory is
renamed into place; the run-level manifest is published after the files it lists. A directory
without a manifest (an older run, a model imported from transformers) is *unverified*, not
damaged: only the headers of its ``*.safetensors`` files are checked (a truncated file or a
damaged header is still found, a flipped byte inside the tensor data is not).

Fault injection (tests and ``benchmarks/soak.py``): the checkpointer calls :func:`fault_point`
at each stage of a save. With ``RMOE_FAULT=<stage>`` (one of :data:`FAULT_STAGES`, or several
separated by commas) the process SIGKILLs itself there (``RMOE_FAULT_ACTION=kill``, the default)
or raises ``OSError(ENOSPC)`` (``RMOE_FAULT_ACTION=enospc``); ``RMOE_FAULT_STEP=N`` limits the
fault to the save of step N. Nothing else reads these variables.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "rmoe-manifest/1"
FAULT_STAGES = ("model", "state", "manifest", "rename", "publish")
"""Where a save can be interrupted: after the weights, after the trainer state, after the
manifest's temporary file, just before the checkpoint's rename, in the middle of publishing."""
_CHUNK = 1 << 20
_TMP_CKPT = re.compile(r"^\.tmp-step-\d+-(?:(\d+)-)?")
_TMP_FILE = re.compile(r"^\.(.+?)(?:\.(\d+))?\.tmp$")
_ST_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
    "F8_E8M0": 1,
}  # fmt: skip
_verified: dict[tuple, Verdict] = {}


class IntegrityError(ValueError):
    """A checkpoint or saved model is damaged; the message names the file and what to use."""


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


@dataclass
class Verdict:
    """The result of checking one directory.

    Attributes:
        path: the directory.
        ok: nothing wrong was found.
        verified: a manifest was present and every listed file matched it.
        problems: ``"file: what is wrong"`` for each damaged or missing file.
        files: the number of files checked.
    """

    path: Path
    ok: bool
    verified: bool
    problems: list[str] = field(default_factory=list)
    files: int = 0

    def describe(self) -> str:
        """One line: ``ok (...)`` or the first problems."""
        if self.ok:
            how = "manifest verified" if self.verified else "no manifest: safetensors headers ok"
            return f"ok ({self.files} files, {how})"
        more = f" (+{len(self.problems) - 2} more)" if len(self.problems) > 2 else ""
        return "damaged: " + "; ".join(self.problems[:2]) + more


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, int | str]:
    """``{"size": bytes, "sha256": hex}`` of one file."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(
    directory: Path,
    entries: dict[str, dict] | None = None,
    step: int | None = None,
    stage: str | None = "manifest",
) -> Path:
    """Write ``directory/manifest.json`` atomically (temporary file, fsync, rename).

    Args:
        directory: the folder the manifest describes.
        entries: ``{file name: file_entry}``; None hashes every regular file of the folder
            (temporaries and the manifest itself excepted).
        step, stage: the checkpoint's step and the :func:`fault_point` stage between the
            temporary file and the rename (None: no fault point).
    """
    directory = Path(directory)
    if entries is None:
        entries = {
            p.name: file_entry(p)
            for p in sorted(directory.iterdir())
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
        }
    body = json.dumps({"format": FORMAT, "files": entries}, indent=1, sort_keys=True)
    tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(body + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if stage is not None:
        fault_point(stage, step)
    os.replace(tmp, directory / MANIFEST)
    return directory / MANIFEST


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The ``files`` table of ``directory/manifest.json``, or None when there is none.

    Raises:
        IntegrityError: the manifest exists but cannot be read.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a table")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path}: unreadable manifest ({exc})") from exc
    return files


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header and length, or None.

    Checks the 8-byte header length, that the JSON header parses, that every tensor's dtype,
    shape and byte range agree, and that the ranges cover the data exactly (which finds a
    truncated or extended file)."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors header (truncated)"
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8 or n > 100_000_000:
            return f"header length {n} exceeds the file's {size} bytes (truncated or damaged)"
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "damaged header (not valid JSON)"
    if not isinstance(header, dict):
        return "damaged header (not a JSON object)"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            itemsize = _ST_DTYPES.get(info["dtype"])  # an unknown (newer) dtype: sizes unchecked
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return f"damaged header entry for tensor {name!r}"
        if end < start or (itemsize is not None and end - start != numel * itemsize):
            return f"damaged header: tensor {name!r} has {end - start} bytes for its shape"
        spans.append((start, end))
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            return "damaged header: tensor byte ranges overlap or leave gaps"
        pos = end
    if pos != size - 8 - n:
        have = size - 8 - n
        kind = "truncated" if have < pos else "longer than its header says"
        return f"{kind}: {have} data bytes, header says {pos}"
    return None


def _signature(directory: Path) -> tuple:
    stats = []
    for p in sorted(directory.iterdir()):
        if p.is_file():
            st = p.stat()
            stats.append((p.name, st.st_size, st.st_mtime_ns))
    return (str(directory.resolve()), tuple(stats))


def verify_dir(directory: str | Path, use_cache: bool = True) -> Verdict:
    """Check a checkpoint or model directory against its manifest (or, without one, the
    headers of its safetensors files). Results are cached per (names, sizes, mtimes)."""
    directory = Path(directory)
    key = _signature(directory)
    if use_cache and key in _verified:
        return _verified[key]
    problems: list[str] = []
    try:
        entries = read_manifest(directory)
    except IntegrityError as exc:
        return Verdict(directory, False, False, [f"{MANIFEST}: {exc.__cause__}"])
    if entries is None:
        files = sorted(directory.glob("*.safetensors"))
        for f in files:
            if (why := safetensors_problem(f)) is not None:
                problems.append(f"{f.name}: {why}")
        verdict = Verdict(directory, not problems, False, problems, len(files))
    else:
        for name, want in sorted(entries.items()):
            p = directory / name
            if not p.is_file():
                problems.append(f"{name}: missing")
                continue
            size = p.stat().st_size
            if size != want.get("size"):
                problems.append(f"{name}: {size} bytes, the manifest says {want.get('size')}")
            elif sha256_file(p) != want.get("sha256"):
                problems.append(f"{name}: contents changed (SHA-256 differs from the manifest)")
        verdict = Verdict(directory, not problems, True, problems, len(entries))
    if verdict.ok:
        _verified[key] = verdict
    return verdict


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """``RUN/checkpoints/step-N`` folders (complete or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = re.match(r"^step-(\d+)$", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def newest_intact_checkpoint(run_dir: Path, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint of a run that passes :func:`verify_dir` (not ``exclude``)."""
    for ck in reversed(checkpoint_dirs(run_dir)):
        if exclude is not None and ck.resolve() == Path(exclude).resolve():
            continue
        if (ck / "config.json").is_file() and verify_dir(ck).ok:
            return ck
    return None


def run_dir_of(model_dir: Path) -> Path | None:
    """The run directory a model directory belongs to (itself or ``RUN/checkpoints/step-N``)."""
    model_dir = Path(model_dir)
    if model_dir.parent.name == "checkpoints":
        return model_dir.parent.parent
    if (model_dir / "checkpoints").is_dir():
        return model_dir
    return None


def damage_message(verdict: Verdict) -> str:
    """One line: which file of which directory is damaged, and the newest intact checkpoint."""
    run = run_dir_of(verdict.path)
    alt = newest_intact_checkpoint(run, exclude=verdict.path) if run is not None else None
    what = "; ".join(verdict.problems[:2])
    if alt is not None:
        fix = f"use the newest intact checkpoint instead: {alt}"
    elif run is not None:
        fix = "no intact checkpoint of this run is left; restore the files or retrain"
    else:
        fix = "restore the files (copy, download or export the model again)"
    names = {p.split(":", 1)[0] for p in verdict.problems}
    if names and all(n.endswith(".json") and n != MANIFEST for n in names):
        edited = ", ".join(sorted(names))
        fix += f" (if you edited {edited} on purpose, delete {MANIFEST} to load it unverified)"
    return f"{verdict.path} is damaged: {what}; {fix}"


def require_intact(directory: str | Path) -> Verdict:
    """:func:`verify_dir`, raising :class:`IntegrityError` (one line) on damage."""
    verdict = verify_dir(directory)
    if not verdict.ok:
        raise IntegrityError(damage_message(verdict))
    return verdict


def verify_run(path: str | Path) -> list[Verdict]:
    """Check every checkpoint of a run and its run-level model; or one model directory.

    Raises:
        FileNotFoundError: the path is missing or holds neither a model nor checkpoints.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; give a run or model directory")
    items = checkpoint_dirs(path)
    if (path / "config.json").is_file() or (path / MANIFEST).is_file():
        items.append(path)
    if not items:
        raise FileNotFoundError(
            f"{path} holds no model (config.json) and no checkpoints/step-N; give a run "
            "directory or a saved model directory"
        )
    return [verify_dir(p, use_cache=False) for p in items]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes nothing while it starts
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(run_dir: str | Path) -> list[Path]:
    """Remove what a killed save left behind: ``checkpoints/.tmp-step-*`` folders and
    ``RUN/.<file>.tmp`` files of published names, unless the PID in their name is alive.
    Returns the removed paths (each is also logged)."""
    run_dir = Path(run_dir)
    removed: list[Path] = []
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            m = _TMP_CKPT.match(p.name)
            if m and not (m.group(1) and _pid_alive(int(m.group(1)))):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    published = {MANIFEST, "config.json", "generation_config.json"}
    for ck in checkpoint_dirs(run_dir):
        published |= {f.name for f in ck.iterdir() if f.is_file()}
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _TMP_FILE.match(p.name)
            if (
                m
                and p.is_file()
                and (m.group(1) in published or m.group(1).endswith(".safetensors"))
            ):
                if not (m.group(2) and _pid_alive(int(m.group(2)))):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    for p in removed:
        log.warning("removed %s (left by an interrupted save)", p)
    return removed


def fault_point(stage: str, step: int | None = None) -> None:
    """Kill this process or raise ENOSPC at ``stage`` when ``RMOE_FAULT`` names it (module doc).

    Raises:
        OSError: ``RMOE_FAULT_ACTION=enospc`` at the named stage.
    """
    wanted = os.environ.get("RMOE_FAULT")
    if not wanted or stage not in wanted.split(","):
        return
    at_step = os.environ.get("RMOE_FAULT_STEP")
    if at_step and str(step) != at_step.strip():
        return
    action = os.environ.get("RMOE_FAULT_ACTION", "kill")
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected at {stage})")
    if action != "kill":
        raise ValueError(f"RMOE_FAULT_ACTION={action!r}: expected kill or enospc")
    os.kill(os.getpid(), signal.SIGKILL)
