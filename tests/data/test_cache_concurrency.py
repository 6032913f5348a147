"""Issue 17: several processes building the same token-cache split at once."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from rmoe.data import build_tokenizer, get_split_tokens


def _build(spec: str, cache_dir: str, barrier, queue) -> None:
    """Child process: wait for the others, build (or read) the split, report its tokens."""
    barrier.wait(timeout=120)
    split = get_split_tokens(spec, build_tokenizer("bytes"), "train", cache_dir=cache_dir)
    queue.put((split.n_tokens, np.asarray(split.tokens).tobytes()))


def make_corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(300):
        (root / f"doc{i:03d}.txt").write_text(f"line {i} of a document, with some words\n" * 60)
    return f"text:{root}"


def test_concurrent_builders_get_identical_correct_tokens(tmp_path):
    spec = make_corpus(tmp_path)
    expected = get_split_tokens(spec, build_tokenizer("bytes"), "train", cache_dir=tmp_path / "ref")
    ctx = mp.get_context("spawn")
    n = 3
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    cache = str(tmp_path / "shared")
    procs = [ctx.Process(target=_build, args=(spec, cache, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for n_tokens, data in results:
        assert n_tokens == expected.n_tokens
        assert data == np.asarray(expected.tokens).tobytes()
    names = sorted(p.name for p in (tmp_path / "shared").iterdir())
    assert len(names) == 2 and not any(x.endswith(".tmp") for x in names), names  # .bin + .json
    again = get_split_tokens(spec, build_tokenizer("bytes"), "train", cache_dir=cache)
    assert np.array_equal(again.tokens, expected.tokens)


def test_truncated_bin_with_intact_meta_is_rebuilt(tmp_path, caplog):
    spec = make_corpus(tmp_path)
    tok = build_tokenizer("bytes")
    first = get_split_tokens(spec, tok, "train", cache_dir=tmp_path / "c")
    reference = np.array(first.tokens)
    path = first.path
    del first
    with open(path, "r+b") as handle:  # a copy cut short (a full disk, a killed cp)
        handle.truncate(path.stat().st_size // 2)
    rebuilt = get_split_tokens(spec, tok, "train", cache_dir=tmp_path / "c")
    assert "does not match" in caplog.text
    assert path.stat().st_size == reference.nbytes
    assert np.array_equal(rebuilt.tokens, reference)
