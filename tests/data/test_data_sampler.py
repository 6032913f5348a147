"""Sampler: seed-only order, exact resume, rank sharding, evaluation windows, batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rmoe.data import WindowSampler, eval_windows, get_batch


def _take(sampler, n):
    return [b.tolist() for b in itertools.islice(sampler, n)]


def test_order_depends_only_on_seed():
    a = _take(WindowSampler(10_000, seq_len=16, batch_size=8, seed=3), 50)
    b = _take(WindowSampler(10_000, seq_len=16, batch_size=8, seed=3), 50)
    c = _take(WindowSampler(10_000, seq_len=16, batch_size=8, seed=4), 50)
    assert a == b
    assert a != c


def test_epochs_cover_every_window_once_and_reshuffle():
    sampler = WindowSampler(1_000, seq_len=10, batch_size=9, seed=0)
    n = sampler.n_windows  # 99 windows, 11 batches per epoch
    first = sampler.epoch_starts(0)
    second = sampler.epoch_starts(1)
    for starts in (first, second):
        assert len(set(starts.tolist())) == n
        assert ((starts - starts.min()) % 10 == 0).all()
        assert starts.min() >= 0 and starts.max() + 11 <= 1_000
    assert first.tolist() != second.tolist()
    stream = np.concatenate(_take(sampler, 11))
    assert stream.tolist() == first.tolist()
    assert sampler.epoch == 1


def test_batches_straddle_epochs_when_needed():
    sampler = WindowSampler(51, seq_len=10, batch_size=3, seed=1)  # 5 windows per epoch
    batches = _take(sampler, 5)  # 15 windows = 3 epochs
    flat = sum(batches, [])
    expected = np.concatenate([sampler.epoch_starts(e) for e in range(3)]).tolist()
    assert flat == expected


def test_resume_equals_uninterrupted():
    reference = WindowSampler(5_000, seq_len=32, batch_size=4, seed=7)
    expected = _take(reference, 120)
    first = WindowSampler(5_000, seq_len=32, batch_size=4, seed=7)
    got = _take(first, 37)
    state = first.state_dict()
    resumed = WindowSampler(5_000, seq_len=32, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    got += _take(resumed, 120 - 37)
    assert got == expected
    assert resumed.step == 120


def test_resume_rejects_other_settings():
    state = WindowSampler(5_000, seq_len=32, batch_size=4, seed=7).state_dict()
    with pytest.raises(ValueError, match="seed"):
        WindowSampler(5_000, seq_len=32, batch_size=4, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        WindowSampler(5_000, seq_len=16, batch_size=4, seed=7).load_state_dict(state)


def test_rank_shards_disjoint_and_cover_global_batch():
    world = 4
    single = WindowSampler(20_000, seq_len=8, batch_size=6 * world, seed=5)
    ranks = [
        WindowSampler(20_000, seq_len=8, batch_size=6, seed=5, rank=r, world_size=world)
        for r in range(world)
    ]
    for _ in range(30):
        global_batch = next(single).tolist()
        parts = [next(r).tolist() for r in ranks]
        for i, j in itertools.combinations(range(world), 2):
            assert not set(parts[i]) & set(parts[j])
        assert sum(parts, []) == global_batch


def test_eval_windows_non_overlapping_and_limited():
    n_tokens, seq_len = 1_000, 10
    batches = list(eval_windows(n_tokens, seq_len, batch_size=8))
    starts = np.concatenate(batches).tolist()
    assert starts == list(range(0, 99 * 10, 10))
    assert [len(b) for b in batches] == [8] * 12 + [3]
    assert list(map(np.ndarray.tolist, eval_windows(n_tokens, seq_len, 8))) == [
        b.tolist() for b in batches
    ]
    assert len(list(eval_windows(n_tokens, seq_len, batch_size=8, max_batches=3))) == 3
    sharded = [list(eval_windows(n_tokens, seq_len, 4, rank=r, world_size=2)) for r in range(2)]
    union = sorted(np.concatenate(sum(sharded, [])).tolist())
    assert union == starts


def test_get_batch_shapes_and_shift():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = get_batch(tokens, np.array([0, 50, 89]), seq_len=10)
    assert x.shape == y.shape == (3, 10)
    assert x.dtype == y.dtype == torch.int64
    assert x[1].tolist() == list(range(50, 60))
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert y[2, -1].item() == 99
    with pytest.raises(ValueError, match="window starts"):
        get_batch(tokens, np.array([90]), seq_len=10)


def test_get_batch_reads_a_memmap(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(300, dtype=np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = get_batch(tokens, np.array([256]), seq_len=4)
    assert x.tolist() == [[256, 257, 258, 259]] and y.tolist() == [[257, 258, 259, 260]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_tokens": 10, "seq_len": 10, "batch_size": 1}, "too few"),
        ({"n_tokens": 100, "seq_len": 0, "batch_size": 1}, "seq_len"),
        ({"n_tokens": 100, "seq_len": 4, "batch_size": 0}, "batch_size"),
        ({"n_tokens": 100, "seq_len": 4, "batch_size": 1, "rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_bad_sampler_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowSampler(**kwargs)
