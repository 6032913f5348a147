"""One trainer per run directory: an exclusive lock on ``RUN/.lock``.

The lock is an ``fcntl.flock`` on the file, so the kernel releases it when the holder exits, is
killed or crashes; the file also records the holder's PID and host for the message a second
trainer gets. A lock file left behind by a process that died (nothing holds the flock any more)
is taken over, and that is logged. On systems without ``fcntl`` (Windows) the directory is not
locked.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
"""The lock file's name inside a run directory."""


class RunLockedError(ValueError):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on a run directory; a context manager (``with RunLock(run_dir):``).

    Args:
        run_dir: the run directory (created if missing; removed again on release when the
            lock created it and nothing else was written there, e.g. a failed ``--resume``).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` naming the holder's PID at once."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            log.warning("run directory locking needs fcntl; %s is not locked", self.run_dir)
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(
                f"run directory {self.run_dir} is a file, not a folder; pass the path of a new "
                "or empty folder"
            )
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.run_dir} is in use by another trainer ({holder}); wait for it to "
                    f"finish or stop it, or choose another --out"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and flock: retry
        previous = _read_holder(fd)
        if previous != "unknown holder":
            log.warning("took over the lock of %s left by %s (no longer running)",
                        self.run_dir, previous)  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
        for folder in self._created:  # folders this lock made that stayed empty
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote files) or already gone
                break
        self._created = []

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """``PID N on HOST`` from the lock file's contents, or ``unknown holder``."""
    try:
        fields = dict(
            item.split("=", 1) for item in os.pread(fd, 256, 0).decode().split() if "=" in item
        )
    except (OSError, UnicodeDecodeError, ValueError):
        return "unknown holder"
    if "pid" not in fields:
        return "unknown holder"
    return f"PID {fields['pid']} on {fields.get('host', 'an unknown host')}"


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
