import pytest
import torch
from tests.conftest import tiny_config
from torch import nn

from rmoe import RMoEForCausalLM
from rmoe.modeling.routing import ROUTERS, build_cell, build_router, select_topk


@pytest.mark.parametrize(
    "kind,ref_cls", [("gru", nn.GRUCell), ("rnn", nn.RNNCell), ("lstm", nn.LSTMCell)]
)
def test_cell_matches_torch(kind, ref_cls):
    p, n = 8, 5
    cell = build_cell(kind, p)
    ref = ref_cls(p, p)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref, name).copy_(getattr(cell, name))
    x = torch.randn(n, p)
    h = torch.randn(n, p)
    if kind == "lstm":
        c = torch.randn(n, p)
        ours = cell(x, torch.cat([h, c], -1))
        rh, rc = ref(x, (h, c))
        torch.testing.assert_close(ours, torch.cat([rh, rc], -1))
    else:
        torch.testing.assert_close(cell(x, h), ref(x, h))


def test_select_topk_renormalises():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    probs, w, idx = select_topk(logits, 2, True)
    assert idx.tolist() == [[1, 2]]
    torch.testing.assert_close(w.sum(-1), torch.ones(1))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    _, w_raw, _ = select_topk(logits, 2, False)
    torch.testing.assert_close(w_raw, probs[:, [1, 2]])


def test_first_layer_starts_from_zero_state():
    cfg = tiny_config(router_type="recurrent")
    model = RMoEForCausalLM(cfg).eval()
    captured = {}
    model.model.layers[0].ffn_norm.register_forward_hook(
        lambda m, i, o: captured.setdefault("x1", o.detach())
    )
    ids = torch.randint(0, 256, (2, 6))
    out = model(ids, output_routing=True)
    x1 = captured["x1"].reshape(-1, cfg.hidden_size)
    router = model.model.layers[0].moe.router
    cell = model.model.router_cell
    expected = cell(router.proj(x1), torch.zeros(x1.shape[0], cfg.router_dim))
    torch.testing.assert_close(out.routing[0].state, expected)


def _routing_stack_grad(pass_state: bool, detach: bool) -> torch.Tensor:
    cfg = tiny_config(
        router_type="recurrent",
        num_hidden_layers=4,
        router_pass_state=pass_state,
        router_detach_state=detach,
    )
    routers = [build_router(cfg) for _ in range(4)]
    cell = build_cell(cfg.router_cell, cfg.router_dim)
    xs = [torch.randn(6, cfg.hidden_size) for _ in range(4)]  # fixed router inputs
    state = None
    for r, x in zip(routers, xs):
        res = r(x, state, cell)
        state = res.state
    (g,) = torch.autograd.grad(
        res.logits.sum(), routers[0].proj.weight, allow_unused=True, materialize_grads=True
    )
    return g


def test_recurrent_gradient_in_routing_stack():
    assert _routing_stack_grad(True, False).abs().sum() > 0
    assert torch.count_nonzero(_routing_stack_grad(False, False)) == 0
    assert torch.count_nonzero(_routing_stack_grad(True, True)) == 0


def _whole_model_grad(pass_state: bool, detach: bool) -> float:
    cfg = tiny_config(
        router_type="recurrent",
        num_experts_per_tok=1,
        norm_topk_prob=True,
        router_pass_state=pass_state,
        router_detach_state=detach,
    )
    model = RMoEForCausalLM(cfg).double()
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids, output_router_logits=True)
    (g,) = torch.autograd.grad(
        out.router_logits[-1].sum(),
        model.model.layers[0].moe.router.proj.weight,
        allow_unused=True,
        materialize_grads=True,
    )
    return g.abs().max().item()


def test_recurrent_gradient_through_whole_model_top1():
    # With top-1 renormalised routing every gate weight is exactly 1, so the residual stream
    # carries no gradient from the last router back to the first router's projection: only
    # the passed state can. (The gate's w / sum(w) has a zero derivative only up to float64
    # rounding, ~1e-10 here: nine orders of magnitude below the passed state's gradient.)
    assert _whole_model_grad(True, False) > 1e-2
    assert _whole_model_grad(False, False) < 1e-8
    assert _whole_model_grad(True, True) < 1e-8


def test_random_router_is_frozen():
    cfg = tiny_config(router_type="random")
    router = build_router(cfg)
    assert all(not p.requires_grad for p in router.parameters())


def test_every_router_is_registered():
    assert set(ROUTERS) == {"linear", "mlp", "cosine", "xmoe", "random", "shared", "recurrent"}


@pytest.mark.parametrize("scorer", ["linear", "cosine", "xmoe"])
def test_recurrent_scorers(scorer):
    cfg = tiny_config(router_type="recurrent", router_scorer=scorer)
    model = RMoEForCausalLM(cfg)
    out = model(torch.randint(0, 256, (2, 5)), output_routing=True)
    assert len(out.routing) == 3
    assert out.routing[-1].probs.shape == (10, cfg.num_experts)


def test_jitter_only_in_training():
    cfg = tiny_config(router_type="linear", router_jitter=0.5)
    router = build_router(cfg)
    x = torch.randn(7, cfg.hidden_size)
    router.eval()
    a, b = router(x).logits, router(x).logits
    torch.testing.assert_close(a, b)
    router.train()
    assert not torch.allclose(router(x).logits, router(x).logits)
