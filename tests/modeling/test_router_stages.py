"""Router stages of issue 12: score functions, expert bias, capacity, balance losses, the shared
router, the logit residual, S-proj and the router init, each against a plain reference."""

from __future__ import annotations

import math

import pytest
import torch
from tests.conftest import ROUTER_VARIANTS, tiny_config

from rmoe import RMoEForCausalLM
from rmoe.modeling.accounting import count_config, parameter_counts
from rmoe.modeling.balancing import SequenceBalance
from rmoe.modeling.losses import load_balancing_loss, sequence_balance_loss
from rmoe.modeling.routing import (
    build_cell,
    build_router,
    capacity_keep,
    expert_capacity,
)


def _linear_router(**kw):
    cfg = tiny_config(router_type="linear", **kw)
    router = build_router(cfg)
    return cfg, router, router.scorer.weight.weight.detach()


# ---------------------------------------------------------------------------------------------
# score functions and the expert bias
# ---------------------------------------------------------------------------------------------
def _reference_route(logits, k, score, bias=None, norm=True, scale=1.0):
    """Plain per-token reference: scores, choose by (score + bias), weigh by the score."""
    s = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    idx, weight = [], []
    for n in range(s.shape[0]):
        choice = s[n] + (0 if bias is None else bias)
        order = sorted(range(s.shape[1]), key=lambda e: -float(choice[e]))[:k]
        w = torch.stack([s[n, e] for e in order])
        if norm:
            w = w / w.sum()
        idx.append(order)
        weight.append(w * scale)
    return s, torch.tensor(idx), torch.stack(weight)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_routing_equals_plain_reference(score, with_bias, norm):
    cfg, router, w = _linear_router(
        router_score_func=score,
        router_expert_bias=with_bias,
        norm_topk_prob=norm,
        router_scale=2.5 if score == "sigmoid" else 1.0,
    )
    bias = None
    if with_bias:
        bias = torch.tensor([0.3, -0.2, 0.05, -0.4])
        router.expert_bias.copy_(bias)
    x = torch.randn(11, cfg.hidden_size)
    res = router.eval()(x)
    logits = x @ w.t()
    s, idx, weight = _reference_route(logits, 2, score, bias, norm, router.scale)
    torch.testing.assert_close(res.scores, s)
    assert torch.equal(res.topk_idx, idx)
    torch.testing.assert_close(res.topk_weight, weight)
    torch.testing.assert_close(res.probs.sum(-1), torch.ones(11))
    if score == "sigmoid":
        torch.testing.assert_close(res.probs, s / s.sum(-1, keepdim=True))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_changes_the_choice_but_never_the_combine_weights(score):
    cfg, router, _ = _linear_router(router_score_func=score, router_expert_bias=True)
    x = torch.randn(64, cfg.hidden_size)
    plain = router.eval()(x)
    router.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # expert 0 always chosen
    biased = router(x)
    assert (biased.topk_idx[:, 0] == 0).all()
    assert not torch.equal(plain.topk_idx, biased.topk_idx)
    torch.testing.assert_close(biased.scores, plain.scores)
    torch.testing.assert_close(biased.probs, plain.probs)
    chosen = biased.scores.gather(-1, biased.topk_idx)
    torch.testing.assert_close(biased.topk_weight, chosen / chosen.sum(-1, keepdim=True))


def test_bias_is_a_float32_buffer_saved_with_the_model():
    model = RMoEForCausalLM(tiny_config(router_type="linear", router_expert_bias=True))
    names = [n for n, _ in model.named_buffers()]
    assert sum(n.endswith("router.expert_bias") for n in names) == 3
    assert not any("expert_bias" in n for n, _ in model.named_parameters())
    assert sum(n.endswith("router.expert_bias") for n in model.state_dict()) == 3
    model.to(torch.bfloat16)
    router = model.model.layers[0].moe.router
    assert router.expert_bias.dtype == torch.float32
    assert model.model.layers[0].moe.experts.gate_proj.dtype == torch.bfloat16
    off = RMoEForCausalLM(tiny_config(router_type="linear"))
    assert not any("expert_bias" in n for n in off.state_dict())


def test_loads_are_recorded_in_training_only_without_padding():
    cfg = tiny_config(router_type="linear", router_expert_bias=True, num_hidden_layers=1)
    model = RMoEForCausalLM(cfg)
    router = model.model.layers[0].moe.router
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    model.eval()(ids, attention_mask=mask)
    assert router.take_load().sum() == 0
    out = model.train()(ids, attention_mask=mask, output_routing=True)
    load = router.take_load()
    assert load.sum() == 10 * cfg.num_experts_per_tok  # 10 real tokens, K each
    idx = out.routing[0].topk_idx.view(2, 6, -1)[mask.bool()]
    assert torch.equal(load, torch.bincount(idx.reshape(-1), minlength=4).float())
    assert router.take_load().sum() == 0  # taken = reset


