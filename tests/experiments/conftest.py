"""Tiny experiment specs over a small text corpus (runs take seconds)."""

from __future__ import annotations

import copy

import pytest
from tests.conftest import MICRO_MODEL


@pytest.fixture
def spec_dict(corpus_file, tmp_path):
    """A 2-arm (SMoE, RMoE) spec dict with a tiny model; callers may edit it."""
    base = {
        "name": "tiny",
        "overrides": {
            # the arms choose the router
            "model": {
                **{k: v for k, v in MICRO_MODEL.items() if k != "router_type"},
                "max_position_embeddings": 32,
            },
            "data": dict(
                corpus=f"text:{corpus_file}",
                seq_len=32,
                batch_size=4,
                cache_dir=str(tmp_path / "cache"),
            ),
            "optim": dict(lr=3e-3, warmup_steps=2),
            "train": dict(
                max_steps=4,
                log_interval=1,
                eval_batches=1,
                save_interval=2,
                keep_last=1,
                device="cpu",
                threads=1,
            ),
        },
        "seeds": [0],
        "reference": "smoe",
        "eval": dict(batches=3, batch_size=4, routing_tokens=128, bootstrap=100),
        "workers": 2,
        "threads": 1,
        "arms": [
            {"name": "smoe", "router": "linear", "label": "SMoE"},
            {"name": "rmoe", "router": "recurrent", "label": "RMoE"},
        ],
    }
    return copy.deepcopy(base)
