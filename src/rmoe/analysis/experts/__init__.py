"""Expert analyses: weight similarity, neuron matching, router/expert regression, PCA, output
similarity, norm-vs-score ranks, activation ratios and RMoE's expert-diversity score.

Canonical orientation
---------------------
Every expert matrix is passed as ``[E, F, D]``: E experts, F hidden ("intermediate") neurons,
D model width, **one row per neuron**. For a SwiGLU expert E(x) = W_down(W_up x ⊙ σ(W_act x)):

* ``act`` (= gate_proj, Mixtral w1) and ``up`` (= up_proj, w3) are stored by ``nn.Linear`` as
  [F, D] per expert, i.e. already canonical;
* ``down`` (= down_proj, w2) is stored as [D, F] per expert (transformers v5 fused
  ``experts.down_proj`` is [E, D, F]); transpose it with :func:`down_to_canonical`.

Neuron i of an expert is then (up[i], act[i], down[i]), as in the Closer-Look paper (Lo et al.,
NAACL 2025; ``shared/papers/gw-moe_and_closer-look.md`` Part B). The router weight is [E, D].

Inputs may be numpy arrays or torch tensors; heavy linear algebra runs in torch float32 on the
input tensor's device (so a GPU tensor is analysed on the GPU) and results come back as float64
numpy arrays or small frozen dataclasses with ``to_dict()``.

Modules: :mod:`~rmoe.analysis.experts.similarity` (weight similarity, diversity score),
:mod:`~rmoe.analysis.experts.matching` (neuron matching), :mod:`~rmoe.analysis.experts.regression`
(router vs expert), :mod:`~rmoe.analysis.experts.pca`, :mod:`~rmoe.analysis.experts.outputs`
(output similarity, ranks, activation ratios); everything public is importable from here.
"""

from rmoe.analysis.experts.matching import (
    NeuronMatch,
    match_expert_pairs,
    match_neurons,
    select_pairs,
)
from rmoe.analysis.experts.outputs import (
    OutputSimilarity,
    activation_ratio,
    expert_output_norms,
    expert_output_similarity,
    norm_score_rank_counts,
    rank_count_agreement,
)
from rmoe.analysis.experts.pca import PCAResult, expert_pca, neuron_pca, pca
from rmoe.analysis.experts.regression import (
    LinearFit,
    router_similarity_regression,
    similarity_regression,
)
from rmoe.analysis.experts.similarity import (
    down_to_canonical,
    expert_cosine_similarity,
    expert_diversity_score,
    neuron_average,
    neuron_averaged_similarity,
)

__all__ = [
    "LinearFit",
    "NeuronMatch",
    "OutputSimilarity",
    "PCAResult",
    "activation_ratio",
    "down_to_canonical",
    "expert_cosine_similarity",
    "expert_diversity_score",
    "expert_output_norms",
    "expert_output_similarity",
    "expert_pca",
    "match_expert_pairs",
    "match_neurons",
    "neuron_average",
    "neuron_averaged_similarity",
    "neuron_pca",
    "norm_score_rank_counts",
    "pca",
    "rank_count_agreement",
    "router_similarity_regression",
    "select_pairs",
    "similarity_regression",
]