# ---------------------------------------------------------------------------------------------
# capacity
# ---------------------------------------------------------------------------------------------
def _reference_keep(idx, priority, num_experts, capacity):
    keep = torch.zeros_like(idx, dtype=torch.bool)
    for e in range(num_experts):
        slots = [(n, k) for n in range(idx.shape[0]) for k in range(idx.shape[1]) if idx[n, k] == e]
        slots.sort(key=lambda nk: (-float(priority[nk]), nk[0], nk[1]))
        for n, k in slots[:capacity]:
            keep[n, k] = True
    return keep


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, 2.0])
def test_capacity_drops_exactly_what_a_reference_drops(factor):
    g = torch.Generator().manual_seed(1)
    n, k, e = 37, 2, 4
    scores = torch.rand(n, e, generator=g)
    scores[:, 0] += 0.5  # expert 0 overloaded
    idx = scores.topk(k, -1).indices
    priority = scores.gather(-1, idx)
    cap = expert_capacity(n, k, e, factor)
    assert cap == max(1, math.ceil(factor * n * k / e))
    keep = capacity_keep(idx, priority, e, cap)
    assert torch.equal(keep, _reference_keep(idx, priority, e, cap))
    for ex in range(e):
        assert int(keep[idx == ex].sum()) == min(cap, int((idx == ex).sum()))


def test_capacity_keeps_the_rest_equal_to_dropless_and_is_train_only():
    kw = dict(router_type="linear", num_hidden_layers=1, num_experts=4)
    dropless = RMoEForCausalLM(tiny_config(**kw))
    capped = RMoEForCausalLM(tiny_config(capacity_factor=0.5, **kw))
    capped.load_state_dict(dropless.state_dict())
    block_a, block_b = dropless.model.layers[0].moe, capped.model.layers[0].moe
    x = torch.randn(2, 16, 32)
    a, b = block_a(x), block_b(x)
    dropped = b.routing.dropped
    assert dropped is not None and dropped.any() and not dropped.all()
    assert b.routing.dropped_share == pytest.approx(float(dropped.float().mean()))
    assert torch.equal(a.routing.topk_idx, b.routing.topk_idx)
    torch.testing.assert_close(b.routing.topk_weight, a.routing.topk_weight * ~dropped)
    intact = ~dropped.any(-1)
    torch.testing.assert_close(b.hidden.view(32, -1)[intact], a.hidden.view(32, -1)[intact])
    # in eval the capacity is off unless eval_capacity_factor is set
    block_b.eval()
    assert block_b(x).routing.dropped is None
    torch.testing.assert_close(block_b(x).hidden, block_a.eval()(x).hidden)
    evalcap = RMoEForCausalLM(tiny_config(eval_capacity_factor=0.5, **kw)).eval()
    evalcap.load_state_dict(dropless.state_dict())
    routing = evalcap.model.layers[0].moe(x).routing
    assert torch.equal(routing.dropped, dropped)


# ---------------------------------------------------------------------------------------------
# balance losses
# ---------------------------------------------------------------------------------------------
def _reference_sequence_loss(probs, idx, mask):
    b, t, e = probs.shape
    k = idx.shape[-1]
    losses = []
    for s in range(b):
        toks = [i for i in range(t) if mask[s, i]]
        if not toks:
            continue
        total = 0.0
        for ex in range(e):
            chosen = sum(1 for i in toks for j in range(k) if idx[s, i, j] == ex)
            f = e / (k * len(toks)) * chosen
            p = sum(float(probs[s, i, ex]) for i in toks) / len(toks)
            total += f * p
        losses.append(total)
    return sum(losses) / len(losses)


