"""The metrics writer: ``metrics.jsonl`` (one JSON record per line) and TensorBoard events."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl`` (flushed per record) and mirrors their
    numbers to TensorBoard when it is installed (lists as ``name/layerI``).

    A writer with ``enabled=False`` (non-main processes) writes nothing. With ``continue_from=S``
    (a resume from step S) the records of steps after S, written by the run before it stopped,
    are dropped first (the file is rewritten atomically) and TensorBoard purges its events after
    S, so the logs continue from the checkpoint with each step once.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        continue_from: int | None = None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        if enabled and continue_from is not None:
            truncate_records(self.path, continue_from)
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115
        purge = continue_from + 1 if continue_from is not None else None
        self._tb = _tensorboard(Path(run_dir), purge) if enabled and tensorboard else None

    def write(self, rec: dict[str, Any]) -> None:
        """Write one record (it must hold ``step``)."""
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, rec["step"])
                elif isinstance(v, list):
                    for i, vi in enumerate(v):
                        self._tb.add_scalar(f"{k}/layer{i}", vi, rec["step"])

    def close(self) -> None:
        """Close the file and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a line that is not a JSON object, such as the
    half-written last line of a killed run, is skipped); ``[]`` when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_records(path: str | Path, step: int) -> int:
    """Drop the records of ``path`` whose step is after ``step`` (and unreadable lines),
    rewriting the file atomically (temporary file + ``os.replace``); returns how many went."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped == 0:
        return 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{line}\n" for line in kept))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("metrics.jsonl: dropped %d record(s) after step %d (replayed from there)",
             dropped, step)  # fmt: skip
    return dropped


def _tensorboard(run_dir: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
    except Exception:  # noqa: BLE001 - tensorboard is optional
        log.debug("tensorboard unavailable", exc_info=True)
        return None
