"""The measurements of the analysis, from the capture and the model's weights to typed records:
routing (delegated to :func:`rmoe.analysis.routing.model_routing`), every layer's experts,
the router gradients on one batch, and the routing agreement of two models.

Shapes: N captured tokens, n tokens on which every expert is run, E experts, K top-k,
F expert width, D model width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rmoe.analysis import experts as X
from rmoe.analysis import routing as R
from rmoe.analysis._stats import nanmean, offdiag_mean
from rmoe.analysis.adapters import MATRIX_TYPES, ExpertWeights, LayerCapture, MoEAdapter
from rmoe.analysis.pipeline.capture import ProgressFn
from rmoe.analysis.pipeline.load import Subject
from rmoe.analysis.pipeline.records import (
    Comparison,
    ExpertLayer,
    ExpertOutputs,
    ExpertSummary,
    GradNorms,
    LayerAgreement,
    MatchingSummary,
    ModelExperts,
    RouterGradients,
    Skipped,
)

__all__ = [
    "compare",
    "expert_layer",
    "expert_outputs",
    "expert_summary",
    "model_experts",
    "router_gradients",
    "routing",
]

NEURONS_PER_EXPERT_PCA = 64
"""Neurons sampled per expert for the neuron PCA."""
ACTIVE_THRESHOLD = 1e-3
"""|act_fn(W_act x)| above this counts as an active neuron."""
_OUTPUT_CHUNK_FLOATS = 1 << 23  # E·n·max(D, F) floats per expert-output chunk
_NO_INPUTS = "no MoE inputs were stored (output_tokens = 0)"


def routing(layers: list[LayerCapture], num_experts: int) -> R.ModelRouting:
    """The model's routing metrics from its capture
    (:func:`rmoe.analysis.routing.model_routing`)."""
    return R.model_routing(
        [lc.probs.numpy() for lc in layers],
        [lc.topk_idx.numpy() for lc in layers],
        num_experts,
        [lc.layer_index for lc in layers],
        [None if lc.dropped is None else lc.dropped.numpy() for lc in layers],
    )


# --------------------------------------------------------------------------------------------
# experts
# --------------------------------------------------------------------------------------------


def _chunks(n: int, size: int) -> Iterable[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def expert_outputs(
    adapter: MoEAdapter, i: int, w: ExpertWeights, lc: LayerCapture
) -> ExpertOutputs | Skipped:
    """Every expert on the stored inputs [n, D] of MoE layer ``i``: output similarity,
    norm-rank vs score-rank counts and the activation ratio (chunks of tokens)."""
    x = lc.inputs
    if x is None or x.shape[0] == 0:
        return Skipped(_NO_INPUTS)
    e, f, d = w.act.shape
    n = int(x.shape[0])
    scores = lc.scores[:n]
    chunk = max(1, _OUTPUT_CHUNK_FLOATS // (e * max(d, f)))
    cos_sum, ang_sum = np.zeros((e, e)), np.zeros((e, e))
    counts = np.zeros((e, e), dtype=np.int64)
    active, norm_sum = np.zeros(e), np.zeros(e)
    chosen_norm, other_norm = 0.0, 0.0
    k = lc.topk_idx.shape[1]
    for sl in _chunks(n, chunk):
        outs, acts = adapter.expert_outputs(i, x[sl], with_activations=True, weights=w)
        m = sl.stop - sl.start
        sim = X.expert_output_similarity(outs)
        cos_sum += sim.cosine * m
        ang_sum += sim.angular * m
        norms = X.expert_output_norms(outs)  # [m, E]
        counts += X.norm_score_rank_counts(norms, scores[sl])
        active += (acts.abs() > ACTIVE_THRESHOLD).float().mean(dim=2).sum(dim=1).cpu().numpy()
        norm_sum += norms.sum(axis=0)
        chosen = np.zeros_like(norms, dtype=bool)
        np.put_along_axis(chosen, lc.topk_idx[sl].numpy(), True, axis=1)
        chosen_norm += float(norms[chosen].sum())
        other_norm += float(norms[~chosen].sum())
    cosine, angular = cos_sum / n, ang_sum / n
    np.fill_diagonal(angular, 1.0)
    per_expert = active / n
    ratio = (
        (chosen_norm / (n * k)) / max(other_norm / (n * (e - k)), 1e-12) if e > k else float("nan")
    )
    return ExpertOutputs(
        num_tokens=n,
        cosine=cosine,
        angular=angular,
        output_cosine_offdiag_mean=offdiag_mean(cosine),
        output_angular_offdiag_mean=offdiag_mean(angular),
        rank_counts=counts,
        rank_agreement=X.rank_count_agreement(counts),
        top1_score_is_top1_norm=float(counts[0, 0] / n),
        mean_output_norm=norm_sum / n,
        chosen_vs_other_norm_ratio=ratio,
        activation_ratio=float(per_expert.mean()),
        activation_ratio_per_expert=per_expert,
    )


def _float_weights(w: ExpertWeights) -> ExpertWeights:
    """Detached float32 copies of a layer's expert matrices, biases and shared expert."""
    return w.to(torch.float32)


