"""The token cache: one tokenised split as a memory-mapped numpy array on disk.

A split's documents are encoded and concatenated, each followed by the EOS id::

    doc_1 <eos> doc_2 <eos> ... doc_n <eos>

and stored as ``<name>.bin`` (raw uint16 ids when the vocabulary has at most 65536 ids, else
uint32) next to ``<name>.json`` (counts and provenance). ``<name>`` ends with a hash of the corpus
spec, text field, corpus fingerprint (file list, sizes, modification times), the serialized
tokenizer and the split, so a change to any of them makes a new entry. Both files are written to a
temporary name (flushed to disk) and moved into place with ``os.replace``; the JSON is written
last, so an entry whose JSON exists is complete. Several processes may build the same split at
once: each writes its own temporary files and the last ``os.replace`` wins with identical bytes;
a reader maps whichever complete ``.bin`` is in place (an array mapped before a replace keeps the
old, equal, file). A ``.bin`` whose size does not match its JSON (a truncated copy) is rebuilt.

The cache directory is, in order: the ``cache_dir`` argument, the ``RMOE_CACHE_DIR`` environment
variable (the token directory itself), ``~/.cache/rmoe/tokens``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from rmoe.data.corpora import Corpus, Document, check_split, document_n_bytes, get_corpus
from rmoe.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "RMOE_CACHE_DIR"
"""Environment variable naming the token-cache directory."""

CACHE_FORMAT_VERSION = 1
"""Bumped when the on-disk layout or the joining rule changes (old entries are then ignored)."""

# Documents encoded per call of the (parallel) backend, and the longest piece of one document
# sent to it at once (long documents are cut at line ends; see _pieces).
_ENCODE_BATCH = 512
_MAX_PIECE_CHARS = 1 << 20


def default_cache_dir() -> Path:
    """``$RMOE_CACHE_DIR`` if set, else ``~/.cache/rmoe/tokens``."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path("~/.cache/rmoe/tokens").expanduser()


@dataclass(frozen=True)
class TokenSplit:
    """One tokenised split.

    Attributes:
        tokens: read-only memory-mapped ids, shape ``[n_tokens]``, dtype uint16 or uint32.
        n_tokens: number of ids (the EOS separators included).
        n_bytes: UTF-8 bytes of the split's documents (separators excluded).
        n_documents: number of documents.
        path: the ``.bin`` file.
    """

    tokens: np.ndarray
    n_tokens: int
    n_bytes: int
    n_documents: int
    path: Path

    @property
    def bytes_per_token(self) -> float:
        """Average bytes of text per token (about 1 for the byte tokenizer, 3-4 for BPE)."""
        return self.n_bytes / self.n_tokens

    @property
    def tokens_per_byte(self) -> float:
        """``n_tokens / n_bytes``."""
        return self.n_tokens / self.n_bytes

    def bits_per_byte(self, loss_nats: float) -> float:
        """Bits per byte from a mean per-token loss in nats: ``loss / ln 2 * tokens / bytes``."""
        return loss_nats / math.log(2) * self.tokens_per_byte

    def __len__(self) -> int:
        return self.n_tokens


def cache_key(corpus: Corpus, tokenizer: Tokenizer, split: str) -> str:
    """The hex digest identifying ``split`` of ``corpus`` tokenised by ``tokenizer``."""
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "corpus": corpus.spec,
        "text_field": corpus.text_field,
        "fingerprint": corpus.fingerprint(),
        "tokenizer": tokenizer.to_json(),
        "split": split,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _entry_name(corpus: Corpus, split: str, key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.spec).strip("_")[-48:]
    return f"{readable}.{split}.{key}"


