"""Statistics for comparing arms: mean ± std over seeds, the paired bootstrap over evaluation
batches, and seed-level intervals with an equivalence (TOST) verdict.

Paired bootstrap. Two models A and B are scored on the same evaluation batches b = 1..n, giving
summed losses a_b, b_b (nats) and token counts t_b. The difference in bits per byte is

    d = (Σ a_b - Σ b_b) / Σ t_b / ln 2 * (tokens / byte)

Resampling batches with replacement (the same indices for both models) and recomputing d gives
its bootstrap distribution; the percentile interval is reported. Pairing removes the
between-batch variance that both models share (some text is simply harder), which is most of it.
It covers evaluation noise only, not training-seed noise.

Seed level. With seeds s = 1..n, d_s = bpb(arm, s) - bpb(reference, s) (same seed: same data
order and non-router init; same depth). `seed_interval` gives the mean of the d_s and either the
t interval mean ± t_{1-(1-level)/2, n-1} · sd / √n (sd with ddof = 1), or a percentile
bootstrap over seeds (resample the n differences with replacement). One seed gives no interval.

Verdict (`tost_verdict`, margin δ > 0, level α; negative d = arm better, as bits per byte):

1. "equivalent" when the (1 - 2α) t interval lies strictly inside (-δ, +δ) — the two one-sided
   tests (TOST) of H0: d ≤ -δ and H0: d ≥ +δ both reject at level α;
2. else "better" when the ordinary two-sided (1 - α) t interval lies below 0 (hi < 0),
   "worse" when it lies above 0 (lo > 0);
3. else "inconclusive" (also whenever n < 2: no interval).

Equivalence is checked first: a difference shown to be smaller than the margin is reported as
"equivalent" even if it is also significantly different from 0 (`excludes_zero` says so), since
δ is the size the study declared to matter. With α = 0.05 the intervals are 90 % (TOST) and 95 %.
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


VERDICTS = ("better", "worse", "equivalent", "inconclusive")
INTERVAL_METHODS = ("t", "bootstrap")


@dataclass(frozen=True)
class SeedInterval:
    """Mean of per-seed paired differences with an interval over seeds.

    Attributes:
        mean: mean of the differences (NaN for none).
        lo, hi: interval bounds (NaN when n < 2: no interval).
        level: confidence level of [lo, hi].
        n: number of seeds (differences).
        std: sample standard deviation of the differences (ddof = 1; NaN when n < 2).
        method: `t` (t interval, n - 1 degrees of freedom) or `bootstrap` (percentile bootstrap
            over seeds).
    """

    mean: float
    lo: float
    hi: float
    level: float
    n: int
    std: float
    method: str = "t"

    def to_dict(self) -> dict:
        """Plain dict."""
        return asdict(self)

    @property
    def has_interval(self) -> bool:
        """True when [lo, hi] is defined (n >= 2)."""
        return not (math.isnan(self.lo) or math.isnan(self.hi))


def _t_quantile(q: float, df: int) -> float:
    try:
        from scipy import stats as sps
    except ImportError as exc:  # pragma: no cover - scipy ships with the analysis/test extras
        raise ImportError(
            "seed-level t intervals need scipy: pip install 'rmoe[analysis]'"
        ) from exc
    return float(sps.t.ppf(q, df))


def seed_interval(
    diffs: Sequence[float],
    level: float = 0.95,
    method: str = "t",
    n_boot: int = 10000,
    seed: int = 0,
) -> SeedInterval:
    """Mean and interval over seeds of paired per-seed differences (arm - reference).

    Args:
        diffs: [n] one difference per seed (NaN/None entries are dropped).
        level: two-sided confidence level in (0, 1).
        method: `t`: mean ± t_{(1+level)/2, n-1} · sd / √n; `bootstrap`: percentile interval of
            the mean over `n_boot` resamples of the n seeds with replacement.
        n_boot: bootstrap resamples (method `bootstrap` only).
        seed: resampling seed (method `bootstrap` only).

    n = 1 gives the difference as the mean and no interval (lo = hi = std = NaN).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if method not in INTERVAL_METHODS:
        raise ValueError(f"method must be one of {INTERVAL_METHODS}, got {method!r}")
    d = np.array([float(x) for x in diffs if x is not None and not math.isnan(float(x))])
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return SeedInterval(nan, nan, nan, level, 0, nan, method)
    mean = float(d.mean())
    if n == 1:
        return SeedInterval(mean, nan, nan, level, 1, nan, method)
    sd = float(d.std(ddof=1))
    if method == "t":
        half = _t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    else:
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        lo, hi = (float(v) for v in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))
    return SeedInterval(mean, float(lo), float(hi), level, n, sd, method)