def _matching(mats: dict[str, torch.Tensor], pairs: str) -> dict[str, MatchingSummary]:
    """Neuron matching of the selected expert pairs, per matrix type [E, F, D]."""
    out = {}
    for t, m in mats.items():
        res = X.match_expert_pairs(m, pairs)
        out[t] = MatchingSummary(
            pairs=res,
            flat_cosine_before_mean=nanmean(r.flat_cosine_before for r in res),
            flat_cosine_after_mean=nanmean(r.flat_cosine_after for r in res),
            kendall_tau_mean=nanmean(r.kendall_tau for r in res),
        )
    return out


def _router_regression(
    router_w: torch.Tensor, mats: dict[str, torch.Tensor], e: int
) -> dict[str, X.LinearFit] | Skipped | None:
    """Router-vs-expert similarity fits (None for E < 3, Skipped when a fit is impossible)."""
    if e < 3:
        return None
    try:
        return X.router_similarity_regression(router_w, mats)
    except ValueError as exc:
        return Skipped(str(exc))


def _neuron_pca(act: torch.Tensor, rng: np.random.Generator) -> tuple[X.PCAResult, int]:
    """PCA of up to :data:`NEURONS_PER_EXPERT_PCA` sampled act rows per expert [E, F, D]."""
    f_dim = act.shape[1]
    take = min(f_dim, NEURONS_PER_EXPERT_PCA)
    idx = torch.as_tensor(np.sort(rng.choice(f_dim, size=take, replace=False))).to(act.device)
    return X.neuron_pca(act[:, idx]), take


def expert_layer(
    adapter: MoEAdapter,
    i: int,
    lc: LayerCapture,
    match_pairs: str,
    with_neuron_pca: bool,
    rng: np.random.Generator,
) -> ExpertLayer:
    """All expert analyses of MoE layer ``i``: weight similarity (flattened, neuron-averaged
    with the shared expert), neuron matching, router-vs-expert R², PCA, diversity score and the
    expert outputs on the captured inputs."""
    w = _float_weights(adapter.expert_weights(i))
    mats = w.as_dict()
    e = w.num_experts
    weight_sim = {t: X.expert_cosine_similarity(m) for t, m in mats.items()}
    nav = {
        t: X.neuron_averaged_similarity([m] if w.shared is None else [m, w.shared[t]])
        for t, m in mats.items()
    }
    router_w = adapter.router_weight(i).detach().float()
    neurons = _neuron_pca(w.act, rng) if with_neuron_pca else (None, None)
    diversity = X.expert_diversity_score(list(mats.values()))
    return ExpertLayer(
        layer_index=lc.layer_index,
        num_experts=e,
        weight_similarity=weight_sim,
        weight_similarity_offdiag_mean={t: offdiag_mean(s) for t, s in weight_sim.items()},
        neuron_avg_similarity=nav,
        neuron_avg_includes_shared=w.shared is not None,
        neuron_avg_similarity_offdiag_mean={t: offdiag_mean(s[:e, :e]) for t, s in nav.items()},
        neuron_matching=_matching(mats, match_pairs) if e >= 2 and match_pairs != "none" else None,
        router_space=adapter.layers[i].router_space,
        router_regression=_router_regression(router_w, mats, e),
        router_similarity_offdiag_mean=offdiag_mean(X.expert_cosine_similarity(router_w)),
        pca_experts={t: X.expert_pca(m, "flat") for t, m in mats.items()} if e >= 2 else None,
        pca_neurons_act=neurons[0],
        pca_neurons_sampled_per_expert=neurons[1],
        diversity_score=diversity,
        diversity_score_normalized=diversity / len(mats),
        dynamic=expert_outputs(adapter, i, w, lc),
    )


