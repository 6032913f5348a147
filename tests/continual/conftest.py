"""Fixtures for the continual tests: a tiny rmoe model, its tokenizer, a saved copy, small tasks."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import MICRO_MODEL

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.data import build_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, especially on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tokenizer():
    return build_tokenizer("bytes")


def make_model(tokenizer, seed: int = 0, **overrides) -> RMoEForCausalLM:
    """~40k parameters: 2 layers, 4 experts (top-2), recurrent router."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=tokenizer.vocab_size,
        **MICRO_MODEL,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_id,
        bos_token_id=tokenizer.eos_id,
    )
    kw.update(overrides)
    return RMoEForCausalLM(RMoEConfig(**kw))


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    """A tiny random model + tokenizer saved in Hugging Face format."""
    path = tmp_path / "model"
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save(path)
    return path


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def two_tasks(tmp_path):
    """Two tiny prompt/answer tasks as directories with train.jsonl and test.jsonl."""
    dirs = []
    for name, fn in (("upper", str.upper), ("rev", lambda s: s[::-1])):
        words = [f"{a}{b}" for a in "abcdefgh" for b in "xyz"]
        rows = [{"prompt": f"{name}: {w} ->", "answer": f" {fn(w)}"} for w in words]
        d = tmp_path / "tasks" / name
        write_jsonl(d / "train.jsonl", rows)
        write_jsonl(d / "test.jsonl", rows[:8])
        dirs.append(d)
    return dirs
