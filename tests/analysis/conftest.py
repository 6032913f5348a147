"""Tiny hand-built analysis records (no model): what the figure and record tests draw from."""

from __future__ import annotations

import numpy as np
import pytest

from rmoe.analysis import experts as X
from rmoe.analysis import routing as R
from rmoe.analysis.adapters import MATRIX_TYPES
from rmoe.analysis.pipeline.metrics import expert_summary
from rmoe.analysis.pipeline.records import (
    Comparison,
    ExpertLayer,
    ExpertOutputs,
    GradNorms,
    LayerAgreement,
    MatchingSummary,
    ModelExperts,
    ModelRecord,
    ModelSource,
    RouterGradients,
    Skipped,
    TokenData,
)

E, K, F, D, N, LAYERS = 4, 2, 6, 5, 64, 2


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _routing(rng: np.random.Generator) -> R.ModelRouting:
    probs = [_softmax(rng.normal(size=(N, E)) * 2) for _ in range(LAYERS)]
    topk = [np.argsort(-p, axis=1)[:, :K] for p in probs]
    return R.model_routing(probs, topk, E, [1, 2])


def _outputs(rng: np.random.Generator) -> ExpertOutputs:
    sim = np.clip(np.eye(E) + 0.1 * rng.normal(size=(E, E)), -1, 1)
    counts = rng.integers(0, 10, size=(E, E))
    return ExpertOutputs(
        num_tokens=16,
        cosine=sim,
        angular=(sim + 1) / 2,
        output_cosine_offdiag_mean=0.1,
        output_angular_offdiag_mean=0.55,
        rank_counts=counts,
        rank_agreement=0.3,
        top1_score_is_top1_norm=0.4,
        mean_output_norm=np.ones(E),
        chosen_vs_other_norm_ratio=1.1,
        activation_ratio=0.9,
        activation_ratio_per_expert=np.full(E, 0.9),
    )


def _expert_layer(rng: np.random.Generator, index: int, with_outputs: bool) -> ExpertLayer:
    mats = {t: rng.normal(size=(E, F, D)) for t in MATRIX_TYPES}
    router = rng.normal(size=(E, D))
    sim = {t: X.expert_cosine_similarity(m) for t, m in mats.items()}
    nav = {t: X.neuron_averaged_similarity([m, m[0]]) for t, m in mats.items()}  # + a shared
    match = X.match_neurons(mats["act"][0], mats["act"][1])
    return ExpertLayer(
        layer_index=index,
        num_experts=E,
        weight_similarity=sim,
        weight_similarity_offdiag_mean={t: 0.01 for t in MATRIX_TYPES},
        neuron_avg_similarity=nav,
        neuron_avg_includes_shared=True,
        neuron_avg_similarity_offdiag_mean={t: 0.02 for t in MATRIX_TYPES},
        neuron_matching={t: MatchingSummary([match], 0.0, 0.2, 0.1) for t in MATRIX_TYPES},
        router_space="model width D",
        router_regression=X.router_similarity_regression(router, mats),
        router_similarity_offdiag_mean=0.0,
        pca_experts={t: X.expert_pca(m, "flat") for t, m in mats.items()},
        pca_neurons_act=X.neuron_pca(mats["act"]),
        pca_neurons_sampled_per_expert=F,
        diversity_score=0.5,
        diversity_score_normalized=0.5 / 3,
        dynamic=_outputs(rng) if with_outputs else Skipped("no MoE inputs were stored"),
    )


def make_record(
    name: str = "alpha", seed: int = 0, with_outputs: bool = True, with_grads: bool = True
) -> ModelRecord:
    """A two-layer, four-expert model record with every analysis filled in."""
    rng = np.random.default_rng(seed)
    layers = [_expert_layer(rng, i + 1, with_outputs) for i in range(LAYERS)]
    grads = (
        RouterGradients(
            num_tokens=32,
            lm_loss=5.0,
            balance_loss=1.0,
            balance_loss_definition="test",
            lm=GradNorms([0.1, 0.2], 0.05, 0.3),
            balance=GradNorms([1.0, 2.0], None, 2.5),
        )
        if with_grads
        else Skipped("grad_batch_size = 0")
    )
    return ModelRecord(
        name=name,
        path=f"/models/{name}",
        source=ModelSource(f"/models/{name}", None, True, "ByteTokenizer()", "byte fallback"),
        adapter={"family": "rmoe", "routing": {"num_experts": E}},
        data=TokenData("text:x", "valid", 1000, N, N, 32, 2, 1.0),
        lm_loss=5.0,
        bits_per_byte=7.2,
        routing=_routing(rng),
        experts=ModelExperts(layers, expert_summary(layers)),
        router_gradients=grads,
    )


def make_comparison(a: ModelRecord, seed: int = 1) -> Comparison:
    """A comparison with per-layer agreement of ``a`` and a random second routing."""
    rng = np.random.default_rng(seed)
    agreement = [
        LayerAgreement(
            R.routing_agreement(
                np.argsort(rng.random((N, E)), 1)[:, :K], np.argsort(rng.random((N, E)), 1)[:, :K]
            ),
            x.layer_index,
            x.layer_index,
            1.0 / E,
        )
        for x in a.routing.per_layer
    ]
    return Comparison(True, True, agreement, 0.25, 0.3)


@pytest.fixture(scope="session")
def one_model() -> list[ModelRecord]:
    return [make_record("alpha")]


@pytest.fixture(scope="session")
def two_models() -> list[ModelRecord]:
    return [make_record("alpha"), make_record("beta", seed=3)]


@pytest.fixture(scope="session")
def record_factory():
    """:func:`make_record` (variants: without expert outputs, without router gradients)."""
    return make_record


@pytest.fixture(scope="session")
def comparison(two_models) -> Comparison:
    return make_comparison(two_models[0])