def expert_summary(per_layer: Sequence[ExpertLayer]) -> ExpertSummary:
    """Means over layers of the expert analyses (NaN-aware; output means only when run)."""
    matched = [m for m in per_layer if m.neuron_matching is not None]
    outs = [m.outputs for m in per_layer if m.outputs is not None]
    dynamic = {}
    if outs:
        dynamic = dict(
            output_angular_sim=nanmean(d.output_angular_offdiag_mean for d in outs),
            output_cosine_sim=nanmean(d.output_cosine_offdiag_mean for d in outs),
            rank_agreement=nanmean(d.rank_agreement for d in outs),
            top1_score_is_top1_norm=nanmean(d.top1_score_is_top1_norm for d in outs),
            chosen_vs_other_norm_ratio=nanmean(d.chosen_vs_other_norm_ratio for d in outs),
            activation_ratio=nanmean(d.activation_ratio for d in outs),
        )
    return ExpertSummary(
        weight_cos={
            t: nanmean(m.weight_similarity_offdiag_mean[t] for m in per_layer) for t in MATRIX_TYPES
        },
        neuron_avg_cos={
            t: nanmean(m.neuron_avg_similarity_offdiag_mean[t] for m in per_layer)
            for t in MATRIX_TYPES
        },
        router_r2={t: nanmean(m.router_r2(t) for m in per_layer) for t in MATRIX_TYPES},
        matching_gain={t: nanmean(m.matching(t).gain for m in matched) for t in MATRIX_TYPES},
        matching_tau={
            t: nanmean(m.matching(t).kendall_tau_mean for m in matched) for t in MATRIX_TYPES
        },
        diversity_score=nanmean(m.diversity_score for m in per_layer),
        **dynamic,
    )


def model_experts(
    subject: Subject,
    layers: list[LayerCapture],
    match_pairs: str,
    rng: np.random.Generator,
    progress: ProgressFn,
) -> ModelExperts:
    """:func:`expert_layer` for every MoE layer (with progress) and their :func:`expert_summary`."""
    per_layer = [
        expert_layer(subject.adapter, i, lc, match_pairs, True, rng)
        for i, lc in progress(
            list(enumerate(layers)), total=len(layers), desc=f"{subject.name}: experts"
        )
    ]
    return ModelExperts(per_layer, expert_summary(per_layer))


# --------------------------------------------------------------------------------------------
# router gradients
# --------------------------------------------------------------------------------------------


def _grad_norms(
    grads: Sequence[torch.Tensor | None] | None, per_layer: list[list], shared: bool
) -> GradNorms | None:
    """Norms per layer's parameter group, of the parameters all layers share (the trailing
    group: the recurrent cell, the shared router module) and total."""
    if grads is None:
        return None
    sq = [0.0 if g is None else float(g.double().pow(2).sum()) for g in grads]
    out_layers, pos = [], 0
    for ps in per_layer:
        out_layers.append(math.sqrt(sum(sq[pos : pos + len(ps)])))
        pos += len(ps)
    cell = math.sqrt(sum(sq[pos:])) if shared else None
    return GradNorms(out_layers, cell, math.sqrt(sum(sq)))


