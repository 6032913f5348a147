"""Shared fixtures: tiny configs and models built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch

import rmoe  # noqa: F401  (registers the Auto classes)
from rmoe import RMoEConfig

ROUTER_TYPES = ["linear", "mlp", "cosine", "xmoe", "random", "recurrent"]


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
