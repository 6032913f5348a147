"""Typed results of the analysis pipeline, one record per stage, and their ``to_dict()``.

The pipeline passes these records from stage to stage (metrics -> figures -> report); the
nested-dict layout of ``metrics.json`` exists only in the ``to_dict()`` methods, which keep the
keys, their order and their values exactly as ``metrics.json`` has always had them. Arrays and
the library's own result classes (``PCAResult``, ``NeuronMatch``, ``LinearFit``) stay as they
are in the dicts; :func:`rmoe.analysis.report.to_jsonable` converts them when writing.

Shapes: E experts, L MoE layers, n tokens on which every expert was run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from rmoe.analysis._dicts import asdict_without_none
from rmoe.analysis.adapters import MATRIX_TYPES
from rmoe.analysis.experts import LinearFit, NeuronMatch, PCAResult
from rmoe.analysis.routing import ModelRouting, RoutingAgreement


@dataclass(frozen=True)
class Skipped:
    """An analysis that was not run, and why; written as ``{"skipped": reason}``."""

    reason: str

    def to_dict(self) -> dict[str, str]:
        """``{"skipped": reason}``."""
        return {"skipped": self.reason}


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where a model and its tokenizer were read from.

    Attributes:
        model_dir: the folder with config.json.
        tokenizer_dir: the folder with tokenizer.json, or None (byte fallback).
        tokenizer_fallback: True when no tokenizer.json was found and bytes are used.
        tokenizer: ``repr`` of the tokenizer.
        tokenizer_note: the fallback note, or None.
    """

    model_dir: str
    tokenizer_dir: str | None
    tokenizer_fallback: bool
    tokenizer: str
    tokenizer_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The model's loading facts, in metrics.json order (the note only with a fallback)."""
        out: dict[str, Any] = {
            "model_dir": self.model_dir,
            "tokenizer_dir": self.tokenizer_dir,
            "tokenizer_fallback": self.tokenizer_fallback,
        }
        if self.tokenizer_note is not None:
            out["tokenizer_note"] = self.tokenizer_note
        out["tokenizer"] = self.tokenizer
        return out


@dataclass(frozen=True)
class TokenData:
    """The analysed tokens: ``windows`` windows of ``seq_len`` tokens of a corpus's valid split.

    Attributes:
        note: set when the split held fewer tokens than requested.
    """

    data: str
    split: str
    split_tokens: int
    tokens_requested: int
    tokens_used: int
    seq_len: int
    windows: int
    bytes_per_token: float
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``note`` only when set)."""
        return asdict_without_none(self, ("note",))


# --------------------------------------------------------------------------------------------
# experts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchingSummary:
    """Neuron matching of one matrix type over the selected expert pairs of a layer."""

    pairs: list[NeuronMatch]
    flat_cosine_before_mean: float
    flat_cosine_after_mean: float
    kendall_tau_mean: float

    @property
    def gain(self) -> float:
        """Mean flat cosine after matching minus before."""
        return self.flat_cosine_after_mean - self.flat_cosine_before_mean

    def to_dict(self) -> dict[str, Any]:
        """``{"pairs": [...], "flat_cosine_before_mean", "flat_cosine_after_mean",
        "kendall_tau_mean"}``."""
        return {
            "pairs": [r.to_dict() for r in self.pairs],
            "flat_cosine_before_mean": self.flat_cosine_before_mean,
            "flat_cosine_after_mean": self.flat_cosine_after_mean,
            "kendall_tau_mean": self.kendall_tau_mean,
        }


@dataclass(frozen=True)
class ExpertOutputs:
    """Every expert run on the first n tokens of one layer ("dynamic" metrics).

    Attributes:
        cosine, angular: [E, E] mean output similarity over tokens (angular diagonal = 1).
        rank_counts: [E, E] counts C[norm rank, score rank].
        mean_output_norm: [E] mean output norm.
        activation_ratio_per_expert: [E] share of |act_fn(W_act x)| > threshold.
    """

    num_tokens: int
    cosine: np.ndarray
    angular: np.ndarray
    output_cosine_offdiag_mean: float
    output_angular_offdiag_mean: float
    rank_counts: np.ndarray
    rank_agreement: float
    top1_score_is_top1_norm: float
    mean_output_norm: np.ndarray
    chosen_vs_other_norm_ratio: float
    activation_ratio: float
    activation_ratio_per_expert: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready layout (the two similarity maps under ``output_similarity``)."""
        out = dataclasses.asdict(self)
        similarity = {"cosine": out.pop("cosine"), "angular": out.pop("angular")}
        return {"num_tokens": out.pop("num_tokens"), "output_similarity": similarity, **out}