def _balance_loss_definition(adapter: MoEAdapter) -> str:
    """What the model's ``aux_loss`` is: rmoe's configured balancer (its registered class's
    summary line), or transformers' pooled loss."""
    if adapter.family != "rmoe":
        return "transformers load_balancing_loss_func (pooled over layers, unscaled)"
    from rmoe.registry import BALANCERS

    name = str(getattr(adapter.config, "router_aux_loss_type", "switch"))
    doc = (getattr(BALANCERS.get(name), "__doc__", None) or "").strip()
    what = " ".join(doc.split("\n\n")[0].split()).rstrip(".") if doc else f"{name} balance loss"
    return f"rmoe {name!r}: {what}; per MoE layer, averaged over layers (unscaled)"


def router_gradients(
    subject: Subject, windows: np.ndarray, device: torch.device
) -> RouterGradients | Skipped:
    """‖∇ router‖ from the LM loss and from the (unscaled) balance loss, separately, on one
    batch of windows [b, T + 1]; gradients are cleared afterwards."""
    model, adapter = subject.model, subject.adapter
    per_layer = [adapter.router_parameters(i) for i in range(adapter.num_layers)]
    shared = adapter.shared_router_parameters()
    params = [p for ps in per_layer for p in ps] + shared
    if not params:
        return Skipped("the routers have no trainable parameters")
    b = torch.from_numpy(windows).to(device)
    x, y = b[:, :-1], b[:, 1:]
    with torch.enable_grad():
        out = model(input_ids=x, use_cache=False, output_router_logits=True)
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        aux = getattr(out, "aux_loss", None)
        g_lm = torch.autograd.grad(lm, params, retain_graph=aux is not None, allow_unused=True)
        g_aux = (
            torch.autograd.grad(aux, params, allow_unused=True)
            if aux is not None and aux.requires_grad
            else None
        )
    result = RouterGradients(
        num_tokens=int(y.numel()),
        lm_loss=float(lm.detach()),
        balance_loss=None if aux is None else float(aux.detach()),
        balance_loss_definition=_balance_loss_definition(adapter),
        lm=_grad_norms(g_lm, per_layer, bool(shared)),  # type: ignore[arg-type]
        balance=_grad_norms(g_aux, per_layer, bool(shared)),
        note=None
        if aux is not None
        else "the model returned no aux_loss, so balance-loss gradients are missing",
    )
    model.zero_grad(set_to_none=True)
    return result


# --------------------------------------------------------------------------------------------
# two models
# --------------------------------------------------------------------------------------------


def compare(windows: Sequence[np.ndarray], captures: Sequence[list[LayerCapture]]) -> Comparison:
    """Routing agreement of two models per MoE layer, when they saw the same tokens and have
    the same number of layers and experts."""
    same_tokens = windows[0].shape == windows[1].shape and np.array_equal(windows[0], windows[1])
    a, b = captures
    same_layers = len(a) == len(b) and all(
        la.probs.shape[1] == lb.probs.shape[1] for la, lb in zip(a, b)
    )
    if not (same_tokens and same_layers):
        return Comparison(
            bool(same_tokens),
            bool(same_layers),
            note="routing agreement needs the same tokens (same tokenizer) and the same number "
            "of MoE layers and experts; not computed",
        )
    agreement = [
        LayerAgreement(
            R.routing_agreement(la.topk_idx.numpy(), lb.topk_idx.numpy()),
            la.layer_index,
            lb.layer_index,
            1.0 / la.probs.shape[1],
        )
        for la, lb in zip(a, b)
    ]
    return Comparison(
        True,
        True,
        agreement=agreement,
        top1_agreement_mean=nanmean(x.top1_agreement for x in agreement),
        jaccard_mean=nanmean(x.mean_jaccard for x in agreement),
    )
