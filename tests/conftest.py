"""Shared fixtures: tiny configs and models built in-process (no downloads)."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

import rmoe  # noqa: F401  (registers the Auto classes)
from rmoe import RMoEConfig
from rmoe.registry import ROUTERS
from rmoe.training.config import from_dict

ROUTER_TYPES = list(ROUTERS)  # every registered router


def tiny_config(**overrides) -> RMoEConfig:
    """A model small enough to run a forward pass in milliseconds."""
    kw = dict(
        vocab_size=258,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_intermediate_size=24,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        router_dim=8,
        max_position_embeddings=128,
    )
    kw.update(overrides)
    return RMoEConfig(**kw)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def corpus_file(tmp_path):
    """~100 KB of real English prose about Python, as one text file."""
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    path = tmp_path / "corpus" / "topics.txt"
    path.parent.mkdir()
    path.write_text(text[:100_000])
    return path


@pytest.fixture
def micro_cfg(corpus_file, tmp_path):
    """A run small enough for unit tests (a few seconds)."""

    def make(**sections):
        raw = {
            "model": dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                moe_intermediate_size=32,
                num_experts=4,
                num_experts_per_tok=2,
                router_type="recurrent",
                router_dim=8,
            ),
            "data": dict(
                corpus=f"text:{corpus_file}",
                seq_len=32,
                batch_size=4,
                cache_dir=str(tmp_path / "cache"),
            ),
            "optim": dict(lr=3e-3, warmup_steps=2, schedule="cosine"),
            "train": dict(max_steps=10, log_interval=1, eval_batches=2, seed=0, threads=1),
        }
        for sec, body in sections.items():
            raw[sec].update(body)
        return from_dict(raw)

    return make
