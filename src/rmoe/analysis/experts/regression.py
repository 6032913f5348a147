"""Router-vs-expert similarity regression (Closer-Look: is the router's geometry the experts'?)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import linregress

from rmoe.analysis._arrays import ArrayLike, check_ndim, to_numpy, to_tensor
from rmoe.analysis.experts._common import _cosine_gram, _experts
from rmoe.analysis.experts.similarity import neuron_averaged_similarity

# --------------------------------------------------------------------------------------------
# router vs expert similarity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearFit:
    """Least-squares fit y = slope·x + intercept over the E(E-1)/2 expert pairs.

    Attributes:
        slope, intercept: fit coefficients.
        r: Pearson correlation; r2 = r².
        p_value: two-sided p-value of slope = 0 (``scipy.stats.linregress``).
        num_pairs: number of expert pairs fitted.
    """

    slope: float
    intercept: float
    r: float
    r2: float
    p_value: float
    num_pairs: int

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def similarity_regression(sim_y: ArrayLike, sim_x: ArrayLike) -> LinearFit:
    """Fit the strict upper triangle of ``sim_y`` [E, E] linearly on that of ``sim_x`` [E, E].

    Raises ``ValueError`` when E < 3 or ``sim_x`` is constant (no fit is defined).
    """
    y = to_numpy(sim_y, np.float64, "sim_y")
    x = to_numpy(sim_x, np.float64, "sim_x")
    check_ndim(y, 2, "sim_y", "[E, E]")
    if x.shape != y.shape or y.shape[0] != y.shape[1]:
        raise ValueError(
            f"sim_y {y.shape} and sim_x {x.shape} must be square matrices of the same shape [E, E]"
        )
    e = y.shape[0]
    if e < 3:
        raise ValueError(f"a regression over expert pairs needs E >= 3 experts; got E = {e}")
    iu = np.triu_indices(e, k=1)
    xv, yv = x[iu], y[iu]
    if np.ptp(xv) == 0:
        raise ValueError(
            "sim_x is constant over expert pairs, so no regression is defined; this happens "
            "when all experts are identical or mutually orthogonal"
        )
    res = linregress(xv, yv)
    r = float(res.rvalue) if np.isfinite(res.rvalue) else 0.0
    return LinearFit(
        slope=float(res.slope),
        intercept=float(res.intercept),
        r=r,
        r2=r * r,
        p_value=float(res.pvalue),
        num_pairs=int(xv.size),
    )


def router_similarity_regression(
    router_weight: ArrayLike, experts: Mapping[str, ArrayLike]
) -> dict[str, LinearFit]:
    """Regress router-row similarity on neuron-averaged expert similarity (Closer-Look §4.2).

    G_nm = cos(W_g[n], W_g[m]) is regressed on S^avg_nm(W) for each matrix type W over the
    E(E-1)/2 expert pairs; the paper reports R² per layer (mean: act ≈ 0.15–0.40, up/down ≈ 0).

    Args:
        router_weight: [E, D] router (gate) weight.
        experts: {"up": [E, F, D], "act": [E, F, D], "down": [E, F, D], …} matrix stacks.

    Returns:
        {matrix type: :class:`LinearFit`}.
    """
    r = to_tensor(router_weight, torch.float32, "router_weight")
    check_ndim(r, 2, "router_weight", "[E, D]")
    g = _cosine_gram(r)
    out: dict[str, LinearFit] = {}
    for name, w in experts.items():
        s = neuron_averaged_similarity(_experts(w, f"experts[{name!r}]"))
        if s.shape != g.shape:
            raise ValueError(
                f"experts[{name!r}] has {s.shape[0]} experts but router_weight has {g.shape[0]} "
                "rows; pass the routed experts of the same layer"
            )
        out[name] = similarity_regression(g, s)
    return out
