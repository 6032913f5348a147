"""Supervised examples (rmoe.data.examples): reading jsonl/json, encoding and collation."""

from __future__ import annotations

import json

import pytest
import torch

from rmoe.data import build_tokenizer
from rmoe.data.examples import (
    IGNORE_INDEX,
    Example,
    collate,
    encode_example,
    load_examples,
    read_rows,
)

ROWS = [{"prompt": "2+2 =", "answer": " 4"}, {"prompt": "name?", "answer": " rmoe"}]


def test_jsonl_and_json_list_and_wrapped_list_give_the_same_rows(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}))
    for name in ("a.jsonl", "b.json", "c.json"):
        assert read_rows(tmp_path / name) == ROWS
    assert load_examples(tmp_path / "a.jsonl") == [
        Example("2+2 =", " 4"),
        Example("name?", " rmoe"),
    ]
    assert load_examples(tmp_path / "b.json", limit=1) == [Example("2+2 =", " 4")]


def test_read_rows_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "scalar.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="row 1 is a int"):
        read_rows(tmp_path / "scalar.json")
    (tmp_path / "obj.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_rows(tmp_path / "obj.json")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no examples"):
        load_examples(tmp_path / "empty.jsonl")


def test_encode_collate_round_trip():
    tok = build_tokenizer("bytes")
    examples = [Example(r["prompt"], r["answer"]) for r in ROWS]
    encoded = [encode_example(tok, ex, 64) for ex in examples]
    batch = collate(encoded, tok.pad_id)
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(batch, torch.long)
    for row, (ex, (ids, n_ctx)) in enumerate(zip(examples, encoded)):
        n = len(ids)
        assert tok.decode(batch["input_ids"][row, 1:n_ctx].tolist()) == ex.prompt
        answer = batch["labels"][row, n_ctx : n - 1].tolist()
        assert tok.decode(answer) == ex.answer
        assert batch["labels"][row, n - 1] == tok.eos_id
        assert (batch["labels"][row, :n_ctx] == IGNORE_INDEX).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert int(batch["attention_mask"][row].sum()) == n


def test_encode_needs_room_for_bos_answer_and_eos():
    tok = build_tokenizer("bytes")
    with pytest.raises(ValueError, match="max_len must be >= 3"):
        encode_example(tok, Example("p", "a"), 2)
    ids, n_ctx = encode_example(tok, Example("long prompt", "abc"), 3)
    assert n_ctx == 1 and ids == [tok.eos_id, ord("a"), ord("b")]  # answer cut, no prompt
