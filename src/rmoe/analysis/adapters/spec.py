"""How a model turns router logits into experts and weights (:class:`RoutingSpec`), and
:func:`route`, which reproduces the gate from the logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# --------------------------------------------------------------------------------------------
# routing function
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingSpec:
    """How a model turns router logits into chosen experts and combine weights.

    Attributes:
        score: "softmax" (over all E experts) or "sigmoid" (per expert, DeepSeek-V3).
        num_experts: E routed experts.
        top_k: K experts per token.
        norm_topk_prob: the K selected scores are divided by their sum.
        routed_scaling_factor: combine weights are multiplied by this (DeepSeek); 1 elsewhere.
        group_score: None (plain top-k), "max" (DeepSeek-V2 ``group_limited_greedy``: a group
            scores its best expert) or "top2_sum" (DeepSeek-V3: the sum of its two best).
        num_groups: expert groups for group-limited selection (1 = none).
        topk_groups: groups kept per token before the top-k.
        score_correction_bias: selection uses scores + a per-expert bias (DeepSeek-V3's
            aux-loss-free balancing) while the combine weights use the unbiased scores.
        num_shared_experts: always-on shared experts (their width is in :class:`ExpertWeights`).
        shared_expert_gate: None, or "sigmoid" when a learned sigmoid gate scales the shared
            expert's output (Qwen2-MoE).
        router: short description of the router (e.g. "linear", "recurrent:gru+linear").
        weights_scale: "output" (y = sum_k w_k E_k(x), every family but one) or "input"
            (Llama 4: y = sum_k E_k(w_k x), the weight scales the expert's input).
        reproducible: :func:`route` reproduces the model's choice and weights from the logits.
            False where the family's gate is not expressible here (Phi-MoE's sparsemixer,
            DBRX's p-norm with p != 1); the capture records the model's own choice either way.
    """

    score: str
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    routed_scaling_factor: float = 1.0
    group_score: str | None = None
    num_groups: int = 1
    topk_groups: int = 1
    score_correction_bias: bool = False
    num_shared_experts: int = 0
    shared_expert_gate: str | None = None
    router: str = "linear"
    weights_scale: str = "output"
    reproducible: bool = True

    def __post_init__(self) -> None:
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid'; got {self.score!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts] = [1, {self.num_experts}]; got {self.top_k}"
            )
        if self.weights_scale not in ("output", "input"):
            raise ValueError(
                f"weights_scale must be 'output' or 'input'; got {self.weights_scale!r}"
            )
        if self.group_score not in (None, "max", "top2_sum"):
            raise ValueError(
                f"group_score must be None, 'max' or 'top2_sum'; got {self.group_score!r}"
            )
        if self.group_score is not None and self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} must divide num_experts={self.num_experts}"
            )

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class RoutingDecision:
    """The result of :func:`route` for N tokens.

    Attributes:
        scores: [N, E] float32 raw scores (softmax or sigmoid of the logits).
        probs: [N, E] float32 scores normalised to sum to 1 per token (equal to ``scores`` for
            a softmax router) — what :mod:`rmoe.analysis.routing` expects.
        topk_idx: [N, K] int64 chosen experts, highest selection score first.
        topk_weight: [N, K] float32 combine weights in the same order.
    """

    scores: torch.Tensor
    probs: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor


def _scores(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """[N, E] logits -> [N, E] float32 softmax or sigmoid scores."""
    z = logits.float()
    return torch.softmax(z, dim=-1) if spec.score == "softmax" else torch.sigmoid(z)


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _selection_scores(
    scores: torch.Tensor, spec: RoutingSpec, bias: torch.Tensor | None
) -> torch.Tensor:
    """[N, E] scores used to pick the experts (bias added, groups outside the best masked)."""
    sel = scores if bias is None else scores + bias.float().to(scores.device)
    if spec.group_score is None or spec.num_groups <= 1:
        return sel
    n, e = sel.shape
    grouped = sel.view(n, spec.num_groups, e // spec.num_groups)
    if spec.group_score == "max":
        group_scores = grouped.max(dim=-1).values
        fill = 0.0  # DeepSeek-V2 masks with zeros (scores are non-negative)
    else:
        group_scores = grouped.topk(min(2, e // spec.num_groups), dim=-1).values.sum(dim=-1)
        fill = float("-inf")
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(spec.topk_groups, dim=-1).indices, True)
    mask = keep[:, :, None].expand_as(grouped).reshape(n, e)
    return sel.masked_fill(~mask, fill)


def route(
    logits: torch.Tensor, spec: RoutingSpec, bias: torch.Tensor | None = None
) -> RoutingDecision:
    """Reproduce a model's gate from its router logits.

    scores = softmax(logits) or sigmoid(logits); selection scores = scores (+ ``bias``), with
    all but the best ``topk_groups`` groups masked for group-limited routing; the K experts with
    the highest selection scores are chosen; their combine weights are the (unbiased) scores,
    divided by their sum when ``norm_topk_prob`` and multiplied by ``routed_scaling_factor``.

    Args:
        logits: [N, E] router logits.
        spec: the model's :class:`RoutingSpec`.
        bias: [E] score-correction bias (DeepSeek-V3), or None.

    Returns:
        :class:`RoutingDecision` with scores/probs [N, E] and topk_idx/topk_weight [N, K].
    """
    if logits.ndim != 2 or logits.shape[-1] != spec.num_experts:
        raise ValueError(
            f"logits must have shape [N, E] = [N, {spec.num_experts}]; got {tuple(logits.shape)}"
        )
    scores = _scores(logits, spec)
    sel = _selection_scores(scores, spec, bias)
    idx = sel.topk(spec.top_k, dim=-1).indices
    weight = scores.gather(1, idx)
    if spec.norm_topk_prob:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    weight = weight * spec.routed_scaling_factor
    probs = scores if spec.score == "softmax" else _normalise(scores)
    return RoutingDecision(scores, probs, idx, weight)
