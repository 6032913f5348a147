"""The paired bootstrap and the seed summaries on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmoe.experiments.stats import mean_std, paired_bootstrap


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
