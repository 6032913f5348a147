"""The metrics writer: ``metrics.jsonl`` (one JSON record per line) and TensorBoard events."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends records to ``run_dir/metrics.jsonl`` (flushed per record) and mirrors their
    numbers to TensorBoard when it is installed (lists as ``name/layerI``).

    A writer with ``enabled=False`` (non-main processes) writes nothing.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a") if enabled else None  # noqa: SIM115
        self._tb = _tensorboard(Path(run_dir)) if enabled and tensorboard else None

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


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(str(run_dir / "tb"))
    except Exception:  # noqa: BLE001 - tensorboard is optional
        log.debug("tensorboard unavailable", exc_info=True)
        return None
