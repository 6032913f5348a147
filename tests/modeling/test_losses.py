import math

import torch
from tests.conftest import tiny_config

from rmoe import RMoEForCausalLM
from rmoe.modeling.losses import load_balancing_loss, normalized_entropy, router_z_loss


def reference_lb(probs, idx, mask):
    """Plain loops: f_e = share of top-k assignments, P_e = mean probability (valid tokens)."""
    n, e = probs.shape
    k = idx.shape[1]
    valid = [i for i in range(n) if mask[i]]
    f = [0.0] * e
    p = [0.0] * e
    for i in valid:
        for j in range(k):
            f[int(idx[i, j])] += 1.0 / (len(valid) * k)
        for j in range(e):
            p[j] += float(probs[i, j]) / len(valid)
    return e * sum(a * b for a, b in zip(f, p))


def test_load_balancing_matches_reference():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(37, 6, generator=g)
        probs = torch.softmax(logits, -1)
        idx = probs.topk(2, -1).indices
        mask = torch.rand(37, generator=g) > 0.3
        got = load_balancing_loss(probs, idx, mask)
        assert math.isclose(got.item(), reference_lb(probs, idx, mask), rel_tol=1e-5)


def test_load_balancing_uniform_is_one():
    n, e, k = 64, 8, 2
    probs = torch.full((n, e), 1.0 / e)
    idx = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], 1)
    assert math.isclose(load_balancing_loss(probs, idx).item(), 1.0, rel_tol=1e-6)
    assert idx.shape[1] == k


def test_z_loss_and_entropy():
    logits = torch.zeros(4, 8)
    assert math.isclose(router_z_loss(logits).item(), math.log(8) ** 2, rel_tol=1e-6)
    torch.testing.assert_close(normalized_entropy(torch.softmax(logits, -1)), torch.ones(4))
    onehot = torch.zeros(2, 8)
    onehot[:, 3] = 1
    torch.testing.assert_close(normalized_entropy(onehot), torch.zeros(2))


def test_model_aux_loss_is_mean_of_per_layer_losses_with_padding():
    cfg = tiny_config(router_type="recurrent", num_hidden_layers=3, router_z_loss_coef=0.001)
    model = RMoEForCausalLM(cfg).train()
    ids = torch.randint(0, 256, (2, 7))
    attn = torch.ones(2, 7, dtype=torch.long)
    attn[1, :3] = 0  # left padding
    out = model(ids, attention_mask=attn, labels=ids, output_routing=True)
    mask = attn.bool().reshape(-1)
    per_layer = [reference_lb(r.probs.detach(), r.topk_idx, mask) for r in out.routing]
    assert math.isclose(out.aux_loss.item(), sum(per_layer) / len(per_layer), rel_tol=1e-5)
    expected = out.lm_loss + cfg.router_aux_loss_coef * out.aux_loss + 0.001 * out.z_loss
    torch.testing.assert_close(out.loss, expected)


def test_aux_loss_computed_in_training_without_flags():
    model = RMoEForCausalLM(tiny_config(router_type="linear")).train()
    out = model(torch.randint(0, 256, (2, 5)))
    assert out.aux_loss is not None and out.aux_loss.requires_grad