@dataclass(frozen=True)
class ExpertLayer:
    """Weight and output analyses of one MoE layer's experts.

    Attributes:
        weight_similarity: matrix type -> [E, E] cosine of flattened matrices.
        neuron_avg_similarity: matrix type -> [E(+1), E(+1)] cosine of neuron-averaged
            vectors (the last row/column is the shared expert when there is one).
        neuron_matching: matrix type -> matching summary, or None (E < 2 or matching off).
        router_regression: matrix type -> router-vs-expert fit, Skipped, or None (E < 3).
        pca_experts: matrix type -> PCA of flattened experts, or None (E < 2).
        pca_neurons_act: PCA of sampled act rows, or None.
        dynamic: the expert-output metrics, or Skipped.
    """

    layer_index: int
    num_experts: int
    weight_similarity: dict[str, np.ndarray]
    weight_similarity_offdiag_mean: dict[str, float]
    neuron_avg_similarity: dict[str, np.ndarray]
    neuron_avg_includes_shared: bool
    neuron_avg_similarity_offdiag_mean: dict[str, float]
    neuron_matching: dict[str, MatchingSummary] | None
    router_space: str
    router_regression: dict[str, LinearFit] | Skipped | None
    router_similarity_offdiag_mean: float
    pca_experts: dict[str, PCAResult] | None
    pca_neurons_act: PCAResult | None
    pca_neurons_sampled_per_expert: int | None
    diversity_score: float
    diversity_score_normalized: float
    dynamic: ExpertOutputs | Skipped

    @property
    def outputs(self) -> ExpertOutputs | None:
        """The expert-output metrics, or None when they were skipped."""
        return None if isinstance(self.dynamic, Skipped) else self.dynamic

    def router_r2(self, matrix_type: str) -> float | None:
        """R² of the router-vs-expert fit for one matrix type (None when not fitted)."""
        fits = self.router_regression
        if not isinstance(fits, dict) or matrix_type not in fits:
            return None
        return fits[matrix_type].r2

    def matching(self, matrix_type: str) -> MatchingSummary | None:
        """The neuron-matching summary of one matrix type (None when not run)."""
        return None if self.neuron_matching is None else self.neuron_matching[matrix_type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready layout; the analyses that were not run are left out."""
        out: dict[str, Any] = {
            "layer_index": self.layer_index,
            "num_experts": self.num_experts,
            "weight_similarity": self.weight_similarity,
            "weight_similarity_offdiag_mean": self.weight_similarity_offdiag_mean,
            "neuron_avg_similarity": self.neuron_avg_similarity,
            "neuron_avg_includes_shared": self.neuron_avg_includes_shared,
            "neuron_avg_similarity_offdiag_mean": self.neuron_avg_similarity_offdiag_mean,
        }
        if self.neuron_matching is not None:
            out["neuron_matching"] = {t: m.to_dict() for t, m in self.neuron_matching.items()}
        out["router_space"] = self.router_space
        if isinstance(self.router_regression, Skipped):
            out["router_regression"] = self.router_regression.to_dict()
        elif self.router_regression is not None:
            out["router_regression"] = {t: f.to_dict() for t, f in self.router_regression.items()}
        out["router_similarity_offdiag_mean"] = self.router_similarity_offdiag_mean
        if self.pca_experts is not None:
            out["pca_experts"] = self.pca_experts
        if self.pca_neurons_act is not None:
            out["pca_neurons_act"] = self.pca_neurons_act
            out["pca_neurons_sampled_per_expert"] = self.pca_neurons_sampled_per_expert
        out["diversity_score"] = self.diversity_score
        out["diversity_score_normalized"] = self.diversity_score_normalized
        out["dynamic"] = self.dynamic.to_dict()
        return out


@dataclass(frozen=True)
class ExpertSummary:
    """Layer means of the expert analyses (per matrix type where it applies).

    The output fields are None when no layer ran its experts (``output_tokens = 0``).
    """

    weight_cos: dict[str, float]
    neuron_avg_cos: dict[str, float]
    router_r2: dict[str, float]
    matching_gain: dict[str, float]
    matching_tau: dict[str, float]
    diversity_score: float
    output_angular_sim: float | None = None
    output_cosine_sim: float | None = None
    rank_agreement: float | None = None
    top1_score_is_top1_norm: float | None = None
    chosen_vs_other_norm_ratio: float | None = None
    activation_ratio: float | None = None

    def to_dict(self) -> dict[str, float]:
        """Flat dict: ``weight_cos_act``, ``neuron_avg_cos_act``, ... per matrix type, then the
        diversity score and (when computed) the output means."""
        out: dict[str, float] = {}
        for t in MATRIX_TYPES:
            out[f"weight_cos_{t}"] = self.weight_cos[t]
            out[f"neuron_avg_cos_{t}"] = self.neuron_avg_cos[t]
            out[f"router_r2_{t}"] = self.router_r2[t]
            out[f"matching_gain_{t}"] = self.matching_gain[t]
            out[f"matching_tau_{t}"] = self.matching_tau[t]
        out["diversity_score"] = self.diversity_score
        outputs = (
            "output_angular_sim",
            "output_cosine_sim",
            "rank_agreement",
            "top1_score_is_top1_norm",
            "chosen_vs_other_norm_ratio",
            "activation_ratio",
        )
        out.update({k: getattr(self, k) for k in outputs if getattr(self, k) is not None})
        return out


@dataclass(frozen=True)
class ModelExperts:
    """A model's expert analyses: one record per MoE layer and their means."""

    per_layer: list[ExpertLayer]
    summary: ExpertSummary

    def to_dict(self) -> dict[str, Any]:
        """``{"per_layer": [...], "summary": {...}}``."""
        return {
            "per_layer": [layer.to_dict() for layer in self.per_layer],
            "summary": self.summary.to_dict(),
        }


# --------------------------------------------------------------------------------------------
# router gradients
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradNorms:
    """‖∇ router‖ from one loss.

    Attributes:
        per_layer: [L] norm of each MoE layer's router parameters.
        shared_cell: norm of the router parameters every MoE layer shares (the recurrent
            cell, the shared router weight, the S-proj projector), or None without any.
        total: norm over all router parameters.
    """

    per_layer: list[float]
    shared_cell: float | None
    total: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RouterGradients:
    """Router gradient norms from the LM loss and from the balance loss on one batch."""

    num_tokens: int
    lm_loss: float
    balance_loss: float | None
    balance_loss_definition: str
    lm: GradNorms
    balance: GradNorms | None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``note`` only when set)."""
        return asdict_without_none(self, ("note",))


# --------------------------------------------------------------------------------------------
# one model, the comparison, the whole analysis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyNumbers:
    """The headline numbers of one model (None where not computed)."""

    lm_loss: float
    entropy_normalized: float
    inner_balance: float
    outer_balance: float
    load_cv: float
    mi_binned_offdiag: float | None
    mi_index_offdiag: float | None
    weight_cos_act: float
    router_r2_act: float
    diversity_score: float
    output_angular_sim: float | None
    rank_agreement: float | None
    activation_ratio: float | None
    router_grad_lm: float | None
    router_grad_balance: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelRecord:
    """Everything measured on one model.

    Attributes:
        adapter: the adapter's JSON summary (:meth:`MoEAdapter.describe`).
        lm_loss: mean next-token loss (nats) over the analysed tokens.
        bits_per_byte: lm_loss / ln 2 / bytes per token.
    """

    name: str
    path: str
    source: ModelSource
    adapter: dict[str, Any]
    data: TokenData
    lm_loss: float
    bits_per_byte: float
    routing: ModelRouting
    experts: ModelExperts
    router_gradients: RouterGradients | Skipped

    @property
    def num_experts(self) -> int:
        """E of the model's routing."""
        return int(self.adapter["routing"]["num_experts"])

    @property
    def gradients(self) -> RouterGradients | None:
        """The router gradients, or None when they were skipped."""
        g = self.router_gradients
        return None if isinstance(g, Skipped) else g

    def key_numbers(self) -> KeyNumbers:
        """The headline numbers ``rmoe analyze`` prints."""
        rs, es, g = self.routing.summary, self.experts.summary, self.gradients
        return KeyNumbers(
            lm_loss=self.lm_loss,
            entropy_normalized=rs.mean_entropy_normalized,
            inner_balance=rs.inner_balance_mean,
            outer_balance=rs.outer_balance_mean,
            load_cv=rs.load_cv_mean,
            mi_binned_offdiag=rs.mi_binned_offdiag_mean,
            mi_index_offdiag=rs.mi_index_offdiag_mean,
            weight_cos_act=es.weight_cos["act"],
            router_r2_act=es.router_r2["act"],
            diversity_score=es.diversity_score,
            output_angular_sim=es.output_angular_sim,
            rank_agreement=es.rank_agreement,
            activation_ratio=es.activation_ratio,
            router_grad_lm=None if g is None else g.lm.total,
            router_grad_balance=None if g is None or g.balance is None else g.balance.total,
        )

    def to_dict(self) -> dict[str, Any]:
        """The model's entry under ``models`` in metrics.json."""
        return {
            "name": self.name,
            "path": self.path,
            **self.source.to_dict(),
            "adapter": self.adapter,
            "data": self.data.to_dict(),
            "lm_loss": self.lm_loss,
            "bits_per_byte": self.bits_per_byte,
            "routing": self.routing.to_dict(),
            "experts": self.experts.to_dict(),
            "router_gradients": self.router_gradients.to_dict(),
        }