def get_split_tokens(
    corpus: Corpus | str,
    tokenizer: Tokenizer,
    split: str,
    cache_dir: str | Path | None = None,
    text_field: str = "text",
) -> TokenSplit:
    """The tokens of ``split`` of ``corpus``, from the cache or built (and cached) now.

    Args:
        corpus: a :class:`Corpus` or a corpus spec (opened with ``text_field``).
        tokenizer: the tokenizer; its EOS id separates documents.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        cache_dir: where entries live; default :func:`default_cache_dir`.

    Raises:
        ValueError: the split has no documents (and everything :func:`get_corpus` raises).
    """
    check_split(split)
    if isinstance(corpus, str):
        corpus = get_corpus(corpus, text_field=text_field)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(corpus, tokenizer, split)
    name = _entry_name(corpus, split, key)
    bin_path, meta_path = directory / f"{name}.bin", directory / f"{name}.json"
    cached = _open_entry(bin_path, meta_path)
    if cached is not None:
        logger.debug("token cache hit: %s", bin_path)
        return cached
    documents = corpus.documents(split)
    if not documents:
        raise ValueError(
            f"split {split!r} of corpus {corpus.spec!r} has no documents; use a larger corpus "
            f"(about 5% of the documents go to each of valid and test)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("tokenising %s split %r (%d documents)", corpus.spec, split, len(documents))
    meta = _write_tokens(documents, tokenizer, bin_path)
    meta.update(
        format=CACHE_FORMAT_VERSION,
        key=key,
        corpus=corpus.spec,
        text_field=corpus.text_field,
        split=split,
        tokenizer=repr(tokenizer),
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
    )
    _atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    entry = _open_entry(bin_path, meta_path)
    if entry is None:  # pragma: no cover - only if another process corrupts the entry
        raise ValueError(f"token cache entry {bin_path} could not be read back after writing")
    return entry


def _open_entry(bin_path: Path, meta_path: Path) -> TokenSplit | None:
    """The entry if both files exist and agree, else None."""
    if not (meta_path.is_file() and bin_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        n_tokens = int(meta["n_tokens"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        logger.warning("ignoring unreadable token cache metadata %s", meta_path)
        return None
    if meta.get("format") != CACHE_FORMAT_VERSION or n_tokens <= 0:
        return None
    if bin_path.stat().st_size != n_tokens * dtype.itemsize:
        logger.warning("ignoring token cache entry %s: its size does not match", bin_path)
        return None
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    return TokenSplit(
        tokens=tokens,
        n_tokens=n_tokens,
        n_bytes=int(meta["n_bytes"]),
        n_documents=int(meta["n_documents"]),
        path=bin_path,
    )


def _write_tokens(
    documents: Sequence[Document], tokenizer: Tokenizer, path: Path
) -> dict[str, Any]:
    """Encode ``documents`` into ``path`` (atomically); return the counts for the metadata."""
    dtype = np.dtype(tokenizer.token_dtype)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    n_tokens = 0
    n_bytes = 0
    with _atomic_binary(path) as handle:
        for start in range(0, len(documents), _ENCODE_BATCH):
            batch = documents[start : start + _ENCODE_BATCH]
            n_bytes += sum(document_n_bytes(document) for document in batch)
            for ids in _encode_documents(batch, tokenizer):
                ids.astype(dtype, copy=False).tofile(handle)
                eos.tofile(handle)
                n_tokens += len(ids) + 1
    return {
        "dtype": dtype.name,
        "n_tokens": n_tokens,
        "n_bytes": n_bytes,
        "n_documents": len(documents),
    }


def _encode_documents(documents: Sequence[Document], tokenizer: Tokenizer) -> Iterator[np.ndarray]:
    """Ids of each document, shape ``[n_i]``. Non-byte tokenizers get long documents in pieces
    cut after a newline (the ids can then differ from one-piece encoding at the cuts only)."""
    if tokenizer.is_bytes:
        for document in documents:
            yield tokenizer.encode_array(document)
        return
    pieces: list[str] = []
    owners: list[int] = []
    for index, document in enumerate(documents):
        for piece in _pieces(document):
            pieces.append(piece)
            owners.append(index)
    encoded = tokenizer.encode_batch(pieces)
    by_document: list[list[np.ndarray]] = [[] for _ in documents]
    for owner, ids in zip(owners, encoded):
        by_document[owner].append(ids)
    for parts in by_document:
        yield np.concatenate(parts) if parts else np.zeros(0, dtype=tokenizer.token_dtype)


def _pieces(document: Document) -> list[str]:
    """``document`` as text, in pieces of at most about ``_MAX_PIECE_CHARS`` characters cut
    after a newline where there is one."""
    text = document.decode("utf-8", errors="replace") if isinstance(document, bytes) else document
    pieces = []
    start = 0
    while len(text) - start > _MAX_PIECE_CHARS:
        end = text.rfind("\n", start, start + _MAX_PIECE_CHARS) + 1
        if end <= start:
            end = start + _MAX_PIECE_CHARS
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


@contextlib.contextmanager
def _atomic_binary(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file next to ``path``, moved onto ``path`` with
    ``os.replace`` when the block succeeds and deleted when it fails."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    with _atomic_binary(path) as handle:
        handle.write(text.encode("utf-8"))
