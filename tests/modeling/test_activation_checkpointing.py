"""Activation checkpointing ("moe" blocks, whole "layer"s, transformers'
gradient_checkpointing_enable) gives the gradients of the plain model, the recurrent router's
state passed from layer to layer included, and records the expert loads once."""

import warnings

import pytest
import torch
from tests.conftest import tiny_config

from rmoe import RMoEConfig, RMoEForCausalLM


def _loss_and_grads(model, ids, mask=None):
    torch.manual_seed(3)  # dropout and any random routing draw the same in every run
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def _pair(mode, **kw):
    cfg = tiny_config(**kw)
    torch.manual_seed(0)
    ref = RMoEForCausalLM(cfg).train()
    ckpt = RMoEForCausalLM(RMoEConfig(**{**cfg.to_dict(), "activation_checkpointing": mode}))
    ckpt.load_state_dict(ref.state_dict())
    return ref.train(), ckpt.train()


VARIANTS = {
    "rmoe": dict(router_type="recurrent"),
    "smoe": dict(router_type="linear"),
    "rmoe-dropout-bias": dict(
        router_type="recurrent",
        hidden_dropout=0.1,
        router_expert_bias=True,
        mlp_only_layers=[1],
    ),
}


@pytest.mark.parametrize("mode", ["moe", "layer"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpointed_gradients_equal_plain(mode, variant):
    ref, ckpt = _pair(mode, **VARIANTS[variant])
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    loss_ref, g_ref = _loss_and_grads(ref, ids, mask)
    loss, g = _loss_and_grads(ckpt, ids, mask)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    assert g.keys() == g_ref.keys()
    # the shared cell's weights get gradient only through the state threaded across layers
    if VARIANTS[variant]["router_type"] == "recurrent":
        assert "model.router_cell.weight_hh" in g
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    # the expert loads are recorded once per step, as without checkpointing
    for (n, a), (_, b) in zip(ref.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    loads_ref = [m.router.take_load() for m in ref.modules() if hasattr(m, "record_routing")]
    loads = [m.router.take_load() for m in ckpt.modules() if hasattr(m, "record_routing")]
    for a, b in zip(loads, loads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if VARIANTS[variant].get("router_expert_bias"):
        assert sum(float(b.sum()) for b in loads_ref) > 0


def test_gradient_checkpointing_enable_matches_plain():
    ref, ckpt = _pair("none", router_type="recurrent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ckpt.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in ckpt.model.layers)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    _, g_ref = _loss_and_grads(ref, ids)
    _, g = _loss_and_grads(ckpt, ids)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reentrant_checkpoint_is_refused():
    _, ckpt = _pair("none", router_type="recurrent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(0, 256, (1, 6))
    with pytest.raises(ValueError, match="use_reentrant=False"):
        ckpt(ids, labels=ids)


def test_eval_forward_unchanged():
    ref, ckpt = _pair("layer", router_type="recurrent")
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.eval()(ids).logits, ref.eval()(ids).logits)


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="layer"):
        tiny_config(activation_checkpointing="block")
