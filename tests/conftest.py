"""Shared fixtures: tiny configs and models built in-process (no downloads)."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

import rmoe  # noqa: F401  (registers the Auto classes)
from rmoe import RMoEConfig
from rmoe.modeling.routing import router_presets
from rmoe.registry import ROUTERS
from rmoe.training.config import from_dict

ROUTER_TYPES = list(ROUTERS)  # every registered router


def _variants() -> dict[str, dict]:
    """Router stage combinations the model-level tests run: every registered router (softmax),
    the recurrent ablations (NP + r-alpha, detach-r, S-proj), each new producer with sigmoid
    scoring, and sigmoid + expert bias + routed scale + capacity on a linear and a recurrent
    router."""
    presets = router_presets()
    out = {name: {"router_type": name} for name in ROUTERS}
    for name in ("recurrent-np-r0.5", "recurrent-detach-r", "recurrent-sproj"):
        out[name] = dict(presets[name])
    out["linear-r1"] = {"router_type": "linear", "router_logit_residual": 1.0}
    for name in ("linear", "shared", "recurrent", "recurrent-np-r0.5", "recurrent-sproj"):
        out[f"{name}+sigmoid"] = {**out[name], "router_score_func": "sigmoid"}
    extra = dict(
        router_score_func="sigmoid",
        router_expert_bias=True,
        router_scale=2.0,
        capacity_factor=1.0,
        router_aux_loss_type="sequence",
    )
    out["linear+sigmoid+bias+capacity"] = {"router_type": "linear", **extra}
    out["recurrent+sigmoid+bias+capacity"] = {"router_type": "recurrent", **extra}
    return out


ROUTER_VARIANTS = _variants()
"""id -> RMoEConfig keys, for tests parametrised over router stage combinations."""
NEW_VARIANTS = {k: v for k, v in ROUTER_VARIANTS.items() if k not in ROUTERS or k == "shared"}
"""The variants issue 12 added (new producers, score functions, bias, capacity)."""


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


def randomize_expert_biases(model, scale: float = 0.3, seed: int = 0) -> None:
    """Give every router's expert bias (if any) random values, so tests exercise it."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        bias = getattr(module, "expert_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=g) * scale)


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


MICRO_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    moe_intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=2,
    router_type="recurrent",
    router_dim=8,
)
"""The unit tests' model: 2 layers, D=32, 4 experts (top-2), recurrent router P=8 (~40k
parameters with the bytes vocabulary); tests copy it and override what they vary."""


def micro_raw(corpus_file, cache_dir, **sections) -> dict:
    """The raw config of a run small enough for unit tests (a few seconds): 2 layers, D=32,
    4 experts (top-2), recurrent router P=8, 4 x 32 tokens per step. ``sections`` update the
    sections (``train={"max_steps": 4}``)."""
    raw = {
        "model": dict(MICRO_MODEL),
        "data": dict(
            corpus=f"text:{corpus_file}", seq_len=32, batch_size=4, cache_dir=str(cache_dir)
        ),
        "optim": dict(lr=3e-3, warmup_steps=2, schedule="cosine"),
        "train": dict(max_steps=10, log_interval=1, eval_batches=2, seed=0, threads=1),
    }
    for sec, body in sections.items():
        raw[sec].update(body)
    return raw


@pytest.fixture
def micro_cfg(corpus_file, tmp_path):
    """`micro_raw` as a TrainConfig: ``micro_cfg(train={...})``."""

    def make(**sections):
        return from_dict(micro_raw(corpus_file, tmp_path / "cache", **sections))

    return make