@dataclass(frozen=True)
class Verdict:
    """A seed-level comparison arm - reference with its TOST verdict (see the module docstring).

    Attributes:
        verdict: `better`, `worse`, `equivalent` or `inconclusive`.
        mean: mean over seeds of the paired differences (bits per byte; negative = arm better).
        lo, hi: the ordinary two-sided interval at `level` = 1 - alpha (NaN when n < 2).
        level: 1 - alpha.
        n: seeds.
        std: sample standard deviation of the differences (NaN when n < 2).
        margin: equivalence margin delta.
        alpha: level of each one-sided test.
        tost_lo, tost_hi: the 1 - 2 alpha interval that must lie inside (-margin, +margin).
        tost_level: 1 - 2 alpha.
        excludes_zero: the ordinary interval excludes 0 (may hold with `equivalent`).
        method: how the intervals were made (`t` or `bootstrap`).
    """

    verdict: str
    mean: float
    lo: float
    hi: float
    level: float
    n: int
    std: float
    margin: float
    alpha: float
    tost_lo: float
    tost_hi: float
    tost_level: float
    excludes_zero: bool
    method: str = "t"

    def to_dict(self) -> dict:
        """Plain dict."""
        return asdict(self)


def tost_verdict(
    diffs: Sequence[float],
    margin: float = 0.01,
    alpha: float = 0.05,
    method: str = "t",
    n_boot: int = 10000,
    seed: int = 0,
) -> Verdict:
    """Better / worse / equivalent / inconclusive for per-seed differences arm - reference.

    Args:
        diffs: [n] paired per-seed differences in bits per byte (negative = arm better).
        margin: equivalence margin delta > 0 (bits per byte), stated before running.
        alpha: level of each one-sided test, in (0, 0.5).
        method, n_boot, seed: as in `seed_interval` (both intervals use the same method).

    Rules, in order: equivalent if the (1 - 2 alpha) interval lies strictly inside
    (-margin, +margin); better if the (1 - alpha) interval's hi < 0; worse if its lo > 0;
    otherwise (or with fewer than two seeds) inconclusive.
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    ordinary = seed_interval(diffs, 1 - alpha, method, n_boot, seed)
    tost = seed_interval(diffs, 1 - 2 * alpha, method, n_boot, seed)
    excludes_zero = ordinary.has_interval and (ordinary.lo > 0 or ordinary.hi < 0)
    if not ordinary.has_interval:
        verdict = "inconclusive"
    elif -margin < tost.lo and tost.hi < margin:
        verdict = "equivalent"
    elif ordinary.hi < 0:
        verdict = "better"
    elif ordinary.lo > 0:
        verdict = "worse"
    else:
        verdict = "inconclusive"
    return Verdict(
        verdict=verdict,
        mean=ordinary.mean,
        lo=ordinary.lo,
        hi=ordinary.hi,
        level=ordinary.level,
        n=ordinary.n,
        std=ordinary.std,
        margin=float(margin),
        alpha=float(alpha),
        tost_lo=tost.lo,
        tost_hi=tost.hi,
        tost_level=tost.level,
        excludes_zero=bool(excludes_zero),
        method=method,
    )
