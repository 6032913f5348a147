"""Tests for rmoe.analysis.experts on constructed experts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from rmoe.analysis import experts as X


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------- weight similarity


def test_identical_experts_similarity_one(rng):
    w = np.repeat(rng.normal(size=(1, 6, 5)), 4, axis=0)
    np.testing.assert_allclose(X.expert_cosine_similarity(w), np.ones((4, 4)), atol=1e-6)
    np.testing.assert_allclose(X.neuron_averaged_similarity(w), np.ones((4, 4)), atol=1e-6)


def test_flat_similarity_hand_value():
    w = np.zeros((2, 1, 2))
    w[0, 0] = [1.0, 0.0]
    w[1, 0] = [1.0, 1.0]
    np.testing.assert_allclose(X.expert_cosine_similarity(w)[0, 1], 1 / math.sqrt(2), atol=1e-6)


def test_neuron_average_permutation_invariant_and_shared_expert(rng):
    w = torch.from_numpy(rng.normal(size=(3, 8, 5)))
    permuted = w[:, torch.randperm(8)]
    np.testing.assert_allclose(
        X.neuron_averaged_similarity(w), X.neuron_averaged_similarity(permuted), atol=1e-6
    )
    shared = rng.normal(size=(12, 5))  # a shared expert with F = 12
    s = X.neuron_averaged_similarity([w, shared])
    assert s.shape == (4, 4)
    np.testing.assert_allclose(s[:3, :3], X.neuron_averaged_similarity(w), atol=1e-6)
    with pytest.raises(ValueError, match="model width D"):
        X.neuron_averaged_similarity([w, rng.normal(size=(12, 6))])


def test_down_to_canonical():
    down = torch.arange(24.0).reshape(2, 3, 4)  # [E, D, F]
    assert X.down_to_canonical(down).shape == (2, 4, 3)
    assert X.down_to_canonical(down.numpy()).shape == (2, 4, 3)


# ---------------------------------------------------------------- neuron matching


def test_matching_recovers_permutation(rng):
    a = rng.normal(size=(32, 16))
    perm = rng.permutation(32)
    b = a[perm]  # b[j] = a[perm[j]]  ->  a[i] matches b[inverse[i]]
    m = X.match_neurons(a, b)
    inverse = np.argsort(perm)
    np.testing.assert_array_equal(m.permutation, inverse)
    np.testing.assert_allclose(b[m.permutation], a)
    assert m.mean_matched_cosine == pytest.approx(1.0, abs=1e-6)
    assert m.flat_cosine_after == pytest.approx(1.0, abs=1e-6)
    assert m.flat_cosine_before < 0.5
    assert m.kendall_tau == pytest.approx(kendalltau(np.arange(32), inverse).statistic)


def test_matching_identity_has_tau_one(rng):
    a = rng.normal(size=(10, 4))
    m = X.match_neurons(a, a + 0.01 * rng.normal(size=a.shape))
    np.testing.assert_array_equal(m.permutation, np.arange(10))
    assert m.kendall_tau == pytest.approx(1.0)
    assert "permutation" not in m.to_dict()


def test_match_expert_pairs_selection(rng):
    w = rng.normal(size=(5, 6, 4))
    w[3] = w[1][::-1] * 2.0  # expert 3 = a reordered, scaled copy of expert 1
    assert len(X.select_pairs(w)) == 10  # E <= 16: all pairs
    assert X.select_pairs(w, "adjacent") == [(0, 1), (1, 2), (2, 3), (3, 4)]
    results = {r.pair: r for r in X.match_expert_pairs(w)}
    assert results[(1, 3)].mean_matched_cosine == pytest.approx(1.0, abs=1e-6)
    assert results[(1, 3)].kendall_tau == pytest.approx(-1.0)
    big = rng.normal(size=(20, 3, 4))
    big[7] = big[2] * 3
    nearest = X.select_pairs(big)
    assert (2, 7) in nearest and len(nearest) <= 20
    with pytest.raises(ValueError, match="pairs must be"):
        X.select_pairs(w, "everything")
    with pytest.raises(ValueError, match="invalid"):
        X.select_pairs(w, [(0, 0)])


# ---------------------------------------------------------------- router regression


def test_router_regression_r2_one_when_router_follows_experts(rng):
    e, f, d = 6, 8, 5
    act = rng.normal(size=(e, f, d)) + rng.normal(size=(e, 1, d))  # distinct mean directions
    up = rng.normal(size=(e, f, d))
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    # router rows: rotated, rescaled neuron-averaged act vectors -> identical cosines
    router = (act.mean(axis=1) @ q) * rng.uniform(0.5, 2.0, size=(e, 1))
    fits = X.router_similarity_regression(router, {"act": act, "up": up})
    assert fits["act"].r2 == pytest.approx(1.0)
    assert fits["act"].slope == pytest.approx(1.0)
    assert fits["act"].intercept == pytest.approx(0.0, abs=1e-6)
    assert fits["act"].num_pairs == e * (e - 1) // 2
    assert fits["up"].r2 < 0.9


def test_similarity_regression_errors():
    with pytest.raises(ValueError, match="E >= 3"):
        X.similarity_regression(np.eye(2), np.eye(2))
    with pytest.raises(ValueError, match="constant"):
        X.similarity_regression(np.random.default_rng(0).normal(size=(4, 4)), np.eye(4))


# ---------------------------------------------------------------- PCA


def test_pca_matches_numpy_svd(rng):
    x = rng.normal(size=(7, 30)) * np.linspace(1, 5, 30)
    for standardize in (False, True):
        res = X.pca(x, 2, standardize=standardize)
        xc = x - x.mean(axis=0)
        if standardize:
            xc = xc / xc.std(axis=0)
        u, s, _ = np.linalg.svd(xc, full_matrices=False)
        ref = u[:, :2] * s[:2]
        np.testing.assert_allclose(np.abs(res.coords), np.abs(ref), atol=1e-4)
        np.testing.assert_allclose(
            res.explained_variance_ratio, s[:2] ** 2 / (s**2).sum(), atol=1e-6
        )
    tall = X.pca(rng.normal(size=(40, 3)), 2)  # covariance branch
    assert tall.coords.shape == (40, 2)
    assert tall.explained_variance_ratio.sum() <= 1 + 1e-9


def test_expert_and_neuron_pca_shapes(rng):
    w = rng.normal(size=(4, 6, 5))
    assert X.expert_pca(w).coords.shape == (4, 2)
    assert X.expert_pca(w, mode="neuron_avg").coords.shape == (4, 2)
    res = X.neuron_pca(w)
    assert res.coords.shape == (24, 2)
    np.testing.assert_array_equal(res.labels, np.repeat(np.arange(4), 6))


# ---------------------------------------------------------------- outputs


def test_output_similarity(rng):
    base = rng.normal(size=(10, 8))
    outputs = np.stack([base, 2 * base, -base])  # [E=3, N, D]
    s = X.expert_output_similarity(outputs)
    np.testing.assert_allclose(s.cosine, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-6)
    np.testing.assert_allclose(s.angular, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-3)
    orth = np.zeros((2, 1, 2))
    orth[0, 0, 0] = orth[1, 0, 1] = 1.0
    assert X.expert_output_similarity(orth).angular[0, 1] == pytest.approx(0.5)


def test_norm_score_rank_counts():
    norms = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    scores = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    c = X.norm_score_rank_counts(norms, scores)
    # token 0: ranks agree -> diagonal; token 1: norm ranks reversed -> anti-diagonal
    np.testing.assert_array_equal(c, [[1, 0, 1], [0, 2, 0], [1, 0, 1]])
    assert c.sum() == 6
    assert X.rank_count_agreement(c) == pytest.approx(4 / 6)
    outputs = np.random.default_rng(0).normal(size=(3, 4, 5))
    np.testing.assert_allclose(
        X.expert_output_norms(outputs), np.linalg.norm(outputs, axis=-1).T, rtol=1e-6
    )


def test_activation_ratio():
    a = np.array([[0.0, 1e-4, 0.5, -0.2], [1e-2, 0.0, 0.0, 0.0]])
    assert X.activation_ratio(a) == pytest.approx(3 / 8)
    np.testing.assert_allclose(X.activation_ratio(a, expert_axis=0), [0.5, 0.25])


# ---------------------------------------------------------------- RMoE diversity score


def test_diversity_identical_experts(rng):
    one = rng.normal(size=(1, 6, 5))
    act, up, down = (np.repeat(one + i, 4, axis=0) for i in range(3))
    assert X.expert_diversity_score([act]) == pytest.approx(1.0)
    assert X.expert_diversity_score([act, up, down]) == pytest.approx(3.0)
    assert X.expert_diversity_score([act, up, down], normalize=True) == pytest.approx(1.0)


def test_diversity_orthogonal_experts_is_m_over_e():
    e, d = 4, 4
    w = np.zeros((e, 2, d))
    w[np.arange(e), :, np.arange(e)] = 1.0  # expert n's neuron average is the basis vector e_n
    assert X.expert_diversity_score([w, w]) == pytest.approx(2 / e)
    assert X.expert_diversity_score([w, w], normalize=True) == pytest.approx(1 / e)
