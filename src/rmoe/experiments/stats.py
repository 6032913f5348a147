"""Statistics for comparing arms: mean ± std over seeds, and the paired bootstrap over evaluation
batches.

Paired bootstrap. Two models A and B are scored on the same evaluation batches b = 1..n, giving
summed losses a_b, b_b (nats) and token counts t_b. The difference in bits per byte is

    d = (Σ a_b - Σ b_b) / Σ t_b / ln 2 * (tokens / byte)

Resampling batches with replacement (the same indices for both models) and recomputing d gives
its bootstrap distribution; the percentile interval is reported. Pairing removes the
between-batch variance that both models share (some text is simply harder), which is most of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDiff:
    """Paired difference A - B in bits per byte with a bootstrap interval.

    Attributes:
        diff: the observed difference on all batches (negative = A better).
        lo, hi: percentile bootstrap interval bounds.
        level: confidence level of [lo, hi].
        n_batches: evaluation batches.
        n_boot: bootstrap resamples.
        p_a_better: fraction of resamples with diff < 0.
    """

    diff: float
    lo: float
    hi: float
    level: float
    n_batches: int
    n_boot: int
    p_a_better: float

    def to_dict(self) -> dict:
        """Plain dict."""
        return asdict(self)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval does not contain 0."""
        return self.lo > 0 or self.hi < 0


def paired_bootstrap(
    loss_a: Sequence[float],
    loss_b: Sequence[float],
    tokens: Sequence[int],
    tokens_per_byte: float = 1.0,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDiff:
    """Bootstrap interval of the bits-per-byte difference A - B over evaluation batches.

    With several seeds (2-D inputs [S, n], row s = the pair trained with seed s, all scored on
    the same n batches) the statistic is the mean over seeds of the per-seed differences, and the
    same batch indices are resampled for every seed. The interval then covers evaluation-batch
    noise only; seed-to-seed variation is reported separately (mean ± std over seeds).

    Args:
        loss_a, loss_b: [n] or [S, n] summed loss (nats) of each batch for A and B.
        tokens: [n] tokens scored in each batch.
        tokens_per_byte: the split's tokens per byte (1 for bytes ≈ bits per character).
        n_boot: resamples (0 = no interval: lo = hi = diff).
        level: confidence level.
        seed: resampling seed.
    """
    a = np.atleast_2d(np.asarray(loss_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(loss_b, dtype=np.float64))
    t = np.asarray(tokens, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or t.ndim != 1 or a.shape[1] != t.size or t.size == 0:
        raise ValueError(
            "loss_a and loss_b must have one shape [n] or [S, n] and tokens shape [n] (n > 0); "
            f"got {np.shape(loss_a)}, {np.shape(loss_b)}, {np.shape(tokens)}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = t.size
    scale = tokens_per_byte / math.log(2)
    delta = a - b  # [S, n]
    diff = float((delta.sum(axis=1) / t.sum()).mean() * scale)
    if n_boot <= 0:
        return PairedDiff(diff, diff, diff, level, n, 0, float(diff < 0))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    d = (delta[:, idx].sum(axis=2) / t[idx].sum(axis=1)).mean(axis=0) * scale  # [n_boot]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(d, [alpha, 1 - alpha])
    return PairedDiff(diff, float(lo), float(hi), level, n, int(n_boot), float((d < 0).mean()))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaN for none)."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    if not v:
        return float("nan"), float("nan")
    if len(v) == 1:
        return v[0], 0.0
    return float(np.mean(v)), float(np.std(v, ddof=1))