@dataclass(frozen=True)
class LayerAgreement:
    """Routing agreement of the two models at one pair of MoE layers.

    Attributes:
        chance_top1: 1 / E, the top-1 agreement of independent uniform routers.
    """

    agreement: RoutingAgreement
    layer_index_a: int
    layer_index_b: int
    chance_top1: float

    @property
    def top1_agreement(self) -> float:
        """Share of tokens with the same top-1 expert."""
        return self.agreement.top1_agreement

    @property
    def mean_jaccard(self) -> float:
        """Mean Jaccard overlap of the top-k sets."""
        return self.agreement.mean_jaccard

    def to_dict(self) -> dict[str, Any]:
        """The agreement's dict with the two layer indices and the chance level appended."""
        return {
            **self.agreement.to_dict(),
            "layer_index_a": self.layer_index_a,
            "layer_index_b": self.layer_index_b,
            "chance_top1": self.chance_top1,
        }


@dataclass(frozen=True)
class Comparison:
    """How two models' routing compares on the same tokens.

    Attributes:
        agreement: per MoE layer, or None when it could not be computed (``note`` says why).
    """

    same_tokens: bool
    same_layer_shapes: bool
    agreement: list[LayerAgreement] | None = None
    top1_agreement_mean: float | None = None
    jaccard_mean: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the agreement and its means, or the note."""
        out: dict[str, Any] = {
            "same_tokens": self.same_tokens,
            "same_layer_shapes": self.same_layer_shapes,
        }
        if self.agreement is not None:
            out["agreement"] = [a.to_dict() for a in self.agreement]
            out["top1_agreement_mean"] = self.top1_agreement_mean
            out["jaccard_mean"] = self.jaccard_mean
        else:
            out["note"] = self.note
        return out


@dataclass(frozen=True)
class Settings:
    """The arguments of the analysis and the software it ran on."""

    paths: list[str]
    data: str
    tokens: int
    seq_len: int
    batch_size: int
    device: str
    output_tokens: int
    match_pairs: str
    dtype: str
    grad_batch_size: int
    torch: str
    threads: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass
class Analysis:
    """The whole analysis of one or two models.

    Attributes:
        timing: seconds per stage, filled in as the stages run.
    """

    settings: Settings
    models: list[ModelRecord]
    comparison: Comparison | None
    timing: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json layout: settings, key numbers, models, comparison, timing (the
        ``timing_seconds`` entry is :attr:`timing` itself, not a copy)."""
        return {
            "settings": self.settings.to_dict(),
            "key_numbers": {m.name: m.key_numbers().to_dict() for m in self.models},
            "models": {m.name: m.to_dict() for m in self.models},
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "timing_seconds": self.timing,
        }
