"""Windows of a token array: the training sampler, the evaluation windows and batch assembly.

A window is ``seq_len + 1`` consecutive tokens starting at ``start``: the first ``seq_len`` are the
inputs, the last ``seq_len`` the labels (inputs shifted by one). Windows are identified by their
start, so a batch is an index array ``starts`` of shape ``[B]`` and :func:`get_batch` turns it into
tensors.

Training order (:class:`WindowSampler`). The array is tiled into ``W = (n_tokens - 1) // seq_len``
windows of stride ``seq_len`` (consecutive windows share one token: the last label of one is the
first input of the next). Each epoch ``e`` draws, from ``numpy.random.default_rng((seed, e))``,
an offset in ``[0, (n_tokens - 1) - W * seq_len]`` for the tiling and a permutation of the ``W``
windows. The epochs' windows, one epoch after the other, form a single stream; global batch ``k``
is stream items ``[k * G, (k + 1) * G)`` with ``G = batch_size * world_size`` (a batch may straddle
two epochs). The order therefore depends only on the data length, ``seq_len``, ``seed`` and ``G`` —
never on the model.

Distributed sharding. ``batch_size`` is per rank. Rank ``r`` of ``world_size`` takes the
contiguous rows ``[r * batch_size, (r + 1) * batch_size)`` of every global batch, so the ranks'
rows are disjoint and together cover the global batch; a run on 1 rank with ``batch_size = G``
sees exactly the same windows per step as ``world_size`` ranks with ``batch_size = G /
world_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive(world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _check_length(n_tokens: int, seq_len: int) -> None:
    if n_tokens < seq_len + 1:
        raise ValueError(
            f"{n_tokens} tokens are too few for one window of seq_len + 1 = {seq_len + 1} tokens; "
            f"use a shorter seq_len or more data"
        )


class WindowSampler:
    """Infinite, seed-determined stream of training window starts; an iterator of ``[B]`` arrays.

    ``next(sampler)`` returns this rank's starts for the next global batch, an int64 array of
    shape ``[batch_size]``. See the module docstring for the order and the sharding.

    Args:
        n_tokens: length of the token array.
        seq_len: ``T``, tokens per input sequence (windows hold ``T + 1``).
        batch_size: ``B``, windows per batch on this rank.
        seed: the only source of randomness.
        rank: this process's rank, in ``[0, world_size)``.
        world_size: number of processes sharing each global batch.
    """

    def __init__(
        self,
        n_tokens: int,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(seq_len=seq_len, batch_size=batch_size)
        _check_rank(rank, world_size)
        _check_length(n_tokens, seq_len)
        self.n_tokens = int(n_tokens)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.n_windows = (self.n_tokens - 1) // self.seq_len
        self.slack = (self.n_tokens - 1) - self.n_windows * self.seq_len
        self.position = 0  # windows of the global stream consumed so far
        self._epoch_starts: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        """``G = batch_size * world_size``: windows per optimizer step over all ranks."""
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        """The epoch the next window comes from (0-based)."""
        return self.position // self.n_windows

    @property
    def step(self) -> int:
        """Global batches produced so far."""
        return self.position // self.global_batch_size

    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Window starts of ``epoch`` in stream order, int64 of shape ``[n_windows]``."""
        if self._epoch_starts is not None and self._epoch_starts[0] == epoch:
            return self._epoch_starts[1]
        rng = np.random.default_rng((self.seed, epoch))
        offset = int(rng.integers(0, self.slack + 1))
        starts = offset + rng.permutation(self.n_windows).astype(np.int64) * self.seq_len
        self._epoch_starts = (epoch, starts)
        return starts

    def global_batch(self, step: int) -> np.ndarray:
        """Starts of global batch ``step`` (all ranks), int64 of shape ``[G]``; pure."""
        begin = step * self.global_batch_size
        end = begin + self.global_batch_size
        parts = []
        while begin < end:
            epoch, index = divmod(begin, self.n_windows)
            take = min(end - begin, self.n_windows - index)
            parts.append(self.epoch_starts(epoch)[index : index + take])
            begin += take
        return np.concatenate(parts)

    def __iter__(self) -> WindowSampler:
        return self

    def __next__(self) -> np.ndarray:
        """This rank's starts of the next global batch, int64 ``[batch_size]``."""
        if self.position % self.global_batch_size:
            raise ValueError(
                f"sampler position {self.position} is not a multiple of the global batch size "
                f"{self.global_batch_size}; was the state loaded from a different batch size?"
            )
        batch = self.global_batch(self.position // self.global_batch_size)
        self.position += self.global_batch_size
        row = self.rank * self.batch_size
        return batch[row : row + self.batch_size].copy()

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to continue exactly where this sampler is."""
        return {
            "position": self.position,
            "seed": self.seed,
            "n_tokens": self.n_tokens,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a sampler over the same data with
        the same ``seq_len``, ``seed`` and global batch size; the world size may differ)."""
        for name in ("seed", "n_tokens", "seq_len", "global_batch_size"):
            if name in state and int(state[name]) != getattr(self, name):
                raise ValueError(
                    f"sampler state has {name}={state[name]} but this sampler has "
                    f"{name}={getattr(self, name)}; resume with the same data and settings"
                )
        position = int(state["position"])
        if position < 0 or position % self.global_batch_size:
            raise ValueError(f"bad sampler position {position} in state")
        self.position = position

    def __repr__(self) -> str:
        return (
            f"WindowSampler(n_tokens={self.n_tokens}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, seed={self.seed}, rank={self.rank}, "
            f"world_size={self.world_size}, position={self.position})"
        )


def eval_windows(
    n_tokens: int,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[np.ndarray]:
    """Starts of non-overlapping evaluation windows, in order, as int64 ``[<= batch_size]`` arrays.

    Windows start at ``0, T, 2T, ...`` (stride ``T = seq_len``, each window ``T + 1`` tokens) so
    every token after the first is predicted exactly once; the final ``< T`` leftover tokens are
    not evaluated. Global batches hold ``batch_size * world_size`` windows and rank ``r`` takes
    rows ``[r * batch_size, (r + 1) * batch_size)``; the last batch may be short, and a rank
    whose rows are empty gets nothing, so ranks should sum losses and token counts and reduce once
    at the end. ``max_batches`` limits the number of global batches.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    _check_rank(rank, world_size)
    _check_length(n_tokens, seq_len)
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches must be >= 0 or None, got {max_batches}")
    n_windows = (n_tokens - 1) // seq_len
    global_size = batch_size * world_size
    n_batches = -(-n_windows // global_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for step in range(n_batches):
        first = step * global_size + rank * batch_size
        last = min(first + batch_size, n_windows)
        if first < last:
            yield np.arange(first, last, dtype=np.int64) * seq_len


def get_batch(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of the windows at ``starts``.

    Args:
        tokens: the token array, shape ``[n_tokens]`` (a memmap is fine).
        starts: window starts, shape ``[B]``; each needs ``start + seq_len + 1 <= n_tokens``.
        seq_len: ``T``.
        device: where to put the tensors (CPU when None).

    Returns:
        ``(x, y)``, int64 tensors of shape ``[B, T]`` with ``y[:, t] = x[:, t + 1]`` inside a
        window: ``x = tokens[s : s + T]``, ``y = tokens[s + 1 : s + T + 1]``.
    """
    starts = np.asarray(starts, dtype=np.int64)
    if starts.ndim != 1:
        raise ValueError(f"starts must be 1-D [B], got shape {starts.shape}")
    if starts.size and (starts.min() < 0 or starts.max() + seq_len + 1 > len(tokens)):
        raise ValueError(
            f"window starts must lie in [0, {len(tokens) - seq_len - 1}] for {len(tokens)} "
            f"tokens and seq_len {seq_len}"
        )
    windows = np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    batch = torch.from_numpy(windows)
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
