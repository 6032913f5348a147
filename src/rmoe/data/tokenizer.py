"""Tokenizers: raw bytes, byte-level BPE, or any ``tokenizer.json`` / transformers directory.

``build_tokenizer(spec)`` understands::

    bytes        256 byte tokens (id = byte value) + <|endoftext|> (256) + <|pad|> (257); the default
    bpe:N        byte-level BPE with N tokens in all, trained on ``train_texts``
    PATH         a tokenizer.json file, or a directory holding one (transformers format)

All are Hugging Face ``tokenizers`` objects underneath, so :meth:`Tokenizer.save` writes a
directory that ``transformers.AutoTokenizer.from_pretrained`` loads. Special-token text inside
documents is never turned into a special token: ``"<|endoftext|>"`` written in a file is encoded
as its bytes; only the data pipeline inserts the EOS id between documents.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from rmoe.data.corpora import Document, as_text

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""End of sequence; also the begin-of-sequence token and the separator between documents."""
PAD_TOKEN = "<|pad|>"
"""Padding."""

DEFAULT_TOKENIZER = "bytes"
"""The tokenizer used when none is given."""

TOKENIZER_KINDS: tuple[str, ...] = ("bytes", "bpe:N", "PATH")
"""What :func:`build_tokenizer` accepts, for error messages."""

# Tokens searched for, in order, when a loaded tokenizer does not say which one ends a sequence.
_KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[SEP]")
_KNOWN_PAD_TOKENS = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")

ByteIds = Sequence[int] | np.ndarray


