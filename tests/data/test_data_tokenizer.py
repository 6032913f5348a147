"""Tokenizers: byte ids equal bytes, exact round trips, transformers compatibility, BPE, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rmoe.data import EOS_TOKEN, PAD_TOKEN, Tokenizer, build_tokenizer

SAMPLES = [
    "",
    "hello world",
    "  leading and trailing  \n\t\r\n",
    "héllo wörld — ünïcödé ß €",
    "日本語のテキスト and emoji 😀🐍",
    "literal <|endoftext|> and <|pad|> in the text",
    "\x00\x01\x7f control \u2028 chars",
]


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return build_tokenizer("bytes")


def test_byte_vocab_and_specials(byte_tok):
    assert byte_tok.is_bytes
    assert byte_tok.vocab_size == 258
    assert (byte_tok.eos_id, byte_tok.pad_id) == (256, 257)
    assert (byte_tok.eos_token, byte_tok.pad_token) == (EOS_TOKEN, PAD_TOKEN)
    assert byte_tok.token_dtype is np.uint16


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_ids_are_bytes_and_round_trip(byte_tok, text):
    ids = byte_tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text
    # the fast path agrees with the Hugging Face backend
    assert byte_tok.backend.encode(text, add_special_tokens=False).ids == ids
    assert byte_tok.backend.decode(ids) == text


def test_byte_tokenizer_is_exact_on_arbitrary_bytes(byte_tok):
    data = bytes(range(256)) + b"\xff\xfe\xc3"  # invalid UTF-8 on purpose
    ids = byte_tok.encode(data)
    assert ids == list(data)
    assert byte_tok.decode_bytes(ids) == data
    assert byte_tok.decode_bytes([104, 256, 105]) == b"h" + EOS_TOKEN.encode() + b"i"
    assert byte_tok.decode_bytes([104, 256, 105], skip_special_tokens=True) == b"hi"
    assert byte_tok.decode(np.array([104, 105], dtype=np.uint16)) == "hi"


def test_save_load_and_auto_tokenizer_agree(byte_tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = byte_tok.save(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (directory / name).is_file()
    loaded = Tokenizer.load(directory)
    assert loaded.is_bytes and loaded.eos_id == 256 and loaded.pad_id == 257
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert (auto.eos_token_id, auto.pad_token_id) == (256, 257)
    for text in SAMPLES:
        ids = byte_tok.encode(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ids
        assert auto.decode(ids) == text
        assert loaded.encode(text) == ids
    hf = byte_tok.hf_tokenizer
    assert hf.encode(SAMPLES[3], add_special_tokens=False) == byte_tok.encode(SAMPLES[3])
    # loading the bare tokenizer.json also works (specials found by name)
    assert Tokenizer.load(directory / "tokenizer.json").eos_id == 256
    assert build_tokenizer(str(directory)).is_bytes


def test_bpe_trains_saves_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    texts = [f"def function_{i}(x):\n    return x * {i} + 'héllo'\n" for i in range(300)]
    tok = build_tokenizer("bpe:400", train_texts=texts)
    assert not tok.is_bytes
    assert tok.vocab_size == 400
    sample = "def function_7(x):\n    return 'ünïcode 😀'\n"
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode())
    assert tok.decode(ids) == sample
    assert tok.decode(tok.encode(bytes(range(256)))) == bytes(range(256)).decode(
        "utf-8", errors="replace"
    )
    assert tok.encode(EOS_TOKEN) != [tok.eos_id]  # document text never becomes a special token
    directory = tok.save(tmp_path / "bpe")
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert auto(sample, add_special_tokens=False)["input_ids"] == ids
    assert auto.eos_token_id == tok.eos_id
    again = Tokenizer.load(directory)
    assert again.to_json() == tok.to_json()
    assert [list(a) for a in tok.encode_batch(texts[:3])] == [tok.encode(t) for t in texts[:3]]


def test_bad_specs():
    with pytest.raises(ValueError, match="did you mean 'bytes'"):
        build_tokenizer("byte")
    with pytest.raises(ValueError, match="train_texts"):
        build_tokenizer("bpe:1000")
    with pytest.raises(ValueError, match="bpe:N"):
        build_tokenizer("bpe:lots")
    with pytest.raises(ValueError, match="at least 258"):
        build_tokenizer("bpe:100", train_texts=["abc"])


def test_missing_and_unparseable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not a tokenizer")
    with pytest.raises(ValueError, match=str(bad)):
        build_tokenizer(str(bad))
    with pytest.raises(ValueError, match="tokenizer.json"):
        build_tokenizer(str(tmp_path))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        build_tokenizer(str(empty_dir))


def test_tokenizer_without_eos_is_rejected(tmp_path):
    tok = build_tokenizer("bytes")
    spec = json.loads(tok.backend.to_str())
    spec["added_tokens"] = []
    path = tmp_path / "noeos.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="end-of-sequence"):
        build_tokenizer(str(path))
