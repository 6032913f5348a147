"""Corpora: every kind on small local files, split rules, and the error messages."""

from __future__ import annotations

import json
import sysconfig

import pytest

from rmoe.data import CORPUS_KINDS, SPLITS, get_corpus, load_corpus, split_of, stdlib_files


def _all_splits(corpus):
    return {split: corpus.documents(split) for split in SPLITS}


# ---------------------------------------------------------------------------------- split rule


def test_split_of_is_stable_and_roughly_90_5_5():
    keys = [f"file_{i}.py" for i in range(4000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    counts = {s: splits.count(s) for s in SPLITS}
    assert 0.87 < counts["train"] / len(keys) < 0.93
    assert 0.03 < counts["valid"] / len(keys) < 0.07
    assert 0.03 < counts["test"] / len(keys) < 0.07
    # pinned values: the rule must not change silently (it would reshuffle every cached split)
    pinned = {"os.py": "train", "json/__init__.py": "valid", "k9": "valid", "k18": "test"}
    assert {k: split_of(k) for k in pinned} == pinned


# ---------------------------------------------------------------------------------- python-stdlib


def test_stdlib_files_exclude_tests_and_site_packages():
    files = stdlib_files()
    names = [rel for rel, _ in files]
    assert names == sorted(names)
    assert "os.py" in names and "json/__init__.py" in names
    for rel in names:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), rel
    assert str(files[0][1]).startswith(sysconfig.get_paths()["stdlib"])


def test_stdlib_split_deterministic_and_disjoint():
    corpus = get_corpus("python-stdlib")
    again = get_corpus("python-stdlib")
    assert corpus.fingerprint() == again.fingerprint()
    names = {rel for rel, _ in stdlib_files()}
    by_split = {s: {rel for rel in names if split_of(rel) == s} for s in SPLITS}
    assert by_split["train"] & by_split["valid"] == set()
    assert by_split["train"] & by_split["test"] == set()
    assert by_split["valid"] & by_split["test"] == set()
    assert set().union(*by_split.values()) == names
    valid = corpus.documents("valid")
    assert valid == again.documents("valid")
    assert len(valid) == len(by_split["valid"])
    assert len(by_split["train"]) > 10 * len(by_split["valid"])


def test_stdlib_from_a_given_directory(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_text("x = 'é'\n")
    (tmp_path / "pkg" / "tests" / "test_mod.py").write_text("assert True\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    corpus = get_corpus(f"python-stdlib:{tmp_path}")
    docs = [d for s in SPLITS for d in corpus.documents(s)]
    assert docs == ["x = 'é'\n"]


# ---------------------------------------------------------------------------------- pydoc-topics


def test_pydoc_topics_is_english_prose_split_by_key():
    corpus = get_corpus("pydoc-topics")
    splits = _all_splits(corpus)
    from pydoc_data.topics import topics

    assert sum(len(v) for v in splits.values()) == sum(1 for t in topics.values() if t)
    assert any("statement" in doc for doc in splits["train"])
    assert splits == _all_splits(get_corpus("pydoc-topics"))


# ---------------------------------------------------------------------------------- text


def test_text_directory_recursive_sorted_and_hash_split(tmp_path):
    for i in range(60):
        sub = tmp_path / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i:02d}.txt").write_text(f"document {i} ü\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    corpus = get_corpus(f"text:{tmp_path}")
    splits = _all_splits(corpus)
    everything = [d for s in SPLITS for d in splits[s]]
    assert sorted(everything) == sorted(f"document {i} ü\n" for i in range(60))
    expected_train = [
        f"document {i} ü\n"
        for i in sorted(range(60), key=lambda i: f"d{i % 3}/f{i:02d}.txt")
        if split_of(f"d{i % 3}/f{i:02d}.txt") == "train"
    ]
    assert splits["train"] == expected_train


def test_text_single_file_contiguous_ranges(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000)) + "€" * 100
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    corpus = get_corpus(f"text:{path}")
    train, valid, test = (corpus.documents(s) for s in SPLITS)
    assert train[0] + valid[0] + test[0] == text
    assert (len(train[0]), len(valid[0]), len(test[0])) == (990, 55, 55)


# ---------------------------------------------------------------------------------- jsonl / parquet


def test_jsonl_file_and_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"content": f"row {i}", "id": i} for i in range(50)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = get_corpus(f"jsonl:{path}", text_field="content")
    splits = _all_splits(corpus)
    assert sorted(sum(splits.values(), [])) == sorted(r["content"] for r in rows)
    assert splits["train"] == [
        f"row {i}" for i in range(50) if split_of(f"data.jsonl:{i}") == "train"
    ]
    assert load_corpus(f"jsonl:{path}", "test", text_field="content") == splits["test"]


