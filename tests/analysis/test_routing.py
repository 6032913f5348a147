"""Tests for rmoe.analysis.routing on small hand-worked cases."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from rmoe.analysis import routing as R
from rmoe.analysis.routing import mutual_information as routing_mi


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _mi_reference(u: np.ndarray, v: np.ndarray) -> float:
    """Slow, obvious plug-in MI of paired samples (the sklearn mutual_info_score formula)."""
    n = len(u)
    cu, cv, cuv = Counter(u.tolist()), Counter(v.tolist()), Counter(zip(u.tolist(), v.tolist()))
    return sum((c / n) * math.log(n * c / (cu[a] * cv[b])) for (a, b), c in cuv.items())


# ---------------------------------------------------------------- load


def test_expert_load_constructed_assignment():
    # 4 experts, top-2, 3 tokens: expert 0 x3, expert 1 x2, expert 2 x1, expert 3 unused.
    topk = np.array([[0, 1], [0, 2], [1, 0]])
    s = R.expert_load(topk, num_experts=4)
    np.testing.assert_array_equal(s.counts, [3, 2, 1, 0])
    mean = 6 / 4
    assert s.cv == pytest.approx(np.std([3, 2, 1, 0]) / mean)
    assert s.max_violation == pytest.approx(3 / mean - 1)
    assert s.unused == 1
    assert s.num_tokens == 3
    np.testing.assert_allclose(s.fraction, [0.5, 1 / 3, 1 / 6, 0])
    assert s.to_dict()["counts"] == [3, 2, 1, 0]


def test_expert_load_balanced_and_mask():
    topk = torch.tensor([[0], [1], [2], [3], [3]])
    s = R.expert_load(topk, 4, mask=np.array([1, 1, 1, 1, 0], bool))
    assert s.cv == 0 and s.max_violation == 0 and s.unused == 0


def test_expert_load_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        R.expert_load(np.array([[0, 5]]), 4)


# ---------------------------------------------------------------- entropy / balance


@pytest.mark.parametrize("e,k", [(8, 2), (16, 4), (2, 1)])
def test_uniform_router(e, k):
    n = 10
    probs = np.full((n, e), 1.0 / e)
    np.testing.assert_allclose(R.router_entropy(probs), math.log(e))
    np.testing.assert_allclose(R.normalized_entropy(probs), 1.0)
    assert R.inner_balance(probs) == pytest.approx(1.0)
    assert R.outer_balance(probs, k) == pytest.approx(k / e)
    topk = np.tile(np.arange(k), (n, 1))
    assert R.outer_balance(probs, topk) == pytest.approx(k / e)


def test_one_hot_router_and_hand_values():
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.125, 0.125], [0.6, 0.3, 0.1, 0.0]])
    h = R.router_entropy(probs)
    assert h[0] == 0.0
    assert h[1] == pytest.approx(1.75 * math.log(2))
    # IB ratios: inf, 2, 2 -> median 2 ; OB (k=2): 1, .75, .9 -> median .9
    assert R.inner_balance(probs) == 2.0
    assert R.outer_balance(probs, 2) == pytest.approx(0.9)


def test_probs_validation_catches_logits():
    with pytest.raises(ValueError, match="softmax"):
        R.router_entropy(np.random.default_rng(0).normal(size=(4, 8)))
    with pytest.raises(ValueError, match=r"\[N, E\]"):
        R.router_entropy(np.ones(4) / 4)


def test_entropy_summary():
    h = np.array([0.0, 0.5, 1.0, 1.5])
    s = R.entropy_summary(h, num_experts=8, bins=4)
    assert s.mean == pytest.approx(0.75)
    assert s.median == pytest.approx(0.75)
    assert s.max_entropy == pytest.approx(math.log(8))
    assert s.hist_counts.sum() == 4
    assert s.hist_edges[0] == 0 and s.hist_edges[-1] == pytest.approx(math.log(8))
    assert s.quantiles[0.5] == pytest.approx(0.75)
    d = s.to_dict()
    assert d["quantiles"]["0.5"] == pytest.approx(0.75)


# ---------------------------------------------------------------- binned MI (RMoE estimator)


def test_binned_mi_matches_reference():
    rng = np.random.default_rng(0)
    pa = _softmax(rng.normal(size=(37, 8)) * 2)
    pb = _softmax(rng.normal(size=(37, 8)) * 2)
    got = R.binned_mutual_information(pa, pb, num_bins=10)
    edges = np.linspace(0, 1, 10)
    ref = [_mi_reference(np.digitize(a, edges), np.digitize(b, edges)) for a, b in zip(pa, pb)]
    np.testing.assert_allclose(got, ref, atol=1e-12)


def test_binned_mi_matrix_properties():
    rng = np.random.default_rng(1)
    layers = [_softmax(rng.normal(size=(50, 16)) * s) for s in (1.0, 3.0, 5.0)]
    m = R.binned_mutual_information_matrix(layers)
    assert m.shape == (3, 3)
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(m[0, 1], R.binned_mutual_information(layers[0], layers[1]).mean())
    # the diagonal is the mean entropy of a layer's binned profile, the maximum of its row
    assert np.all(m.diagonal() >= m.max(axis=1) - 1e-12)
    assert np.all(m <= math.log(16) + 1e-12)
    # a uniform router has a constant profile -> no information
    u = np.full((5, 16), 1 / 16)
    assert R.binned_mutual_information_matrix([u, layers[0][:5]]).max() == pytest.approx(
        R.binned_mutual_information_matrix([layers[0][:5]])[0, 0]
    )
    assert R.binned_mutual_information(u, layers[0][:5]).max() == pytest.approx(0.0, abs=1e-12)


def test_binned_mi_chunking_independent(monkeypatch):
    rng = np.random.default_rng(2)
    layers = [_softmax(rng.normal(size=(40, 8)) * 3) for _ in range(2)]
    full = R.binned_mutual_information_matrix(layers)
    monkeypatch.setattr(routing_mi, "_MI_CHUNK_ELEMENTS", 64)  # forces many small chunks
    np.testing.assert_allclose(R.binned_mutual_information_matrix(layers), full)


# ---------------------------------------------------------------- index MI


def test_index_mi_independent_layers_near_zero():
    rng = np.random.default_rng(0)
    n, e = 200_000, 8
    a, b = rng.integers(0, e, n), rng.integers(0, e, n)
    mi = R.index_mutual_information(a, b, e)
    assert 0 <= mi < 5 * (e - 1) ** 2 / (2 * n)


def test_index_mi_copied_routing_equals_entropy():
    rng = np.random.default_rng(0)
    a = rng.choice(8, size=5000, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.03, 0.02])
    h = R.choice_entropy(a, 8)
    assert R.index_mutual_information(a, a, 8) == pytest.approx(h)
    # a relabelled copy (bijection of experts) carries the same information
    assert R.index_mutual_information(a, (a * 3 + 1) % 8, 8) == pytest.approx(h)
    m = R.index_mutual_information_matrix([a, a, rng.integers(0, 8, 5000)], 8)
    assert m[0, 1] == pytest.approx(h) and m[0, 0] == pytest.approx(h)
    np.testing.assert_allclose(m, m.T)


def test_index_mi_topk_version():
    rng = np.random.default_rng(0)
    top2 = np.stack([rng.permutation(8)[:2] for _ in range(4000)])
    # K = 1 columns reduce to the top-1 version
    assert R.index_mutual_information(top2[:, :1], top2[:, :1], 8, use_topk=True) == pytest.approx(
        R.index_mutual_information(top2, top2, 8)
    )
    # tokens always choosing {0, 1} carry no information about each other's draws
    always = np.tile([0, 1], (100, 1))
    assert R.index_mutual_information(always, always, 4, use_topk=True) == pytest.approx(0.0)
    # half {0, 1}, half {2, 3}, copied: joint 1/8 on 8 cells, marginals 1/4 -> MI = ln 2
    halves = np.array([[0, 1]] * 50 + [[2, 3]] * 50)
    assert R.index_mutual_information(halves, halves, 4, use_topk=True) == pytest.approx(
        math.log(2)
    )
    # copied random top-2 routing carries more than independent routing
    other = np.stack([rng.permutation(8)[:2] for _ in range(4000)])
    assert R.index_mutual_information(
        top2, top2, 8, use_topk=True
    ) > 10 * R.index_mutual_information(top2, other, 8, use_topk=True)


# ---------------------------------------------------------------- agreement


def test_routing_agreement():
    a = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])
    b = np.array([[0, 1], [3, 2], [4, 0], [1, 2]])
    r = R.routing_agreement(a, b)
    assert r.top1_agreement == pytest.approx(0.5)  # tokens 0 and 2
    assert r.mean_jaccard == pytest.approx((1 + 1 + 1 / 3 + 0) / 4)
    same = R.routing_agreement(a, a)
    assert same.top1_agreement == 1 and same.mean_jaccard == 1


def test_routing_layer_metrics_json_ready():
    import json

    rng = np.random.default_rng(0)
    probs = _softmax(rng.normal(size=(64, 8)))
    topk = np.argsort(-probs, axis=1)[:, :2]
    d = R.routing_layer_metrics(torch.from_numpy(probs).float(), torch.from_numpy(topk))
    json.dumps(d)
    assert d["num_experts"] == 8 and d["top_k"] == 2
    assert d["load"]["counts"] and sum(d["load"]["counts"]) == 128


# ---------------------------------------------------------------- training log


def _result(probs, idx, dropped=None):
    from rmoe.modeling.routing import RoutingResult

    probs, idx = torch.tensor(probs), torch.tensor(idx)
    return RoutingResult(probs.log(), probs, idx, probs.gather(-1, idx), None, dropped=dropped)


def test_training_log_stats_hand_values():
    """The loads come from topk_idx (the biased choice), not from the top-k of probs."""
    flat = [[0.25] * 4] * 4
    # every token chose experts 0 and 1 (e.g. pushed by a bias): loads [4, 4, 0, 0]
    chosen = _result(flat, [[0, 1]] * 4, dropped=torch.tensor([[False, True]] * 3 + [[True] * 2]))
    # a balanced layer, dropless: loads [2, 2, 2, 2]
    balanced = _result(flat, [[0, 1], [2, 3], [0, 1], [2, 3]])
    st = R.training_log_stats([chosen, balanced])
    assert set(st) == {"load_cv", "max_violation", "entropy", "aux", "dropped", "logit_std"}
    assert st["load_cv"] == pytest.approx([1.0, 0.0])  # counts [4,4,0,0]: std 2 / mean 2
    assert st["max_violation"] == pytest.approx([1.0, 0.0])  # max 4 / mean 2 - 1
    assert st["entropy"] == pytest.approx([1.0, 1.0])
    # Switch loss E * sum f_e P_e: f = (0.5, 0.5, 0, 0), P = 0.25 each -> 4 * 0.25 = 1
    assert st["aux"] == pytest.approx([1.0, 1.0])
    assert st["dropped"] == pytest.approx([5 / 8, 0.0])
    assert st["logit_std"] == pytest.approx([0.0, 0.0], abs=1e-6)  # flat logits
    sharp = _result([[0.7, 0.1, 0.1, 0.1]] * 4, [[0, 1]] * 4)
    spread = torch.tensor([0.7, 0.1, 0.1, 0.1]).log()
    assert R.training_log_stats([sharp])["logit_std"] == pytest.approx(
        [spread.std(unbiased=False).item()], rel=1e-5
    )
    biased = R.training_log_stats([chosen, balanced], [torch.tensor([0.5, 0.25, -0.25, 0.0]), None])
    assert biased["bias_range"] == pytest.approx([0.75, 0.0])
    with pytest.raises(ValueError, match="one per layer"):
        R.training_log_stats([chosen, balanced], [torch.zeros(4)])


def test_training_log_stats_entropy_of_the_routers_distribution():
    # sigmoid scores (0.8, 0.2, 0.2, 0.2) normalised: probs (4/7, 1/7, 1/7, 1/7)
    p = [[4 / 7, 1 / 7, 1 / 7, 1 / 7]]
    st = R.training_log_stats([_result(p, [[0, 1]])])
    q = np.array(p[0])
    assert st["entropy"][0] == pytest.approx(-(q * np.log(q)).sum() / math.log(4), rel=1e-5)
