"""The typed records' to-dict conversion: the metrics.json layout (keys, order, optional parts)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from rmoe.analysis import routing as R
from rmoe.analysis.pipeline.records import (
    Analysis,
    Comparison,
    ModelSource,
    Settings,
    Skipped,
    TokenData,
)
from rmoe.analysis.report import to_jsonable

_MODEL_KEYS = [
    "name", "path", "model_dir", "tokenizer_dir", "tokenizer_fallback", "tokenizer_note",
    "tokenizer", "adapter", "data", "lm_loss", "bits_per_byte", "routing", "experts",
    "router_gradients",
]  # fmt: skip
_EXPERT_LAYER_KEYS = [
    "layer_index", "num_experts", "weight_similarity", "weight_similarity_offdiag_mean",
    "neuron_avg_similarity", "neuron_avg_includes_shared", "neuron_avg_similarity_offdiag_mean",
    "neuron_matching", "router_space", "router_regression", "router_similarity_offdiag_mean",
    "pca_experts", "pca_neurons_act", "pca_neurons_sampled_per_expert", "diversity_score",
    "diversity_score_normalized", "dynamic",
]  # fmt: skip
_DYNAMIC_KEYS = [
    "num_tokens", "output_similarity", "output_cosine_offdiag_mean",
    "output_angular_offdiag_mean", "rank_counts", "rank_agreement", "top1_score_is_top1_norm",
    "mean_output_norm", "chosen_vs_other_norm_ratio", "activation_ratio",
    "activation_ratio_per_expert",
]  # fmt: skip
_OUTPUT_MEANS = [
    "output_angular_sim", "output_cosine_sim", "rank_agreement", "top1_score_is_top1_norm",
    "chosen_vs_other_norm_ratio", "activation_ratio",
]  # fmt: skip
_PER_TYPE = ["weight_cos", "neuron_avg_cos", "router_r2", "matching_gain", "matching_tau"]


def _settings() -> Settings:
    return Settings(["a"], "text:x", 64, 32, 4, "cpu", 16, "nearest", "float32", 2, "2", 1)


def test_model_record_layout(one_model):
    d = one_model[0].to_dict()
    assert list(d) == _MODEL_KEYS
    assert list(d["routing"]) == ["per_layer", "mi_binned", "mi_index", "mi_index_topk", "summary"]
    assert list(d["routing"]["per_layer"][0]) == [
        "num_experts", "top_k", "load", "entropy", "outer_balance", "inner_balance",
        "layer_index", "choice_entropy",
    ]  # fmt: skip
    assert d["routing"]["per_layer"][1]["layer_index"] == 2
    layer = d["experts"]["per_layer"][0]
    assert list(layer) == _EXPERT_LAYER_KEYS
    assert list(layer["dynamic"]) == _DYNAMIC_KEYS
    assert list(layer["dynamic"]["output_similarity"]) == ["cosine", "angular"]
    assert list(layer["neuron_matching"]["act"]) == [
        "pairs", "flat_cosine_before_mean", "flat_cosine_after_mean", "kendall_tau_mean",
    ]  # fmt: skip
    assert set(layer["router_regression"]) == {"act", "up", "down"}
    assert "r2" in layer["router_regression"]["act"]
    per_type = [f"{k}_{t}" for t in ("act", "up", "down") for k in _PER_TYPE]
    assert list(d["experts"]["summary"]) == per_type + ["diversity_score"] + _OUTPUT_MEANS
    assert list(d["router_gradients"]) == [
        "num_tokens", "lm_loss", "balance_loss", "balance_loss_definition", "lm", "balance",
    ]  # fmt: skip
    assert d["router_gradients"]["lm"] == {
        "per_layer": [0.1, 0.2],
        "shared_cell": 0.05,
        "total": 0.3,
    }
    json.dumps(to_jsonable(d), allow_nan=False)  # strict JSON after the report's conversion


def test_skipped_parts_are_written_as_before(record_factory):
    d = record_factory("bare", with_outputs=False, with_grads=False).to_dict()
    layer = d["experts"]["per_layer"][0]
    assert layer["dynamic"] == {"skipped": "no MoE inputs were stored"}
    assert d["router_gradients"] == {"skipped": "grad_batch_size = 0"}
    assert list(d["experts"]["summary"])[-1] == "diversity_score"  # no output means
    record = record_factory("x")
    first = record.experts.per_layer[0]
    sparse = dataclasses.replace(
        first,
        neuron_matching=None,
        router_regression=Skipped("constant"),
        pca_experts=None,
        pca_neurons_act=None,
        pca_neurons_sampled_per_expert=None,
    ).to_dict()
    assert sparse["router_regression"] == {"skipped": "constant"}
    for key in ("neuron_matching", "pca_experts", "pca_neurons_act"):
        assert key not in sparse
    assert first.router_r2("act") == first.router_regression["act"].r2
    assert dataclasses.replace(first, router_regression=None).router_r2("act") is None


def test_optional_fields_are_left_out_when_unset():
    src = ModelSource("/m", "/m", False, "Tok()")
    assert list(src.to_dict()) == ["model_dir", "tokenizer_dir", "tokenizer_fallback", "tokenizer"]
    note = ModelSource("/m", None, True, "Bytes()", "fallback").to_dict()
    assert list(note)[3:] == ["tokenizer_note", "tokenizer"]
    data = TokenData("d", "valid", 10, 8, 8, 4, 2, 1.0)
    assert "note" not in data.to_dict()
    assert dataclasses.replace(data, note="short").to_dict()["note"] == "short"
    summary = R.ModelRoutingSummary(10, 1.0, 0.5, 1.1, 0.4, 0.5, 0.2, 0.3, 0)
    assert list(summary.to_dict())[-1] == "unused_experts_total"
    with_mi = dataclasses.replace(summary, mi_binned_offdiag_mean=float("nan")).to_dict()
    assert np.isnan(with_mi["mi_binned_offdiag_mean"])  # NaN is a value, None means absent


def test_comparison_layouts(comparison):
    d = comparison.to_dict()
    assert list(d) == ["same_tokens", "same_layer_shapes", "agreement", "top1_agreement_mean",
                       "jaccard_mean"]  # fmt: skip
    assert list(d["agreement"][0]) == [
        "top1_agreement", "mean_jaccard", "num_tokens", "layer_index_a", "layer_index_b",
        "chance_top1",
    ]  # fmt: skip
    assert Comparison(False, True, note="why").to_dict() == {
        "same_tokens": False,
        "same_layer_shapes": True,
        "note": "why",
    }


def test_analysis_layout_and_key_numbers(two_models, comparison):
    timing = {"x": 1.0}
    d = Analysis(_settings(), two_models, comparison, timing).to_dict()
    assert list(d) == ["settings", "key_numbers", "models", "comparison", "timing_seconds"]
    assert d["timing_seconds"] is timing
    assert list(d["models"]) == ["alpha", "beta"] == list(d["key_numbers"])
    key = d["key_numbers"]["alpha"]
    assert list(key) == [
        "lm_loss", "entropy_normalized", "inner_balance", "outer_balance", "load_cv",
        "mi_binned_offdiag", "mi_index_offdiag", "weight_cos_act", "router_r2_act",
        "diversity_score", "output_angular_sim", "rank_agreement", "activation_ratio",
        "router_grad_lm", "router_grad_balance",
    ]  # fmt: skip
    assert key["router_grad_lm"] == 0.3 and key["router_grad_balance"] == 2.5
    rs = d["models"]["alpha"]["routing"]["summary"]
    assert (
        key["load_cv"] == rs["load_cv_mean"]
        and key["mi_index_offdiag"] == rs["mi_index_offdiag_mean"]
    )
    assert d["settings"]["paths"] == ["a"]
    one = Analysis(_settings(), two_models[:1], None, {}).to_dict()
    assert one["comparison"] is None


def test_key_numbers_without_optional_parts(record_factory):
    key = record_factory("bare", with_outputs=False, with_grads=False).key_numbers().to_dict()
    for k in ("output_angular_sim", "rank_agreement", "activation_ratio", "router_grad_lm",
              "router_grad_balance"):  # fmt: skip
        assert key[k] is None


def test_routing_layer_stats_is_routing_layer_metrics():
    rng = np.random.default_rng(0)
    z = np.exp(rng.normal(size=(50, 4)))
    probs = z / z.sum(axis=1, keepdims=True)
    topk = np.argsort(-probs, axis=1)[:, :2]
    stats = R.routing_layer_stats(probs, topk)
    assert json.dumps(to_jsonable(stats.to_dict())) == json.dumps(
        to_jsonable(R.routing_layer_metrics(probs, topk))
    )
    assert stats.load.counts.sum() == 100 and stats.top_k == 2