def test_jsonl_missing_field_lists_fields(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"'text'.*\['body', 'title'\]"):
        get_corpus(f"jsonl:{path}").documents("train")


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2"):
        get_corpus(f"jsonl:{path}").documents("train")


def test_parquet_directory_and_missing_field(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for part in range(2):
        table = pa.table({"text": [f"p{part} r{i}" for i in range(30)], "n": list(range(30))})
        pq.write_table(table, tmp_path / f"part{part}.parquet")
    corpus = get_corpus(f"parquet:{tmp_path}")
    docs = sum(_all_splits(corpus).values(), [])
    assert sorted(docs) == sorted(f"p{p} r{i}" for p in range(2) for i in range(30))
    with pytest.raises(ValueError, match=r"'body'.*\['n', 'text'\]"):
        get_corpus(f"parquet:{tmp_path}", text_field="body").documents("train")


# ---------------------------------------------------------------------------------- hf datasets


def test_hf_saved_to_disk_with_own_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": [f"train {i}" for i in range(40)] + [""]}),
            "validation": datasets.Dataset.from_dict({"text": ["v0", "v1"]}),
            "test": datasets.Dataset.from_dict({"text": ["t0"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    corpus = get_corpus(f"hf:{tmp_path / 'ds'}")
    assert corpus.documents("train") == [f"train {i}" for i in range(40)]
    assert corpus.documents("valid") == ["v0", "v1"]
    assert corpus.documents("test") == ["t0"]


def test_hf_single_split_hashed_by_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": [f"row {i}" for i in range(100)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    corpus = get_corpus(f"hf:{tmp_path / 'ds'}", text_field="body")
    splits = _all_splits(corpus)
    assert sorted(sum(splits.values(), [])) == sorted(f"row {i}" for i in range(100))
    assert splits["valid"] == [f"row {i}" for i in range(100) if split_of(f"train:{i}") == "valid"]
    with pytest.raises(ValueError, match=r"'text'.*\['body'\]"):
        get_corpus(f"hf:{tmp_path / 'ds'}")


def test_hf_missing_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        get_corpus(f"hf:{tmp_path / 'nope'}")


# ---------------------------------------------------------------------------------- enwik8


def test_enwik8_proportional_and_explicit_sizes(tmp_path):
    data = bytes(range(256)) * 4 + "é€".encode() * 10  # 1024 + 50 bytes, not valid UTF-8
    path = tmp_path / "enwik8"
    path.write_bytes(data)
    corpus = get_corpus(f"enwik8:{path}")
    train, valid, test = (corpus.documents(s)[0] for s in SPLITS)
    assert isinstance(train, bytes)
    assert train + valid + test == data
    n = len(data)
    assert (len(train), len(valid)) == (n * 90 // 100, n * 95 // 100 - n * 90 // 100)
    explicit = get_corpus(f"enwik8:{path}", train_bytes=900, valid_bytes=50, test_bytes=50)
    assert explicit.documents("train") == [data[:900]]
    assert explicit.documents("valid") == [data[900:950]]
    assert explicit.documents("test") == [data[950:1000]]
    with pytest.raises(ValueError, match="smaller sizes"):
        get_corpus(f"enwik8:{path}", train_bytes=10_000)


def test_enwik8_standard_sizes_by_default(tmp_path):
    from rmoe.data.corpora import Enwik8Corpus

    assert Enwik8Corpus.STANDARD_SIZES == (90_000_000, 5_000_000, 5_000_000)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "enwik8"])
def test_missing_path_raises_file_not_found_naming_it(tmp_path, kind):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        get_corpus(f"{kind}:{missing}")


def test_path_without_text_raises(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.dat").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="no text"):
        get_corpus(f"text:{tmp_path}")
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="no text"):
        get_corpus(f"jsonl:{tmp_path / 'e.jsonl'}").documents("train")
    (tmp_path / "e8").write_bytes(b"")
    with pytest.raises(ValueError, match="no text"):
        get_corpus(f"enwik8:{tmp_path / 'e8'}")


def test_unknown_kind_lists_kinds_and_nearest():
    with pytest.raises(ValueError) as info:
        get_corpus("python_stdlib")
    message = str(info.value)
    assert "did you mean 'python-stdlib'" in message
    for kind in CORPUS_KINDS:
        assert kind in message
    with pytest.raises(ValueError, match="'jsonl'"):
        get_corpus("json:/tmp/x")


def test_unknown_split():
    with pytest.raises(ValueError, match="'valid'"):
        get_corpus("pydoc-topics").documents("validation")
