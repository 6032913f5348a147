"""The forward pass of the analysis: every window through the model inside the adapter's
routing capture, the loss summed by :func:`rmoe.evaluation.batch_losses`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rmoe.analysis.adapters import LayerCapture
from rmoe.analysis.pipeline.load import Subject
from rmoe.evaluation import batch_losses

__all__ = ["Collected", "ProgressFn", "collect", "no_progress"]

ProgressFn = Callable[..., Iterable]
"""A ``tqdm``-like wrapper: ``progress(iterable, total=int, desc=str)`` -> iterable."""


def no_progress(iterable: Iterable, **_: Any) -> Iterable:
    """The default ``progress``: the iterable itself."""
    return iterable


@dataclass
class Collected:
    """What the forward pass recorded.

    Attributes:
        layers: per MoE layer, the capture (logits [N, E], chosen experts [N, K], the first
            ``output_tokens`` MoE inputs [n, D]).
        lm_loss: mean next-token loss (nats) over the N = W·T tokens.
        seconds: wall time of the pass.
    """

    layers: list[LayerCapture]
    lm_loss: float
    seconds: float


def collect(
    subject: Subject,
    windows: np.ndarray,
    batch_size: int,
    output_tokens: int,
    device: torch.device,
    progress: ProgressFn,
) -> Collected:
    """Run the model over all windows [W, T + 1] inside a capture that keeps the MoE inputs of
    the first ``output_tokens`` tokens; batches of ``batch_size`` windows."""
    t0 = time.perf_counter()
    chunks = [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for chunk in progress(chunks, total=len(chunks), desc=f"{subject.name}: forward"):
            b = torch.from_numpy(chunk).to(device)
            yield b[:, :-1], b[:, 1:]

    with subject.adapter.capture(store_inputs=output_tokens) as cap:
        losses, counts = batch_losses(subject.model, batches())
        layers = cap.layers
    return Collected(layers, sum(losses) / max(sum(counts), 1), time.perf_counter() - t0)
