"""Validation of the routing inputs: probs [N, E], topk [N, K], an optional mask [N]."""

from __future__ import annotations

import numpy as np

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_numpy, token_mask

# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _probs(probs: ArrayLike, mask: ArrayLike | None = None, name: str = "probs") -> np.ndarray:
    """Validate router probabilities [N, E] and return the masked float64 rows."""
    p = to_numpy(probs, np.float64, name=name)
    check_ndim(p, 2, name, "[N, E]")
    n, e = p.shape
    if n == 0 or e == 0:
        raise ValueError(f"{name} is empty (shape {p.shape}); pass at least one token and expert")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} contains NaN or inf; check the router outputs")
    if (p < -1e-6).any():
        raise ValueError(
            f"{name} has negative entries (min {p.min():.3g}); pass softmax(logits, dim=-1) over "
            "all experts, not the raw logits"
        )
    sums = p.sum(axis=1)
    if np.abs(sums - 1.0).max() > 1e-3:
        raise ValueError(
            f"{name} rows must sum to 1 (a softmax over all E experts); got row sums in "
            f"[{sums.min():.4g}, {sums.max():.4g}]; pass softmax(logits, dim=-1), not logits or "
            "renormalised top-k weights"
        )
    m = token_mask(mask, n)
    return p if m is None else p[m]


def _topk(
    topk: ArrayLike,
    num_experts: int | None = None,
    mask: ArrayLike | None = None,
    name: str = "topk",
) -> np.ndarray:
    """Validate expert indices [N, K] (1-D [N] is read as K = 1) and return masked int64 rows."""
    idx = to_numpy(topk, name=name)
    if idx.ndim == 1:
        idx = idx[:, None]
    check_ndim(idx, 2, name, "[N, K]")
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {idx.shape}); pass at least one token and choice")
    if not np.issubdtype(idx.dtype, np.integer):
        if np.issubdtype(idx.dtype, np.floating) and np.array_equal(idx, np.round(idx)):
            idx = idx.astype(np.int64)
        else:
            raise ValueError(
                f"{name} must hold integer expert indices; got dtype {idx.dtype}; pass the "
                "indices from torch.topk(probs, k).indices"
            )
    idx = idx.astype(np.int64, copy=False)
    if (idx < 0).any() or (num_experts is not None and (idx >= num_experts).any()):
        raise ValueError(
            f"{name} has indices outside [0, {num_experts}) (min {idx.min()}, max {idx.max()}); "
            "check num_experts and that padding slots are not marked with -1"
        )
    m = token_mask(mask, idx.shape[0])
    return idx if m is None else idx[m]


def _infer_num_experts(num_experts: int | None, *indices: np.ndarray) -> int:
    if num_experts is not None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1; got {num_experts}")
        return int(num_experts)
    return int(max(int(i.max()) for i in indices)) + 1
