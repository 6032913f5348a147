"""Corpora by name: each kind is one class, registered in :data:`CORPUS_KINDS`.

A corpus spec is a string ``KIND`` or ``KIND:ARGUMENT``::

    python-stdlib              the running interpreter's standard library (.py files), the default
    pydoc-topics               English prose about Python from ``pydoc_data.topics``
    text:PATH                  a text file, or a directory of text files (recursively)
    jsonl:PATH                 a .jsonl file or a directory of them; one document per row
    parquet:PATH               a .parquet file or a directory of them; one document per row
    hf:NAME[:CONFIG]           a Hugging Face dataset (``load_dataset``, or ``load_from_disk``
                               when NAME is a directory written by ``save_to_disk``)
    enwik8:PATH                the enwik8 file: first 90M bytes train, next 5M valid, next 5M test

Every corpus yields, per split (``"train"``, ``"valid"``, ``"test"``), a list of documents. A
document is a ``str`` except for ``enwik8``, whose documents are raw ``bytes`` so that the byte
tokenizer sees the file byte for byte.

Unless the source provides its own splits, documents are assigned to splits by a stable hash of
a key (a relative path, a row index...): see :func:`split_of` (about 90/5/5).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import sys
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rmoe.data.files import (
    files_fingerprint,
    is_binary,
    list_files,
    read_text,
    relative_key,
    require_path,
)

logger = logging.getLogger(__name__)

Document = str | bytes
"""One document: text, or raw bytes (enwik8)."""

SPLITS: tuple[str, ...] = ("train", "valid", "test")
"""The split names every corpus answers to."""

DEFAULT_CORPUS = "python-stdlib"
"""The corpus used when none is given."""

# Directory names whose contents are tests, not library code, in the standard library.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "testmock", "site-packages", "dist-packages", "__pycache__"}
)


def split_of(key: str) -> str:
    """The split a document belongs to, from a stable hash of ``key``.

    The first 8 hex digits of ``sha1(key)`` give a number in ``[0, 2**32)``; its value modulo 100
    is the bucket: buckets 0-89 are ``"train"``, 90-94 ``"valid"``, 95-99 ``"test"``. The result
    depends only on ``key`` (not on the Python hash seed, the platform or the other documents).
    """
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < 90:
        return "train"
    if bucket < 95:
        return "valid"
    return "test"


def check_split(split: str) -> str:
    """Return ``split`` if it is a valid split name, else raise ValueError naming the choices."""
    if split not in SPLITS:
        raise ValueError(
            f"unknown split {split!r}: expected one of {', '.join(SPLITS)}"
            f"{_nearest_hint(split, SPLITS)}"
        )
    return split


def as_text(document: Document) -> str:
    """A document as text: ``bytes`` are decoded as UTF-8 (invalid bytes become U+FFFD)."""
    if isinstance(document, bytes):
        return document.decode("utf-8", errors="replace")
    return document


def document_n_bytes(document: Document) -> int:
    """Number of bytes of a document (UTF-8 for text)."""
    if isinstance(document, bytes):
        return len(document)
    return len(document.encode("utf-8"))


class Corpus(ABC):
    """A named source of documents, split into ``train``/``valid``/``test``.

    Subclasses implement :meth:`documents` and :meth:`fingerprint`. ``spec`` is the string that
    names the corpus (``"text:/data/books"``); ``text_field`` is the column read by row-based
    corpora (others ignore it).
    """

    kind: str = ""

    def __init__(self, spec: str, text_field: str = "text") -> None:
        self.spec = spec
        self.text_field = text_field

    @abstractmethod
    def documents(self, split: str) -> list[Document]:
        """The documents of ``split`` (``"train"``, ``"valid"`` or ``"test"``), in a fixed order."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes when the corpus contents may have changed (file list, sizes,
        modification times, library version...). Used in the token-cache key."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _contiguous_split(text: str, split: str) -> str:
    """Characters ``[0, 90%)`` train, ``[90%, 95%)`` valid, ``[95%, 100%)`` test."""
    n = len(text)
    bounds = {"train": (0, n * 90 // 100), "valid": (n * 90 // 100, n * 95 // 100)}
    start, end = bounds.get(split, (n * 95 // 100, n))
    return text[start:end]


def _nearest_hint(name: str, choices: Any) -> str:
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _missing_field_error(text_field: str, fields: list[str], where: str) -> ValueError:
    return ValueError(
        f"text field {text_field!r} not found in {where}; the fields that exist are "
        f"{sorted(fields)}{_nearest_hint(text_field, fields)}: pass text_field=<one of them>"
    )


# ----------------------------------------------------------------------------------------------
# corpus kinds


def stdlib_files(stdlib_dir: Path | None = None) -> list[tuple[str, Path]]:
    """``(relative posix path, absolute path)`` of the standard library's ``.py`` files.

    Test directories (``test/``, ``tests/``, ``idlelib/idle_test/``, ``lib2to3/tests/``, ...),
    ``site-packages`` and hidden paths are excluded; the list is sorted by relative path.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS and not d.startswith(".")
        ]
        for filename in filenames:
            if filename.endswith(".py"):
                path = Path(dirpath) / filename
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


class PythonStdlibCorpus(Corpus):
    """The running interpreter's standard-library ``.py`` files; one document per file.

    Split by :func:`split_of` of the relative path. ``argument`` may name another directory to
    read instead of the running interpreter's (``python-stdlib:/usr/lib/python3.12``).
    """

    kind = "python-stdlib"

    def __init__(self, spec: str, argument: str = "", text_field: str = "text") -> None:
        super().__init__(spec, text_field)
        self.root = require_path(argument, self.kind) if argument else None
        self._files = stdlib_files(self.root)
        if not self._files:
            where = self.root or sysconfig.get_paths()["stdlib"]
            raise ValueError(f"no .py files found in the standard library directory {where!r}")

    def documents(self, split: str) -> list[Document]:
        check_split(split)
        return [read_text(path) for rel, path in self._files if split_of(rel) == split]

    def fingerprint(self) -> str:
        root = Path(self.root or sysconfig.get_paths()["stdlib"])
        return sys.version + "\0" + files_fingerprint(root, [path for _, path in self._files])


class PydocTopicsCorpus(Corpus):
    """English prose about Python: ``pydoc_data.topics.topics`` (topic name -> text).

    One document per topic, split by :func:`split_of` of the topic name.
    """

    kind = "pydoc-topics"

    def __init__(self, spec: str, argument: str = "", text_field: str = "text") -> None:
        super().__init__(spec, text_field)
        if argument:
            raise ValueError(f"corpus {self.kind!r} takes no argument, got {spec!r}")
        from pydoc_data.topics import topics

        self._topics: dict[str, str] = {key: topics[key] for key in sorted(topics)}

    def documents(self, split: str) -> list[Document]:
        check_split(split)
        return [text for key, text in self._topics.items() if split_of(key) == split and text]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self._topics, sort_keys=True).encode()).hexdigest()


class TextCorpus(Corpus):
    """``text:PATH``: a text file or a directory of text files (recursively, sorted).

    Directory: one document per file, split by :func:`split_of` of the relative path; hidden
    files and binary files (a NUL byte in the first 8 KiB) are skipped. Single file: one document
    per split, the contiguous character ranges ``[0, 90%)``, ``[90%, 95%)``, ``[95%, 100%)``.
    """

    kind = "text"

    def __init__(self, spec: str, argument: str = "", text_field: str = "text") -> None:
        super().__init__(spec, text_field)
        self.path = require_path(argument, self.kind)
        self._files = [path for path in list_files(self.path) if not is_binary(path)]
        if not any(path.stat().st_size for path in self._files):
            raise ValueError(
                f"no text found at {str(self.path)!r}: expected a non-empty text file or a "
                f"directory containing non-empty text files"
            )

    def documents(self, split: str) -> list[Document]:
        check_split(split)
        if self.path.is_file():
            part = _contiguous_split(read_text(self.path), split)
            return [part] if part else []
        docs = []
        for path in self._files:
            if split_of(relative_key(self.path, path)) == split:
                text = read_text(path)
                if text:
                    docs.append(text)
        return docs

    def fingerprint(self) -> str:
        return files_fingerprint(self.path, self._files)


class _RowCorpus(Corpus):
    """Shared logic of row-based corpora: rows keyed by ``relative file:row index``."""

    suffixes: tuple[str, ...] = ()

    def __init__(self, spec: str, argument: str = "", text_field: str = "text") -> None:
        super().__init__(spec, text_field)
        self.path = require_path(argument, self.kind)
        self._files = list_files(self.path, None if self.path.is_file() else self.suffixes)
        if not self._files:
            raise ValueError(
                f"no {'/'.join(self.suffixes)} files found in directory {str(self.path)!r}"
            )
        self._cache: dict[str, list[Document]] | None = None

    @abstractmethod
    def _texts(self, path: Path) -> Iterator[str]:
        """The ``text_field`` values of the rows of one file, in order."""

    def _load(self) -> dict[str, list[Document]]:
        if self._cache is None:
            by_split: dict[str, list[Document]] = {split: [] for split in SPLITS}
            for path in self._files:
                relative = relative_key(self.path, path)
                for index, text in enumerate(self._texts(path)):
                    if text:
                        by_split[split_of(f"{relative}:{index}")].append(text)
            if not any(by_split.values()):
                raise ValueError(
                    f"no text found in field {self.text_field!r} of {str(self.path)!r}: "
                    f"every row is empty"
                )
            self._cache = by_split
        return self._cache

    def documents(self, split: str) -> list[Document]:
        check_split(split)
        return list(self._load()[split])

    def fingerprint(self) -> str:
        return files_fingerprint(self.path, self._files)


class JsonlCorpus(_RowCorpus):
    """``jsonl:PATH``: one JSON object per line; the document is the object's ``text_field``.

    Split by :func:`split_of` of ``"<relative file>:<row index>"``. Blank lines are skipped.
    """

    kind = "jsonl"
    suffixes = (".jsonl",)

    def _texts(self, path: Path) -> Iterator[str]:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}:{line_number} is not valid JSON ({error.msg}); each line of a "
                        f".jsonl file must be one JSON object"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}:{line_number} is a JSON {type(row).__name__}, expected an object "
                        f'such as {{"{self.text_field}": "..."}}'
                    )
                if self.text_field not in row:
                    raise _missing_field_error(self.text_field, list(row), f"{path}:{line_number}")
                yield _field_text(row[self.text_field], self.text_field, f"{path}:{line_number}")


class ParquetCorpus(_RowCorpus):
    """``parquet:PATH``: the ``text_field`` column of a Parquet file (or directory of them).

    Split by :func:`split_of` of ``"<relative file>:<row index>"``.
    """

    kind = "parquet"
    suffixes = (".parquet",)

    def _texts(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise ValueError(f"cannot read Parquet file {str(path)!r}: {error}") from None
        if self.text_field not in schema.names:
            raise _missing_field_error(self.text_field, list(schema.names), str(path))
        column = pq.read_table(path, columns=[self.text_field]).column(self.text_field)
        for index, value in enumerate(column.to_pylist()):
            yield _field_text(value, self.text_field, f"{path} row {index}")


def _field_text(value: Any, text_field: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"field {text_field!r} at {where} is a {type(value).__name__}, expected a string"
        )
    return value


# Names a dataset may use for our "valid" and "test" splits, in order of preference.
_HF_SPLIT_NAMES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
)


class HFCorpus(Corpus):
    """``hf:NAME[:CONFIG]``: a Hugging Face dataset's ``text_field`` column.

    NAME is a directory written by ``save_to_disk`` (loaded with ``datasets.load_from_disk``) or
    anything ``datasets.load_dataset`` accepts. The dataset's own ``validation``/``test`` splits are
    used when present; a split it lacks is carved out of ``train`` by :func:`split_of` of the row
    index (``"train:<index>"``), and those rows are removed from ``train``.
    """

    kind = "hf"

    def __init__(self, spec: str, argument: str = "", text_field: str = "text") -> None:
        super().__init__(spec, text_field)
        if not argument:
            raise ValueError("corpus spec 'hf' needs a dataset name: write hf:NAME[:CONFIG]")
        name, _, config = argument.partition(":")
        self.name = name
        self.config = config or None
        self._splits = self._load_splits()
        for split_name, dataset in self._splits.items():
            if self.text_field not in dataset.column_names:
                raise _missing_field_error(
                    self.text_field, list(dataset.column_names), f"{spec} split {split_name!r}"
                )
        if "train" not in self._splits:
            raise ValueError(
                f"dataset {spec!r} has no 'train' split; it has {sorted(self._splits)}"
            )

    def _load_splits(self) -> dict[str, Any]:
        import datasets

        path = Path(self.name).expanduser()
        if path.is_dir() and (
            (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        ):
            loaded = datasets.load_from_disk(str(path))
        else:
            if _looks_like_path(self.name) and not path.exists():
                raise FileNotFoundError(
                    f"dataset directory {self.name!r} (from {self.spec!r}) does not exist"
                )
            loaded = _load_hub_dataset(datasets, self.name, self.config, self.spec)
        if isinstance(loaded, datasets.Dataset):
            return {"train": loaded}
        return dict(loaded)

    def _native(self, split: str) -> str | None:
        for name in _HF_SPLIT_NAMES[split]:
            if name in self._splits:
                return name
        return None

    def documents(self, split: str) -> list[Document]:
        check_split(split)
        native = self._native(split)
        if native is not None and split != "train":
            return [t for t in self._splits[native][self.text_field] if t]
        # rows of "train" whose hash bucket is this split; buckets of natively provided splits
        # stay in train
        keep = (
            {split}
            if split != "train"
            else {"train"} | {s for s in SPLITS if s != "train" and self._native(s) is not None}
        )
        texts = self._splits["train"][self.text_field]
        return [t for i, t in enumerate(texts) if t and split_of(f"train:{i}") in keep]

    def fingerprint(self) -> str:
        parts = [f"{name}:{getattr(ds, '_fingerprint', '')}" for name, ds in self._splits.items()]
        return "|".join(sorted(parts))


def _looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (a hub id is ``NAME`` or ``ORG/NAME``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


class Enwik8Corpus(Corpus):
    """``enwik8:PATH``: the enwik8 benchmark file, as raw bytes (one document per split).

    The standard split: the first 90,000,000 bytes are train, the next 5,000,000 valid and the
    next 5,000,000 test. Sizes can be overridden (``train_bytes``, ``valid_bytes``,
    ``test_bytes``); when the file is shorter than the three sizes together, they are scaled
    proportionally (90%/5%/5% of the file), which is what small test files get.
    """

    kind = "enwik8"
    STANDARD_SIZES = (90_000_000, 5_000_000, 5_000_000)

    def __init__(
        self,
        spec: str,
        argument: str = "",
        text_field: str = "text",
        train_bytes: int | None = None,
        valid_bytes: int | None = None,
        test_bytes: int | None = None,
    ) -> None:
        super().__init__(spec, text_field)
        self.path = require_path(argument, self.kind)
        if not self.path.is_file():
            raise ValueError(f"enwik8 path {str(self.path)!r} is a directory; expected the file")
        size = self.path.stat().st_size
        if size == 0:
            raise ValueError(f"no text found at {str(self.path)!r}: the file is empty")
        given = (train_bytes, valid_bytes, test_bytes)
        sizes = tuple(
            standard if value is None else int(value)
            for value, standard in zip(given, self.STANDARD_SIZES)
        )
        if any(value < 0 for value in sizes):
            raise ValueError(f"enwik8 split sizes must be >= 0, got {sizes}")
        if sum(sizes) > size:
            if any(value is not None for value in given):
                raise ValueError(
                    f"enwik8 split sizes {sizes} add up to {sum(sizes)} bytes but "
                    f"{str(self.path)!r} has only {size}; pass smaller sizes"
                )
            sizes = (size * 90 // 100, size * 95 // 100 - size * 90 // 100, 0)
            sizes = (sizes[0], sizes[1], size - sizes[0] - sizes[1])
            logger.warning(
                "%s has %d bytes, fewer than the standard 100M: using proportional "
                "90/5/5 splits %s",
                self.path,
                size,
                sizes,
            )
        self.sizes = sizes

    def documents(self, split: str) -> list[Document]:
        check_split(split)
        train, valid, test = self.sizes
        offset, length = {
            "train": (0, train),
            "valid": (train, valid),
            "test": (train + valid, test),
        }[split]
        with self.path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        return [data] if data else []

    def fingerprint(self) -> str:
        return f"{files_fingerprint(self.path, [self.path])}:{self.sizes}"


CORPUS_KINDS: Mapping[str, type[Corpus]] = MappingProxyType(
    {
        cls.kind: cls
        for cls in (
            PythonStdlibCorpus,
            PydocTopicsCorpus,
            TextCorpus,
            JsonlCorpus,
            ParquetCorpus,
            HFCorpus,
            Enwik8Corpus,
        )
    }
)
"""The registry: corpus kind -> class. The one place a new kind is added."""


def get_corpus(spec: str = DEFAULT_CORPUS, text_field: str = "text", **options: Any) -> Corpus:
    """The corpus named by ``spec`` (``KIND`` or ``KIND:ARGUMENT``, see the module docstring).

    ``options`` go to the corpus class (e.g. ``train_bytes=...`` for ``enwik8``).

    Raises:
        ValueError: unknown kind (the message lists the kinds and the nearest one), a path with no
            text, a missing ``text_field``.
        FileNotFoundError: the path in the spec does not exist.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"corpus spec must be a non-empty string such as {DEFAULT_CORPUS!r}")
    kind, _, argument = spec.partition(":")
    if kind not in CORPUS_KINDS:
        raise ValueError(
            f"unknown corpus kind {kind!r} in spec {spec!r}; valid kinds: "
            f"{', '.join(CORPUS_KINDS)}{_nearest_hint(kind, CORPUS_KINDS)}. "
            f"Write e.g. 'python-stdlib' or 'text:/path/to/files'"
        )
    return CORPUS_KINDS[kind](spec, argument, text_field=text_field, **options)


def load_corpus(
    spec: str = DEFAULT_CORPUS, split: str = "train", text_field: str = "text", **options: Any
) -> list[Document]:
    """The documents of one split of the corpus named by ``spec`` (see :func:`get_corpus`)."""
    check_split(split)
    return get_corpus(spec, text_field=text_field, **options).documents(split)


def _load_hub_dataset(datasets: Any, name: str, config: str | None, spec: str) -> Any:
    """`datasets.load_dataset(name, config)`, with a dataset that cannot be fetched (no network,
    offline mode, not on the Hub) reported in one line that says what to do instead."""
    try:
        return datasets.load_dataset(name, config)
    except OSError as exc:  # no network, offline mode, not on the Hub (requests, hub errors)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(
            f"could not load dataset {name!r} (from {spec!r}): {first}. Without network, fetch "
            "it once elsewhere, save it with Dataset.save_to_disk and pass hf:/that/folder, or "
            "use a local corpus (text:FILE, jsonl:FILE, python-stdlib)"
        ) from exc