def byte_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2's ``bytes_to_unicode``).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to ``chr(256 + i)`` in
    byte order. This is the alphabet of ``tokenizers.pre_tokenizers.ByteLevel``.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_backend() -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` whose ids are byte values: BPE over the 256 byte symbols with
    no merges, behind a ByteLevel pre-tokenizer (no regex split, no prefix space)."""
    vocab = {symbol: byte for byte, symbol in byte_to_unicode().items()}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True), PAD_TOKEN])
    return backend


def _is_byte_backend(backend: tokenizers.Tokenizer) -> bool:
    """True when ids 0..255 are exactly the byte values and nothing else is learnt."""
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("merges") or spec.get("normalizer"):
        return False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or pre.get("use_regex"):
        return False
    expected = {symbol: byte for byte, symbol in byte_to_unicode().items()}
    if model.get("vocab") != expected:
        return False
    return all(added["id"] >= 256 for added in spec.get("added_tokens", []))


def _token_content(value: Any) -> str | None:
    """A special token from a tokenizer_config.json entry (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A tokenizer for the data pipeline and the model: text <-> ids.

    Wraps a Hugging Face ``tokenizers.Tokenizer`` (``backend``). The byte tokenizer
    (``is_bytes``) encodes with ``str.encode("utf-8")`` and numpy, giving the same ids as the
    backend much faster.

    Args:
        backend: the ``tokenizers.Tokenizer``; this object takes ownership of it.
        eos_token: the token ending a sequence / separating documents (must be in the vocab).
        pad_token: the padding token; ``None`` uses ``eos_token``.
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, eos_token: str, pad_token: str | None = None
    ) -> None:
        backend.encode_special_tokens = True  # document text never becomes a special token
        self.backend = backend
        self.eos_token = eos_token
        self.pad_token = pad_token or eos_token
        eos_id = backend.token_to_id(self.eos_token)
        pad_id = backend.token_to_id(self.pad_token)
        if eos_id is None or pad_id is None:
            missing = self.eos_token if eos_id is None else self.pad_token
            raise ValueError(f"special token {missing!r} is not in the tokenizer's vocabulary")
        self.eos_id: int = eos_id
        self.pad_id: int = pad_id
        self.is_bytes: bool = _is_byte_backend(backend)
        self._special_text = {
            added.content.encode("utf-8"): i
            for i, added in backend.get_added_tokens_decoder().items()
        }
        self._id_to_special = {i: text for text, i in self._special_text.items()}

    # ------------------------------------------------------------------ construction

    @classmethod
    def bytes(cls) -> Tokenizer:
        """The byte tokenizer: ids 0..255 are byte values, 256 ``<|endoftext|>``, 257 ``<|pad|>``."""
        return cls(_byte_backend(), EOS_TOKEN, PAD_TOKEN)

    @classmethod
    def train_bpe(cls, texts: Iterable[Document], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE tokenizer with ``vocab_size`` tokens in all (specials included).

        ``texts`` are the training documents (``bytes`` documents are decoded as UTF-8). Every byte
        is in the initial alphabet, so any text is encodable. Special tokens get ids 0 and 1.
        """
        minimum = 256 + 2
        if vocab_size < minimum:
            raise ValueError(
                f"BPE vocab size {vocab_size} is too small: it must be at least {minimum} "
                f"(256 bytes + 2 special tokens); e.g. bpe:4096"
            )
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN, PAD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen = [0]

        def documents() -> Iterator[str]:
            for document in texts:
                seen[0] += 1
                yield as_text(document)

        backend.train_from_iterator(documents(), trainer=trainer)
        if seen[0] == 0:
            raise ValueError("cannot train a BPE tokenizer on no texts: train_texts is empty")
        if backend.get_vocab_size() < vocab_size:
            logger.warning(
                "BPE training reached only %d of the %d tokens asked for: the training text is "
                "too small",
                backend.get_vocab_size(),
                vocab_size,
            )
        return cls(backend, EOS_TOKEN, PAD_TOKEN)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` file, or a directory holding one (transformers format).

        Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` when the
        directory has them, otherwise from well-known names (``<|endoftext|>``, ``</s>``...).

        Raises:
            FileNotFoundError: ``path`` does not exist, or the directory has no tokenizer.json.
            ValueError: the file does not parse as a tokenizer, or it has no EOS token.
        """
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer path {str(path)!r} does not exist; give a tokenizer.json file or a "
                f"directory saved by Tokenizer.save / save_pretrained"
            )
        directory = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in directory {str(path)!r}; only fast (tokenizer.json) "
                f"tokenizers are supported"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # the Rust side raises Exception subclasses
            raise ValueError(
                f"cannot parse tokenizer file {str(file)!r}: {error}; expected a Hugging Face "
                f"tokenizer.json"
            ) from None
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            candidate = directory / name
            if candidate.is_file():
                try:
                    config.update(json.loads(candidate.read_text(encoding="utf-8")))
                except json.JSONDecodeError as error:
                    raise ValueError(f"cannot parse {str(candidate)!r}: {error}") from None
        vocab = backend.get_vocab(with_added_tokens=True)
        eos = _token_content(config.get("eos_token"))
        if eos is None:
            eos = next((t for t in _KNOWN_EOS_TOKENS if t in vocab), None)
        if eos is None:
            raise ValueError(
                f"tokenizer {str(file)!r} has no end-of-sequence token: set eos_token in "
                f"{directory / 'tokenizer_config.json'} or add one of {list(_KNOWN_EOS_TOKENS)}"
            )
        pad = _token_content(config.get("pad_token"))
        if pad is None:
            pad = next((t for t in _KNOWN_PAD_TOKENS if t in vocab), None)
        return cls(backend, eos, pad)

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids (the embedding table needs this many rows), specials included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def token_dtype(self) -> type[np.unsignedinteger]:
        """The smallest numpy dtype holding every id: uint16 below 65536 ids, else uint32."""
        return np.uint16 if self.vocab_size <= 65536 else np.uint32

    def to_json(self) -> str:
        """The serialized tokenizer (``tokenizer.json`` text) plus its special tokens."""
        return json.dumps(
            {"tokenizer": self.backend.to_str(), "eos": self.eos_token, "pad": self.pad_token}
        )

    @cached_property
    def hf_tokenizer(self) -> Any:
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast``.

        Special-token text is split (``split_special_tokens=True``) as in :meth:`encode`; no
        BOS/EOS is added automatically.
        """
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizers.Tokenizer.from_str(self.backend.to_str()),
            **self._hf_config(),
        )

    def _hf_config(self) -> dict[str, Any]:
        return {
            "eos_token": self.eos_token,
            "bos_token": self.eos_token,
            "pad_token": self.pad_token,
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
        }

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: Document) -> list[int]:
        """Ids of ``text`` (``bytes`` are taken as UTF-8 text; the byte tokenizer maps them
        byte for byte). No special tokens are added."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: Document) -> np.ndarray:
        """Ids of ``text`` as a 1-D numpy array of :attr:`token_dtype`, shape ``[n_tokens]``."""
        if self.is_bytes:
            data = text if isinstance(text, bytes) else text.encode("utf-8")
            return np.frombuffer(data, dtype=np.uint8).astype(self.token_dtype)
        ids = self.backend.encode(as_text(text), add_special_tokens=False).ids
        return np.asarray(ids, dtype=self.token_dtype)

    def encode_batch(self, texts: Sequence[Document]) -> list[np.ndarray]:
        """:meth:`encode_array` of each text (the backend encodes in parallel)."""
        if self.is_bytes:
            return [self.encode_array(text) for text in texts]
        encodings = self.backend.encode_batch(
            [as_text(text) for text in texts], add_special_tokens=False
        )
        return [np.asarray(e.ids, dtype=self.token_dtype) for e in encodings]

    def decode(self, ids: ByteIds, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. Special tokens appear as their text
        unless ``skip_special_tokens``."""
        if self.is_bytes:
            return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")
        return self.backend.decode(_as_int_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_bytes(self, ids: ByteIds, skip_special_tokens: bool = False) -> bytes:
        """Bytes of ``ids``: exact for the byte tokenizer (``decode_bytes(encode(b)) == b``);
        UTF-8 of :meth:`decode` for other tokenizers."""
        if not self.is_bytes:
            return self.decode(ids, skip_special_tokens).encode("utf-8")
        values = _as_int_list(ids)
        if all(0 <= v < 256 for v in values):
            return bytes(values)
        out = bytearray()
        for v in values:
            if 0 <= v < 256:
                out.append(v)
            elif v in self._id_to_special:
                if not skip_special_tokens:
                    out += self._id_to_special[v]
            else:
                raise ValueError(f"token id {v} is out of range for a vocab of {self.vocab_size}")
        return bytes(out)

    # ------------------------------------------------------------------ saving

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to
        ``directory`` (created if needed), loadable by ``AutoTokenizer.from_pretrained`` and by
        :meth:`load`. Returns the directory."""
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        special = {k: v for k, v in self._hf_config().items() if k.endswith("_token")}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._hf_config(),
            "model_max_length": 1 << 30,
        }
        for name, content in (
            ("tokenizer_config.json", config),
            ("special_tokens_map.json", special),
        ):
            (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        return directory

    def __repr__(self) -> str:
        kind = "bytes" if self.is_bytes else type(self.backend.model).__name__
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _as_int_list(ids: ByteIds) -> list[int]:
    if isinstance(ids, list):
        return ids
    return np.asarray(ids).astype(np.int64).ravel().tolist()


def build_tokenizer(
    spec: str = DEFAULT_TOKENIZER, train_texts: Iterable[Document] | None = None
) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"bytes"``, ``"bpe:N"`` (trained on ``train_texts``),
    or a path to a ``tokenizer.json`` file or tokenizer directory.

    Raises:
        ValueError: an unknown spec (with the nearest valid one), a bad ``N``, ``bpe`` without
            ``train_texts``, or a file that does not parse.
        FileNotFoundError: a path that does not exist.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer spec must be a non-empty string: one of {TOKENIZER_KINDS}")
    if spec == "bytes":
        return Tokenizer.bytes()
    if spec.startswith("bpe:"):
        size = spec.partition(":")[2]
        if not size.isdigit():
            raise ValueError(f"bad BPE vocab size in {spec!r}: write bpe:N with N an integer")
        if train_texts is None:
            raise ValueError(f"tokenizer {spec!r} must be trained: pass train_texts")
        return Tokenizer.train_bpe(train_texts, int(size))
    path = Path(spec).expanduser()
    if path.exists() or "/" in spec or "\\" in spec or spec.endswith(".json"):
        return Tokenizer.load(path)
    nearest = difflib.get_close_matches(spec, ["bytes", "bpe:"], n=1, cutoff=0.5)
    hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected 'bytes', 'bpe:N' or a path to a tokenizer.json "
        f"file or directory{hint}"
    )
