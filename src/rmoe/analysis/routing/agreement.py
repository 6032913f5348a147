"""Routing agreement between two checkpoints on the same tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rmoe.analysis._arrays import ArrayLike
from rmoe.analysis.routing._inputs import _topk

# --------------------------------------------------------------------------------------------
# agreement between checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingAgreement:
    """Routing agreement of two checkpoints on the same tokens at one layer.

    Attributes:
        top1_agreement: share of tokens whose top-1 expert is the same.
        mean_jaccard: mean over tokens of |A ∩ B| / |A ∪ B| of the top-k sets.
        num_tokens: tokens compared.
    """

    top1_agreement: float
    mean_jaccard: float
    num_tokens: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def routing_agreement(
    topk_a: ArrayLike, topk_b: ArrayLike, mask: ArrayLike | None = None
) -> RoutingAgreement:
    """Compare two checkpoints' routing of the same tokens at one layer.

    Args:
        topk_a, topk_b: [N, K_a], [N, K_b] chosen experts, column 0 the top-1 choice; rows must
            not repeat an expert. K may differ between the two.
        mask: optional [N] bool.
    """
    ia = _topk(topk_a, None, mask, "topk_a")
    ib = _topk(topk_b, None, mask, "topk_b")
    if ia.shape[0] != ib.shape[0]:
        raise ValueError(
            f"topk_a has {ia.shape[0]} tokens but topk_b has {ib.shape[0]}; pass both "
            "checkpoints' indices for the same tokens"
        )
    inter = (ia[:, :, None] == ib[:, None, :]).any(axis=2).sum(axis=1)
    union = ia.shape[1] + ib.shape[1] - inter
    return RoutingAgreement(
        top1_agreement=float((ia[:, 0] == ib[:, 0]).mean()),
        mean_jaccard=float((inter / union).mean()),
        num_tokens=int(ia.shape[0]),
    )
