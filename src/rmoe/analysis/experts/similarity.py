"""Expert weight similarity (flattened and neuron-averaged) and RMoE's diversity score."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_tensor
from rmoe.analysis.experts._common import _EPS, _cosine_gram, _experts


def down_to_canonical(w_down: ArrayLike) -> ArrayLike:
    """Transpose a down projection stored as [E, D, F] (``nn.Linear`` / transformers v5 fused
    ``experts.down_proj`` layout) into the canonical [E, F, D]. Returns the same array type."""
    if isinstance(w_down, torch.Tensor):
        check_ndim(w_down, 3, "w_down", "[E, D, F]")
        return w_down.transpose(1, 2)
    arr = np.asarray(w_down)
    check_ndim(arr, 3, "w_down", "[E, D, F]")
    return np.swapaxes(arr, 1, 2)


# --------------------------------------------------------------------------------------------
# weight similarity
# --------------------------------------------------------------------------------------------


def expert_cosine_similarity(w: ArrayLike) -> np.ndarray:
    """Cosine similarity between experts' flattened matrices (Closer-Look Fig. 1).

    S_nm = cos(vec W^n, vec W^m) for one matrix type.

    Args:
        w: [E, F, D] expert matrices of one type (any [E, ...] works; it is flattened).

    Returns:
        [E, E] float64, diagonal 1 (0 for an all-zero expert).
    """
    t = to_tensor(w, torch.float32, "w")
    if t.ndim < 2:
        raise ValueError(f"w must have shape [E, F, D]; got shape {tuple(t.shape)}")
    return _cosine_gram(t.reshape(t.shape[0], -1))


def neuron_average(w: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """Average each expert's matrix over its neurons (the F axis): [E, F, D] -> [E, D].

    Args:
        w: one [E, F, D] stack, or a sequence whose items are [E_i, F_i, D] stacks or single
            [F_i, D] experts (e.g. ``[routed, shared]`` with a shared expert of a different F);
            the outputs are concatenated in order.

    Returns:
        [sum E_i, D] float64 neuron-averaged vectors.
    """
    items = [w] if isinstance(w, (np.ndarray, torch.Tensor)) else list(w)
    if not items:
        raise ValueError("w is empty; pass an [E, F, D] stack or a list of stacks/experts")
    rows: list[torch.Tensor] = []
    for i, item in enumerate(items):
        t = to_tensor(item, torch.float32, f"w[{i}]")
        if t.ndim == 2:
            t = t[None]
        check_ndim(t, 3, f"w[{i}]", "[E, F, D] or [F, D]")
        rows.append(t.mean(dim=1).cpu())
    dims = {r.shape[1] for r in rows}
    if len(dims) != 1:
        raise ValueError(
            f"all experts must share the model width D; got D values {sorted(dims)}; check the "
            "orientation (down_proj must be transposed to [E, F, D])"
        )
    return torch.cat(rows).double().numpy()


def neuron_averaged_similarity(w: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """Cosine similarity of neuron-averaged experts (Closer-Look App. D, Fig. 8).

    w̄^n = mean_i W^n[i, :] ∈ R^D, then cos(w̄^n, w̄^m). Invariant to neuron permutations and
    usable with experts of different F (e.g. a DeepSeek/Qwen shared expert).

    Args:
        w: as in :func:`neuron_average`.

    Returns:
        [E_total, E_total] float64.
    """
    return _cosine_gram(torch.from_numpy(neuron_average(w)))


# --------------------------------------------------------------------------------------------
# RMoE diversity score
# --------------------------------------------------------------------------------------------


def expert_diversity_score(matrices: Sequence[ArrayLike], normalize: bool = False) -> float:
    """RMoE's expert-similarity score of one layer (RMoE paper Fig. 5/13, App. A.4.3).

    Recipe: for each expert, average each matrix over its hidden (F) axis to one D-vector,
    L2-normalise each vector, concatenate the M vectors, form the E×E Gram matrix and average
    **all** its entries, diagonal included. Lower = more diverse.

    With M matrix types, identical experts give M (each Gram entry sums M unit cosines) and
    random experts ≈ M/E (only the diagonal survives), e.g. 3/16 ≈ 0.19 for SwiGLU with 16
    experts — the scale of the paper's plots. ``normalize=True`` divides by M so that identical
    experts give 1 and random ones ≈ 1/E.

    Args:
        matrices: M stacks [E, F, D] (e.g. [act, up, down] with down transposed); all share E
            and D, F may differ between types.
        normalize: divide by M.

    Returns:
        The score (float).
    """
    stacks = [_experts(w, f"matrices[{i}]") for i, w in enumerate(matrices)]
    if not stacks:
        raise ValueError("matrices is empty; pass the layer's expert stacks, e.g. [act, up, down]")
    shapes = {(s.shape[0], s.shape[2]) for s in stacks}
    if len(shapes) != 1:
        raise ValueError(
            f"all matrices must share E and D; got (E, D) = {sorted(shapes)}; transpose "
            "down_proj with down_to_canonical"
        )
    vecs = torch.cat(
        [torch.nn.functional.normalize(s.mean(dim=1).double(), dim=-1, eps=_EPS) for s in stacks],
        dim=1,
    )
    score = float((vecs @ vecs.T).mean())
    return score / len(stacks) if normalize else score
