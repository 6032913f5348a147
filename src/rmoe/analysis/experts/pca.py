"""PCA of experts (flattened matrices) and of neurons (rows), in torch float32."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_tensor
from rmoe.analysis.experts._common import _EPS, _experts

# --------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PCAResult:
    """Principal-component projection.

    Attributes:
        coords: [M, k] coordinates of the M points on the first k components.
        explained_variance_ratio: [k] share of total variance per component.
        labels: [M] int group label per point (expert index for :func:`neuron_pca`), or None.
    """

    coords: np.ndarray = field(repr=False)
    explained_variance_ratio: np.ndarray
    labels: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready dict (coordinates included)."""
        return {
            "coords": self.coords.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "labels": None if self.labels is None else self.labels.tolist(),
        }


def pca(x: ArrayLike, n_components: int = 2, standardize: bool = True) -> PCAResult:
    """Exact PCA of M points [M, P] via an eigendecomposition of the smaller Gram/covariance.

    Columns are centred, and with ``standardize`` divided by their std across points (the
    Closer-Look recipe; zero-variance columns are left at 0). Component signs are fixed so the
    largest-magnitude coordinate of each component is positive (deterministic output).

    Args:
        x: [M, P] points.
        n_components: k <= min(M, P).
        standardize: scale columns to unit variance.

    Returns:
        :class:`PCAResult` with coords [M, k] and explained-variance ratios [k].
    """
    t = to_tensor(x, torch.float32, "x")
    check_ndim(t, 2, "x", "[M, P]")
    m, p = t.shape
    if not 1 <= n_components <= min(m, p):
        raise ValueError(
            f"n_components must be in [1, min(M, P)] = [1, {min(m, p)}]; got {n_components}"
        )
    t = t - t.mean(dim=0, keepdim=True)
    if standardize:
        std = t.std(dim=0, unbiased=False, keepdim=True)
        t = torch.where(std > 0, t / std.clamp_min(_EPS), torch.zeros_like(t))
    if m <= p:
        gram = (t @ t.T).double()
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        # Left singular vectors u_i with s_i² = λ_i; projections are u_i s_i.
        coords = evecs[:, :n_components] * evals[:n_components].sqrt()
    else:
        cov = (t.T @ t).double()
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        coords = (t @ evecs[:, :n_components].to(t.dtype)).double()  # no float64 copy of x
    total = evals.sum()
    ratio = evals[:n_components] / total if total > 0 else torch.zeros(n_components)
    coords = coords.cpu().numpy()
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), np.arange(n_components)])
    coords = coords * np.where(signs == 0, 1.0, signs)
    return PCAResult(coords=coords, explained_variance_ratio=ratio.cpu().numpy())


def expert_pca(
    w: ArrayLike, mode: str = "flat", n_components: int = 2, standardize: bool = True
) -> PCAResult:
    """PCA with one point per expert (Closer-Look App. C, Fig. 6).

    Args:
        w: [E, F, D] expert matrices of one type (down transposed).
        mode: "flat" (point = vec W^n, length F·D) or "neuron_avg" (point = mean over F, length D).
        n_components: number of components (<= E).
        standardize: see :func:`pca`.
    """
    t = _experts(w)
    if mode == "flat":
        pts = t.reshape(t.shape[0], -1)
    elif mode == "neuron_avg":
        pts = t.mean(dim=1)
    else:
        raise ValueError(f"mode must be 'flat' or 'neuron_avg'; got {mode!r}")
    res = pca(pts, n_components, standardize)
    return PCAResult(res.coords, res.explained_variance_ratio, np.arange(t.shape[0]))


def neuron_pca(w: ArrayLike, n_components: int = 2, standardize: bool = True) -> PCAResult:
    """PCA with one point per neuron of every expert (Closer-Look App. C, Fig. 7).

    Args:
        w: [E, F, D] expert matrices of one type.

    Returns:
        :class:`PCAResult` with coords [E·F, k] and labels [E·F] = expert index of each neuron.
    """
    t = _experts(w)
    e, f, d = t.shape
    res = pca(t.reshape(e * f, d), n_components, standardize)
    return PCAResult(res.coords, res.explained_variance_ratio, np.repeat(np.arange(e), f))
