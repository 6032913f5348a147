"""Token cache: layout, reuse, keys, environment override, counts for bits per byte."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from rmoe.data import (
    CACHE_ENV_VAR,
    build_tokenizer,
    cache_key,
    default_cache_dir,
    get_corpus,
    get_split_tokens,
)


@pytest.fixture()
def text_dir(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(f"document number {i}: héllo\n" * (i % 5 + 1))
    return root


def test_bytes_cache_contents_and_counts(text_dir, tmp_path):
    corpus = get_corpus(f"text:{text_dir}")
    tok = build_tokenizer("bytes")
    split = get_split_tokens(corpus, tok, "train", cache_dir=tmp_path / "cache")
    docs = corpus.documents("train")
    expected = []
    for doc in docs:
        expected += list(doc.encode("utf-8")) + [tok.eos_id]
    assert isinstance(split.tokens, np.memmap)
    assert split.tokens.dtype == np.uint16
    assert split.tokens.tolist() == expected
    assert split.n_tokens == len(expected) == len(split)
    assert split.n_bytes == sum(len(d.encode()) for d in docs)
    assert split.n_documents == len(docs)
    assert split.bytes_per_token == pytest.approx(split.n_bytes / split.n_tokens)
    assert split.bits_per_byte(math.log(2)) == pytest.approx(split.n_tokens / split.n_bytes)
    meta = json.loads(split.path.with_suffix(".json").read_text())
    assert meta["n_tokens"] == split.n_tokens and meta["split"] == "train"
    assert not [p for p in split.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_cache_hit_reuses_file_and_keys_differ(text_dir, tmp_path):
    cache = tmp_path / "cache"
    corpus = get_corpus(f"text:{text_dir}")
    tok = build_tokenizer("bytes")
    first = get_split_tokens(corpus, tok, "train", cache_dir=cache)
    mtime = first.path.stat().st_mtime_ns
    second = get_split_tokens(
        f"text:{text_dir}", build_tokenizer("bytes"), "train", cache_dir=cache
    )
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime
    bpe = build_tokenizer("bpe:300", train_texts=corpus.documents("train"))
    other = get_split_tokens(corpus, bpe, "train", cache_dir=cache)
    assert other.path != first.path
    assert cache_key(corpus, bpe, "train") != cache_key(corpus, tok, "train")
    assert cache_key(corpus, tok, "valid") != cache_key(corpus, tok, "train")
    assert other.n_bytes == first.n_bytes and other.n_tokens < first.n_tokens
    assert (
        bpe.decode(other.tokens[: other.tokens.tolist().index(bpe.eos_id)])
        == (corpus.documents("train")[0])
    )
    # changing a file changes the corpus fingerprint, hence the key
    before = cache_key(corpus, tok, "train")
    (text_dir / "doc00.txt").write_text("changed contents\n")
    os.utime(text_dir / "doc00.txt", ns=(1, 1))
    changed = get_corpus(f"text:{text_dir}")
    assert cache_key(changed, tok, "train") != before


def test_truncated_entry_is_rebuilt(text_dir, tmp_path):
    corpus = get_corpus(f"text:{text_dir}")
    tok = build_tokenizer("bytes")
    split = get_split_tokens(corpus, tok, "train", cache_dir=tmp_path)
    expected = split.tokens.tolist()
    del split
    path = next(tmp_path.glob("*.train.*.bin"))
    path.write_bytes(path.read_bytes()[:10])
    assert get_split_tokens(corpus, tok, "train", cache_dir=tmp_path).tokens.tolist() == expected


def test_cache_dir_from_environment(text_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    split = get_split_tokens(f"text:{text_dir}", build_tokenizer("bytes"), "train")
    assert split.path.parent == tmp_path / "env_cache"
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert default_cache_dir() == default_cache_dir().home() / ".cache" / "rmoe" / "tokens"


def test_enwik8_bytes_cached_byte_for_byte(tmp_path):
    data = bytes(range(256)) * 8
    (tmp_path / "enwik8").write_bytes(data)
    corpus = get_corpus(f"enwik8:{tmp_path / 'enwik8'}")
    split = get_split_tokens(corpus, build_tokenizer("bytes"), "train", cache_dir=tmp_path)
    train = corpus.documents("train")[0]
    assert split.tokens[:-1].tolist() == list(train)
    assert split.tokens[-1] == 256 and split.n_bytes == len(train)


def test_jsonl_text_field_reaches_the_cache(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(40)))
    split = get_split_tokens(
        f"jsonl:{path}", build_tokenizer("bytes"), "train", cache_dir=tmp_path, text_field="body"
    )
    assert bytes(split.tokens[:5].tolist()).startswith(b"row ")


def test_empty_split_raises(tmp_path):
    (tmp_path / "one.txt").write_text("a single file in a directory\n")
    from rmoe.data import split_of

    assert split_of("one.txt") == "valid"
    with pytest.raises(ValueError, match="no documents"):
        get_split_tokens(f"text:{tmp_path}", build_tokenizer("bytes"), "train", cache_dir=tmp_path)


def test_large_vocab_uses_uint32(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from rmoe.data import Tokenizer

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["</s>"])
    tok = Tokenizer(backend, "</s>")
    (tmp_path / "t.txt").write_text("w1 w69999 w5 " * 100)
    split = get_split_tokens(f"text:{tmp_path / 't.txt'}", tok, "train", cache_dir=tmp_path)
    assert split.tokens.dtype == np.uint32
    assert split.tokens[:3].tolist() == [1, 69_999, 5]
