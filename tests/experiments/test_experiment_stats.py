"""The paired bootstrap, the seed summaries, seed-level intervals and the TOST verdict on
constructed, hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmoe.experiments.stats import mean_std, paired_bootstrap, seed_interval, tost_verdict


def test_constant_difference_gives_a_zero_width_interval():
    rng = np.random.default_rng(0)
    b = rng.normal(2000.0, 300.0, 40)  # per-batch summed nats, very different batches
    t = np.full(40, 1000)
    pd = paired_bootstrap(b - 5.0, b, t, tokens_per_byte=1.0, n_boot=500)
    expected = -5.0 * 40 / (1000 * 40) / math.log(2)
    assert pd.diff == pytest.approx(expected)
    assert pd.lo == pytest.approx(expected) and pd.hi == pytest.approx(expected)
    assert pd.excludes_zero and pd.p_a_better == 1.0


def test_interval_matches_the_normal_approximation():
    """Per-batch differences d_i ~ N(mu, s) on equal-size batches: the 95% interval of the
    mean is about mu_hat ± 1.96 s / sqrt(n) (in bits: divide by tokens and ln 2)."""
    rng = np.random.default_rng(1)
    n, tok, mu, s = 400, 1000, -2.0, 10.0
    b = rng.normal(1500.0, 200.0, n)
    d = rng.normal(mu, s, n)
    pd = paired_bootstrap(b + d, b, np.full(n, tok), n_boot=4000, seed=3)
    scale = 1 / tok / math.log(2)
    assert pd.diff == pytest.approx(d.mean() * scale)
    half = 1.96 * d.std(ddof=1) / math.sqrt(n) * scale
    assert (pd.hi - pd.lo) / 2 == pytest.approx(half, rel=0.1)
    assert pd.lo < pd.diff < pd.hi


def test_pairing_removes_shared_batch_variance():
    """Huge between-batch variance shared by both models does not widen the interval."""
    rng = np.random.default_rng(2)
    hard = rng.normal(0, 1e4, 50)
    noise = rng.normal(0, 1.0, 50)
    pd = paired_bootstrap(5000 + hard + noise, 5000 + hard, np.full(50, 1000), n_boot=1000)
    assert pd.hi - pd.lo < 0.002


def test_tokens_per_byte_and_level():
    b = np.full(10, 700.0)
    pd = paired_bootstrap(b - 7.0, b, np.full(10, 100), tokens_per_byte=0.25, n_boot=0)
    assert pd.diff == pytest.approx(-7.0 / 100 / math.log(2) * 0.25)
    assert pd.n_boot == 0 and pd.lo == pd.hi == pd.diff
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(b, b, np.full(10, 100), level=1.5)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap(b, b[:5], np.full(10, 100))


def test_several_seeds_average_the_per_seed_differences():
    rng = np.random.default_rng(4)
    b = rng.normal(1000.0, 50.0, (2, 30))
    a = b.copy()
    a[0] -= 3.0
    a[1] -= 1.0
    pd = paired_bootstrap(a, b, np.full(30, 500), n_boot=200)
    assert pd.diff == pytest.approx(-2.0 / 500 / math.log(2))
    assert pd.lo == pytest.approx(pd.diff) and pd.hi == pytest.approx(pd.diff)


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([2.5]) == (2.5, 0.0)
    m, s = mean_std([])
    assert math.isnan(m) and math.isnan(s)


# t quantiles (tables): t_{0.975, 2}, t_{0.95, 2}, t_{0.975, 3}, t_{0.95, 3}
T975_2, T95_2, T975_3, T95_3 = (
    4.302652729749462,
    2.919985580353724,
    3.182446305283708,
    2.353363434801823,
)


def test_seed_interval_t_by_hand():
    # mean 2, sd 1, n 3: half-width t_{0.975,2} / sqrt(3)
    si = seed_interval([1.0, 2.0, 3.0], level=0.95)
    half = T975_2 / math.sqrt(3)
    assert (si.mean, si.n, si.std, si.method) == (2.0, 3, 1.0, "t")
    assert si.lo == pytest.approx(2.0 - half) and si.hi == pytest.approx(2.0 + half)
    assert si.has_interval and si.level == 0.95
    si90 = seed_interval([1.0, 2.0, 3.0], level=0.90)
    assert si90.hi - si90.mean == pytest.approx(T95_2 / math.sqrt(3))


def test_seed_interval_one_seed_has_no_interval_and_nans_are_dropped():
    si = seed_interval([0.03, float("nan"), None])
    assert si.mean == 0.03 and si.n == 1
    assert not si.has_interval and math.isnan(si.lo) and math.isnan(si.hi) and math.isnan(si.std)
    empty = seed_interval([])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_seed_interval_bootstrap_over_seeds():
    # resamples of {1, 2, 3}: 27 equally likely draws; the mean is 1 with probability 1/27,
    # 4/3 with 3/27 (cumulative 4/27 = 14.8 %), so the 10 % quantile is 4/3 (90 %: 8/3) and the
    # 2.5 % quantile is 1 (97.5 %: 3)
    si = seed_interval([1.0, 2.0, 3.0], level=0.8, method="bootstrap", n_boot=4000, seed=1)
    assert si.method == "bootstrap" and si.mean == 2.0
    assert si.lo == pytest.approx(4 / 3) and si.hi == pytest.approx(8 / 3)
    wide = seed_interval([1.0, 2.0, 3.0], level=0.95, method="bootstrap", n_boot=4000, seed=1)
    assert (wide.lo, wide.hi) == (1.0, 3.0)
    const = seed_interval([0.5, 0.5], method="bootstrap", n_boot=100)
    assert const.lo == const.hi == 0.5
    with pytest.raises(ValueError, match="method"):
        seed_interval([1.0, 2.0], method="normal")
    with pytest.raises(ValueError, match="level"):
        seed_interval([1.0, 2.0], level=1.0)


def test_tost_equivalent():
    # mean 0.0005, sd sqrt(5e-6 / 3); the 90% interval +- t_{0.95,3} sd / 2 lies inside +-0.01
    d = [0.001, -0.001, 0.002, 0.000]
    v = tost_verdict(d, margin=0.01, alpha=0.05)
    sd = math.sqrt(5e-6 / 3)
    assert v.verdict == "equivalent" and v.n == 4
    assert v.mean == pytest.approx(0.0005) and v.std == pytest.approx(sd)
    assert v.tost_lo == pytest.approx(0.0005 - T95_3 * sd / 2)
    assert v.tost_hi == pytest.approx(0.0005 + T95_3 * sd / 2)
    assert v.lo == pytest.approx(0.0005 - T975_3 * sd / 2) and v.lo < 0 < v.hi
    assert not v.excludes_zero
    assert (v.level, v.tost_level, v.margin, v.alpha) == (0.95, pytest.approx(0.9), 0.01, 0.05)
    # the same differences with a margin the 90% interval crosses (hi = 0.00202): inconclusive
    assert tost_verdict(d, margin=0.002).verdict == "inconclusive"


def test_tost_inconclusive():
    # mean 0.005, sd 0.015: the 95% interval [-0.032, +0.042] holds 0 and crosses the margin
    v = tost_verdict([0.02, -0.01, 0.005], margin=0.01, alpha=0.05)
    assert v.verdict == "inconclusive"
    assert v.mean == pytest.approx(0.005) and v.std == pytest.approx(0.015)
    assert v.hi == pytest.approx(0.005 + T975_2 * 0.015 / math.sqrt(3))


def test_tost_better_and_worse():
    # mean -0.045, sd 0.005: 95% interval -0.045 +- 0.01242, below 0 and outside the margin
    better = tost_verdict([-0.04, -0.05, -0.045], margin=0.01, alpha=0.05)
    assert better.verdict == "better" and better.excludes_zero
    assert better.hi == pytest.approx(-0.045 + T975_2 * 0.005 / math.sqrt(3))
    worse = tost_verdict([0.04, 0.05, 0.045], margin=0.01, alpha=0.05)
    assert worse.verdict == "worse" and worse.lo == pytest.approx(-better.hi)
    # significantly worse though not shown beyond the margin: 95% [0.0050, 0.0150] -> worse
    assert tost_verdict([0.008, 0.012, 0.010], margin=0.01).verdict == "worse"


def test_tost_equivalence_wins_over_a_significant_small_difference():
    # mean 0.005, sd 0.001: 95% [0.0025, 0.0075] excludes 0, 90% [0.0033, 0.0067] inside +-0.01
    v = tost_verdict([0.004, 0.005, 0.006], margin=0.01, alpha=0.05)
    assert v.verdict == "equivalent" and v.excludes_zero
    assert v.tost_lo == pytest.approx(0.005 - T95_2 * 0.001 / math.sqrt(3))


def test_tost_one_seed_and_identical_seeds():
    one = tost_verdict([-0.2])
    assert one.verdict == "inconclusive" and one.mean == -0.2 and math.isnan(one.lo)
    assert not one.excludes_zero
    # zero spread: the intervals collapse on the mean
    assert tost_verdict([0.0, 0.0, 0.0]).verdict == "equivalent"
    assert tost_verdict([-0.02, -0.02]).verdict == "better"
    with pytest.raises(ValueError, match="margin"):
        tost_verdict([0.0, 0.1], margin=0.0)
    with pytest.raises(ValueError, match="alpha"):
        tost_verdict([0.0, 0.1], alpha=0.5)
