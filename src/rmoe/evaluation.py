"""The one evaluation loop: summed next-token loss and token count per batch.

Everything that scores held-out text calls :func:`batch_losses` — the trainer's validation
(:func:`evaluate_split`), ``rmoe eval``, the experiment evaluator and the analysis — so they all
compute the loss the same way (logits in float32, cross-entropy summed over the batch, optional
autocast, no KV cache).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import TokenSplit, eval_windows, get_batch
from .runtime import DistInfo

Batch = tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, float]
"""``(x [B, T], y [B, T])``, optionally with a weight (0 = run the forward, count nothing)."""


def window_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    dist_info: DistInfo | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """This process's share of the non-overlapping evaluation windows of ``tokens``.

    Global batches hold ``batch_size * world_size`` windows (see :func:`rmoe.data.eval_windows`);
    rank r takes rows ``[r * batch_size, (r + 1) * batch_size)``. Every rank yields the same
    number of batches (sharded models need the same number of forward passes): a rank without
    rows in the last batch gets the first window with weight 0.

    Yields:
        ``(x [b, T], y [b, T], weight)`` on ``device``.
    """
    di = dist_info or DistInfo()
    world, rank = di.world_size, di.rank
    for global_starts in eval_windows(len(tokens), seq_len, batch_size * world, max_batches):
        starts = global_starts[rank * batch_size : (rank + 1) * batch_size]
        weight = 1.0
        if len(starts) == 0:
            starts, weight = global_starts[:1], 0.0
        x, y = get_batch(tokens, starts, seq_len, device)
        yield x, y, weight


@torch.no_grad()
def batch_losses(
    model: torch.nn.Module, batches: Iterable[Batch], amp: torch.dtype | None = None
) -> tuple[list[float], list[int]]:
    """Summed next-token loss (nats) and token count of every batch.

    Args:
        model: a causal LM returning ``.logits`` [B, T, V] for ``input_ids`` [B, T].
        batches: ``(x, y)`` or ``(x, y, weight)`` tensors on the model's device; a weight of 0
            runs the forward pass and contributes loss 0 and count 0.
        amp: autocast dtype (None = no autocast).

    Returns:
        ``(loss_sums, token_counts)``, one entry per batch. The model's train/eval mode is
        left as the caller set it.
    """
    losses: list[float] = []
    counts: list[int] = []
    for batch in batches:
        x, y = batch[0], batch[1]
        weight = batch[2] if len(batch) > 2 else 1.0
        ctx = torch.autocast(x.device.type, amp) if amp else nullcontext()
        with ctx:
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        )
        losses.append(weight * float(loss))
        counts.append(int(weight * y.numel()))
    return losses, counts


def evaluate_split(
    model: torch.nn.Module,
    split: TokenSplit,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Mean next-token loss over non-overlapping windows of a split, with bits per byte
    (loss / ln 2 * tokens / bytes of the split; for the byte tokenizer: bits per character) and
    perplexity (per token). Under DDP every rank scores its share and the sums are all-reduced.

    Returns:
        dict(loss, bpb, ppl, tokens).
    """
    di = dist_info or DistInfo()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    batches = window_batches(split.tokens, seq_len, batch_size, max_batches or None, device, di)
    losses, counts = batch_losses(model, batches, amp_dtype)
    model.train(was_training)
    total = torch.tensor([sum(losses), float(sum(counts))], dtype=torch.float64)
    if di.world_size > 1:
        total = total.to(device)
        dist.all_reduce(total)
    n = total[1].item()
    if n == 0:
        raise ValueError(
            f"the evaluation split has fewer than seq_len + 1 = {seq_len + 1} tokens; "
            "use a shorter data.seq_len or a larger corpus"
        )
    loss = total[0].item() / n
    return {
        "loss": loss,
        "bpb": split.bits_per_byte(loss),
        "ppl": math.exp(min(loss, 700.0)),
        "tokens": int(n),
    }
