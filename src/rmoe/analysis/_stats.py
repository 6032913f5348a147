"""Small reductions shared by the analysis summaries (NaN-aware means, matrix off-diagonals)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the finite values (None counts as missing); NaN when there is none."""
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def offdiag_mean(m: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a square [L, L] matrix (NaN when L < 2)."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape[0] < 2:
        return float("nan")
    return float(m[~np.eye(m.shape[0], dtype=bool)].mean())


def adjacent_mean(m: np.ndarray) -> float:
    """Mean of the first super-diagonal m[i, i + 1] of a square [L, L] matrix (NaN when L < 2)."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape[0] < 2:
        return float("nan")
    return float(np.diag(m, 1).mean())
