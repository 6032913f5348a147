"""Reading the files of file-based corpora: listing, fingerprinting, sniffing, decoding."""

from __future__ import annotations

import hashlib
from pathlib import Path

BINARY_SNIFF_BYTES = 8192
"""Bytes read from the start of a file to decide whether it is binary (contains NUL)."""


def require_path(path_str: str, kind: str) -> Path:
    """The existing path of a ``KIND:PATH`` corpus spec.

    Raises:
        ValueError: no path given. FileNotFoundError: the path does not exist.
    """
    if not path_str:
        raise ValueError(f"corpus spec {kind!r} needs a path: write {kind}:PATH")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus path {str(path)!r} (from '{kind}:{path_str}') does not exist; "
            f"check the path or create the file"
        )
    return path


def is_hidden(relative: Path) -> bool:
    """True when any part of a relative path starts with a dot."""
    return any(part.startswith(".") for part in relative.parts)


def list_files(root: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Regular files under ``root`` (recursively), skipping hidden ones, sorted by relative path."""
    if root.is_file():
        return [root]
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if is_hidden(relative) or not path.is_file():
            continue
        if suffixes is not None and not path.name.endswith(suffixes):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def files_fingerprint(root: Path, files: list[Path]) -> str:
    """Relative names, sizes and modification times of ``files``, hashed."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        relative = path.name if root.is_file() else path.relative_to(root).as_posix()
        digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def relative_key(root: Path, path: Path) -> str:
    """A file's document key: its name when ``root`` is a file, else its path under ``root``."""
    return path.name if root.is_file() else path.relative_to(root).as_posix()


def is_binary(path: Path) -> bool:
    """True when the first ``BINARY_SNIFF_BYTES`` of the file hold a NUL byte."""
    with path.open("rb") as handle:
        return b"\x00" in handle.read(BINARY_SNIFF_BYTES)


def read_text(path: Path) -> str:
    """The file as UTF-8 text (undecodable bytes replaced)."""
    return path.read_text(encoding="utf-8", errors="replace")