def test_sequence_loss_equals_hand_computed_reference():
    g = torch.Generator().manual_seed(0)
    b, t, e, k = 3, 7, 5, 2
    probs = torch.softmax(torch.randn(b, t, e, generator=g), -1)
    idx = torch.randn(b, t, e, generator=g).topk(k, -1).indices
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :3] = False
    mask[2] = False  # an all-padding sequence is left out of the mean
    got = sequence_balance_loss(probs, idx, mask)
    assert got.item() == pytest.approx(_reference_sequence_loss(probs, idx, mask), rel=1e-6)
    uniform = torch.full((2, 8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4).expand(2, 8, 2)
    assert sequence_balance_loss(uniform, balanced).item() == pytest.approx(1.0)


def test_sequence_loss_differs_from_the_batch_loss_when_sequences_specialise():
    # each sequence sends all tokens to one expert pair: balanced over the batch, not per
    # sequence -> the sequence loss is larger
    probs = torch.tensor([[0.4, 0.4, 0.1, 0.1]] * 6 + [[0.1, 0.1, 0.4, 0.4]] * 6)
    idx = torch.tensor([[0, 1]] * 6 + [[2, 3]] * 6)
    batch = load_balancing_loss(probs, idx)
    seq = sequence_balance_loss(probs.view(2, 6, 4), idx.view(2, 6, 2))
    assert seq.item() > batch.item() + 0.5
    cfg = tiny_config(router_aux_loss_type="sequence")
    from rmoe.modeling.routing import RoutingResult

    r = RoutingResult(probs.log(), probs, idx, torch.ones(12, 2), None)
    assert SequenceBalance(cfg)(r, (2, 6)).item() == pytest.approx(seq.item())


@pytest.mark.parametrize("kind", ["switch", "sequence", "global"])
def test_model_aux_loss_uses_the_configured_balancer(kind):
    cfg = tiny_config(router_type="linear", router_aux_loss_type=kind)
    model = RMoEForCausalLM(cfg).train()
    ids = torch.randint(0, 256, (3, 8))
    out = model(ids, labels=ids, output_routing=True)
    ref = []
    for r in out.routing:
        if kind == "sequence":
            ref.append(sequence_balance_loss(r.probs.view(3, 8, -1), r.topk_idx.view(3, 8, -1)))
        else:  # global on one process, first micro-batch: the micro-batch's own f
            ref.append(load_balancing_loss(r.probs, r.topk_idx))
    torch.testing.assert_close(out.aux_loss, torch.stack(ref).mean())


# ---------------------------------------------------------------------------------------------
# producers: shared (Omni-Router), logit residual, S-proj
# ---------------------------------------------------------------------------------------------
def test_shared_router_has_one_routers_parameters_and_gradient_from_every_layer():
    cfg = tiny_config(router_type="shared", num_hidden_layers=3)
    model = RMoEForCausalLM(cfg)
    shared = model.model.router_shared
    assert sum(p.numel() for p in shared.parameters()) == cfg.hidden_size * cfg.num_experts
    for layer in model.model.layers:
        assert sum(p.numel() for p in layer.moe.router.parameters()) == 0
    assert parameter_counts(model)["router"] == cfg.hidden_size * cfg.num_experts
    assert count_config(cfg).router_params == cfg.hidden_size * cfg.num_experts
    out = model(torch.randint(0, 256, (2, 6)), output_router_logits=True)
    for logits in out.router_logits:
        (g,) = torch.autograd.grad(logits.sum(), shared.weight.weight, retain_graph=True)
        assert g.abs().sum() > 0


def _router_stack(kw, n_layers=3, n=6):
    cfg = tiny_config(num_hidden_layers=n_layers, **kw)
    routers = [build_router(cfg) for _ in range(n_layers)]
    cell = build_cell(cfg.router_cell, cfg.router_dim) if routers[0].uses_cell else None
    xs = [torch.randn(n, cfg.hidden_size) for _ in range(n_layers)]
    return cfg, routers, cell, xs


def _run_stack(routers, cell, xs):
    state, outs = None, []
    for r, x in zip(routers, xs):
        res = r(x, state, cell)
        state = res.state
        outs.append(res)
    return outs


@pytest.mark.parametrize(
    "kw",
    [
        dict(router_type="linear", router_logit_residual=0.5),
        dict(router_type="recurrent", router_pass_state=False, router_logit_residual=1.0),
        dict(router_type="recurrent", router_logit_residual=0.5),
    ],
    ids=["linear-r0.5", "np-r1", "recurrent-r0.5"],
)
def test_logit_residual_equals_its_reference(kw):
    cfg, routers, cell, xs = _router_stack(kw)
    outs = _run_stack(routers, cell, xs)
    alpha = cfg.router_logit_residual
    # the same routers without residual give each layer's own logits
    own = []
    state = None
    for r, x in zip(routers, xs):
        r.residual = 0.0
        res = r(x, state, cell)
        state = res.state
        own.append(res.logits)
    expected = own[0]
    torch.testing.assert_close(outs[0].logits, expected)
    for i in range(1, len(xs)):
        expected = own[i] + alpha * expected
        torch.testing.assert_close(outs[i].logits, expected)
    width = (cell.state_dim if cell is not None else 0) + cfg.num_experts
    assert outs[0].state.shape == (6, width)
    torch.testing.assert_close(outs[1].state[:, -cfg.num_experts :], outs[1].logits)


@pytest.mark.parametrize("router_type", ["linear", "recurrent"])
def test_detached_residual_passes_no_gradient(router_type):
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        kw = dict(
            router_type=router_type,
            router_pass_state=False,
            router_logit_residual=1.0,
            router_detach_residual=detach,
        )
        cfg, routers, cell, xs = _router_stack(kw, n_layers=2)
        outs = _run_stack(routers, cell, xs)
        first = routers[0].scorer.weight.weight
        (g,) = torch.autograd.grad(
            outs[1].logits.sum(), first, allow_unused=True, materialize_grads=True
        )
        grads[detach] = g
    assert grads[False].abs().sum() > 0
    assert torch.count_nonzero(grads[True]) == 0


def test_sproj_is_one_projector_for_every_layer():
    cfg = tiny_config(router_type="recurrent", router_share_proj=True)
    model = RMoEForCausalLM(cfg)
    proj = model.model.router_shared
    assert proj.weight.shape == (cfg.router_dim, cfg.hidden_size)
    assert all(layer.moe.router.proj is None for layer in model.model.layers)
    plain = RMoEForCausalLM(tiny_config(router_type="recurrent"))
    saved = (len(cfg.moe_layer_indices) - 1) * cfg.hidden_size * cfg.router_dim
    assert parameter_counts(plain)["router"] - parameter_counts(model)["router"] == saved
    assert count_config(cfg).router_params == parameter_counts(model)["router"]
    assert (
        count_config(cfg).router_flops_per_token
        == count_config(plain.config).router_flops_per_token
    )
    out = model(torch.randint(0, 256, (2, 6)), output_router_logits=True)
    for logits in out.router_logits:
        (g,) = torch.autograd.grad(logits.sum(), proj.weight, retain_graph=True)
        assert g.abs().sum() > 0


@pytest.mark.parametrize("variant", list(ROUTER_VARIANTS))
def test_every_variant_counts_its_parameters(variant):
    cfg = tiny_config(router_bias=True, **ROUTER_VARIANTS[variant])
    model = RMoEForCausalLM(cfg)
    assert count_config(cfg).router_params == parameter_counts(model)["router"]
    assert count_config(cfg).total_params == parameter_counts(model)["total"]


# ---------------------------------------------------------------------------------------------
# router init and config validation
# ---------------------------------------------------------------------------------------------
def _router_linears(model):
    from rmoe.modeling.routing import RouterLinear

    return [m for m in model.modules() if isinstance(m, RouterLinear)]


@pytest.mark.parametrize("router_type", ["linear", "mlp", "xmoe", "shared", "recurrent"])
def test_router_init_reaches_every_router_linear(router_type):
    base = dict(router_type=router_type, hidden_size=64, router_dim=32, router_bias=True)
    default = RMoEForCausalLM(tiny_config(router_init="normal", **base))  # paper-faithful
    default.init_weights_seeded(0)
    assert _router_linears(default)
    for lin in _router_linears(default):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.35)
        assert lin.bias is None or torch.count_nonzero(lin.bias) == 0
    wide = RMoEForCausalLM(tiny_config(router_init="normal", router_init_std=0.2, **base))
    wide.init_weights_seeded(0)
    for lin in _router_linears(wide):
        assert lin.weight.std().item() == pytest.approx(0.2, rel=0.35)
    uni = RMoEForCausalLM(tiny_config(**base))  # the default
    assert uni.config.router_init == "uniform"
    uni.init_weights_seeded(0)
    for lin in _router_linears(uni):
        bound = 1 / math.sqrt(lin.in_features)
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
        if lin.bias is not None:  # XMoE's down-projection has none
            assert lin.bias.abs().max() <= bound and torch.count_nonzero(lin.bias) > 0
    # only router weights change: everything else is the same for the same seed
    a, b = default.state_dict(), uni.state_dict()
    for name in a:
        if ".router" not in name:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(router_score_func="sigmod"), r"router_score_func='sigmod'.*nearest: 'sigmoid'"),
        (dict(router_aux_loss_type="globl"), r"router_aux_loss_type='globl'.*'global'"),
        (dict(router_init="unifrom"), r"router_init='unifrom'.*'uniform'"),
        (dict(router_type="linear", router_share_proj=True), "router_share_proj"),
        (dict(router_logit_residual=-1.0), "router_logit_residual"),
        (dict(router_bias_update_rate=-1e-3), "router_bias_update_rate"),
        (dict(router_scale=0.0), "router_scale"),
        (dict(router_init_std=0.0), "router_init_std"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    ],
)
def test_config_rejects_bad_router_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(**kw)
