"""The one evaluation loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.evaluation import batch_losses, evaluate_split, window_batches
from rmoe.runtime import DistInfo


class _Split:
    def __init__(self, tokens):
        self.tokens, self.n_tokens = tokens, len(tokens)

    def bits_per_byte(self, loss):
        return loss / math.log(2)


def _model():
    torch.manual_seed(0)
    return RMoEForCausalLM(
        RMoEConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                   router_dim=8, max_position_embeddings=32)
    ).eval()  # fmt: skip


def test_batch_losses_equal_a_hand_computation():
    model = _model()
    tokens = np.random.default_rng(0).integers(0, 50, 100).astype(np.uint16)
    batches = list(window_batches(tokens, 8, 3, None))
    losses, counts = batch_losses(model, batches)
    assert len(losses) == len(batches) == 4  # (100 - 1) // 8 = 12 windows, 3 per batch
    for (x, y, w), loss, n in zip(batches, losses, counts):
        with torch.no_grad():
            ref = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten(), reduction="sum")
        assert loss == pytest.approx(float(ref), rel=1e-6) and n == y.numel() and w == 1.0


def test_ranks_share_windows_and_empty_ranks_weigh_zero():
    tokens = np.arange(41, dtype=np.uint16)  # 5 windows of 8
    seen = []
    for rank in range(2):
        for x, _, w in window_batches(tokens, 8, 2, None, dist_info=DistInfo(rank, 2)):
            if w:
                seen += x[:, 0].tolist()
    assert sorted(seen) == [0, 8, 16, 24, 32]
    last = list(window_batches(tokens, 8, 2, None, dist_info=DistInfo(1, 2)))[-1]
    assert last[2] == 0.0  # rank 1 has no window in the last global batch, still runs a pass
    _, counts = batch_losses(_model(), [last])
    assert counts == [0]


def test_evaluate_split_mean_loss_and_restores_mode():
    model = _model().train()
    tokens = np.random.default_rng(1).integers(0, 50, 65).astype(np.uint16)
    res = evaluate_split(model, _Split(tokens), 8, 4)
    losses, counts = batch_losses(model.eval(), window_batches(tokens, 8, 4, None))
    assert res["loss"] == pytest.approx(sum(losses) / sum(counts))
    assert res["tokens"] == 64 and res["bpb"] == pytest.approx(res["loss"] / math.log(2))
    model.train()
    evaluate_split(model, _Split(tokens), 8, 4)
    assert model.training
    with pytest.raises(ValueError, match="too few for one window"):
        evaluate_split(model, _Split(tokens[:5]), 8, 4)
