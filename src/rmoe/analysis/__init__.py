"""Model-agnostic analyses of MoE routing and experts.

* :mod:`rmoe.analysis.routing` — load, entropy, inner/outer balance, cross-layer MI, agreement,
  whole-model summaries and the trainer's routing statistics (the one home of routing stats).
* :mod:`rmoe.analysis.experts` — weight/output similarity, neuron matching, PCA, rank counts,
  activation ratios, RMoE's diversity score (expert matrices in the canonical [E, F, D]).
* :mod:`rmoe.analysis.plots` — matplotlib figure writers (import explicitly; needs matplotlib).
* :mod:`rmoe.analysis.report` — ``metrics.json`` + ``report.html``.
* :mod:`rmoe.analysis.adapters` — one interface over the MoE layers of rmoe and Hugging Face
  MoE families (router weights, canonical expert matrices, routing function, capture hooks).
* :mod:`rmoe.analysis.pipeline` — the stages of ``rmoe analyze``: load -> capture -> metrics
  -> figures (one function each, registered), passing typed records.
* :mod:`rmoe.analysis.run` — :func:`analyze`, the whole analysis of one or two checkpoints
  (``rmoe analyze``); imported on first use since it needs matplotlib.

Inputs are numpy arrays or torch tensors; outputs are numbers, numpy arrays or small frozen
dataclasses with ``to_dict()``. Requires the ``analysis`` extra (scipy, matplotlib).
"""

from typing import Any

from rmoe.analysis.adapters import (
    ExpertWeights,
    LayerCapture,
    MoEAdapter,
    RoutingCapture,
    RoutingDecision,
    RoutingSpec,
    expert_forward,
    get_adapter,
    route,
    supported_families,
)
from rmoe.analysis.experts import (
    LinearFit,
    NeuronMatch,
    OutputSimilarity,
    PCAResult,
    activation_ratio,
    down_to_canonical,
    expert_cosine_similarity,
    expert_diversity_score,
    expert_output_norms,
    expert_output_similarity,
    expert_pca,
    match_expert_pairs,
    match_neurons,
    neuron_average,
    neuron_averaged_similarity,
    neuron_pca,
    norm_score_rank_counts,
    pca,
    rank_count_agreement,
    router_similarity_regression,
    select_pairs,
    similarity_regression,
)
from rmoe.analysis.report import to_jsonable, write_report
from rmoe.analysis.routing import (
    EntropySummary,
    LoadStats,
    RoutingAgreement,
    binned_mutual_information,
    binned_mutual_information_matrix,
    choice_entropy,
    entropy_summary,
    expert_load,
    index_mutual_information,
    index_mutual_information_matrix,
    inner_balance,
    normalized_entropy,
    outer_balance,
    router_entropy,
    routing_agreement,
    routing_layer_metrics,
)

__all__ = [
    "EntropySummary",
    "ExpertWeights",
    "LayerCapture",
    "MoEAdapter",
    "RoutingCapture",
    "RoutingDecision",
    "RoutingSpec",
    "analyze",
    "expert_forward",
    "get_adapter",
    "route",
    "supported_families",
    "LinearFit",
    "LoadStats",
    "NeuronMatch",
    "OutputSimilarity",
    "PCAResult",
    "RoutingAgreement",
    "activation_ratio",
    "binned_mutual_information",
    "binned_mutual_information_matrix",
    "choice_entropy",
    "down_to_canonical",
    "entropy_summary",
    "expert_cosine_similarity",
    "expert_diversity_score",
    "expert_load",
    "expert_output_norms",
    "expert_output_similarity",
    "expert_pca",
    "index_mutual_information",
    "index_mutual_information_matrix",
    "inner_balance",
    "match_expert_pairs",
    "match_neurons",
    "neuron_average",
    "neuron_averaged_similarity",
    "neuron_pca",
    "norm_score_rank_counts",
    "normalized_entropy",
    "outer_balance",
    "pca",
    "rank_count_agreement",
    "router_entropy",
    "router_similarity_regression",
    "routing_agreement",
    "routing_layer_metrics",
    "select_pairs",
    "similarity_regression",
    "to_jsonable",
    "write_report",
]


def __getattr__(name: str) -> Any:
    """Lazy ``analyze`` (its module imports matplotlib)."""
    if name == "analyze":
        from rmoe.analysis.run import analyze

        return analyze
    raise AttributeError(f"module 'rmoe.analysis' has no attribute {name!r}")
