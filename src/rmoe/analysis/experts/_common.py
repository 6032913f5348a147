"""Validation of expert stacks [E, F, D] and the cosine Gram matrix shared by the analyses."""

from __future__ import annotations

import numpy as np
import torch

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_tensor

_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _experts(w: ArrayLike, name: str = "w") -> torch.Tensor:
    """Validate an expert stack [E, F, D] and return it as float32 torch."""
    t = to_tensor(w, torch.float32, name)
    check_ndim(t, 3, name, "[E, F, D] (down_proj transposed, see down_to_canonical)")
    if min(t.shape) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one expert")
    return t


def _cosine_gram(x: torch.Tensor) -> np.ndarray:
    """[M, P] rows -> [M, M] cosine matrix (zero rows give 0), float64 numpy."""
    xn = torch.nn.functional.normalize(x, dim=-1, eps=_EPS)
    return (xn @ xn.T).clamp_(-1.0, 1.0).double().cpu().numpy()
