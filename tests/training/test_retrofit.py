"""`retrofit_recurrent`: a linear-router model becomes a recurrent one with a linear base that is
the same function at the start (logits and routing exactly, float32) and trains apart once the
recurrent stage takes an optimizer step; `freeze_except_router` leaves only that stage."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import randomize_expert_biases, tiny_config

from rmoe import RMoEForCausalLM
from rmoe.modeling.accounting import count_model, parameter_counts
from rmoe.training.surgery import freeze_except_router, retrofit_recurrent

SOURCES = {
    "linear": {},
    "linear-dense-shared": dict(mlp_only_layers=[1], num_shared_experts=1),
    "linear-r1": dict(router_logit_residual=1.0),
    "linear+sigmoid+bias+capacity": dict(
        router_score_func="sigmoid",
        router_expert_bias=True,
        router_scale=2.0,
        capacity_factor=1.0,
        router_aux_loss_type="sequence",
    ),
}
RECURRENT = {
    "gru": {},
    "np": dict(router_pass_state=False),
    "lstm-bias": dict(router_cell="lstm", router_bias=True, router_dim=6),
    "sproj-detach": dict(router_share_proj=True, router_detach_state=True),
}


def _source(**kw) -> RMoEForCausalLM:
    model = RMoEForCausalLM(tiny_config(router_type="linear", **kw))
    with torch.no_grad():  # decisive routing: larger router weights than the init's
        for name, p in model.named_parameters():
            if ".router." in name:
                p.normal_(0.0, 0.5)
    randomize_expert_biases(model)
    return model


def _routing(model, ids):
    out = model(ids, labels=ids, output_routing=True)
    return out, [(r.logits, r.probs, r.topk_idx, r.topk_weight) for r in out.routing]


@pytest.mark.parametrize("recurrent", list(RECURRENT))
@pytest.mark.parametrize("source", list(SOURCES))
def test_retrofit_is_the_same_function_at_init_and_trains_apart(source, recurrent):
    old = _source(**SOURCES[source])
    new = retrofit_recurrent(old, **RECURRENT[recurrent])
    assert new.config.router_type == "recurrent" and new.config.router_base_linear
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    for mode in ("eval", "train"):
        getattr(old, mode)(), getattr(new, mode)()
        (out_old, r_old), (out_new, r_new) = _routing(old, ids), _routing(new, ids)
        assert torch.equal(out_old.logits, out_new.logits)
        assert torch.equal(out_old.loss, out_new.loss)
        for a, b in zip(r_old, r_new, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    trainable = freeze_except_router(new)
    frozen = {n: p.clone() for n, p in new.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in new.parameters() if p.requires_grad], lr=1e-2)
    new(ids, labels=ids).loss.backward()
    opt.step()
    new.eval(), old.eval()
    with torch.no_grad():
        assert not torch.equal(old(ids).logits, new(ids).logits)
    assert all(torch.equal(p, frozen[n]) for n, p in new.named_parameters() if n in frozen)
    assert any(".moe.router.scorer." in n for n in trainable)
    assert not any(".moe.router.base." in n for n in trainable)


def test_retrofit_copies_weights_and_zeroes_the_recurrent_scorer():
    old = _source()
    new = retrofit_recurrent(old, router_dim=6)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    for i in range(3):
        w = old_sd[f"model.layers.{i}.moe.router.scorer.weight.weight"]
        assert torch.equal(new_sd[f"model.layers.{i}.moe.router.base.weight"], w)
        assert not new_sd[f"model.layers.{i}.moe.router.scorer.weight.weight"].any()
        assert new_sd[f"model.layers.{i}.moe.router.proj.weight"].shape == (6, 32)
    shared = [k for k in old_sd if ".moe.router.scorer." not in k]
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in shared)
    assert count_model(new).total_params == parameter_counts(new)["total"]
    assert old.config.router_type == "linear"  # the original is untouched


def test_retrofit_seed_makes_the_recurrent_stage_reproducible():
    old = _source()
    a = retrofit_recurrent(old, seed=5).state_dict()
    torch.manual_seed(123)  # the global stream does not matter with a seed
    b = retrofit_recurrent(old, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retrofit_keeps_dtype_mode_and_gw_policy():
    old = _source().double().train()
    from rmoe.modeling import GWPolicy

    old.set_gw_policy(GWPolicy(threshold=0.5))
    new = retrofit_recurrent(old)
    assert next(new.parameters()).dtype == torch.float64 and new.training
    assert new.gw_policy == old.gw_policy


def test_freeze_except_router_can_train_the_base_too():
    new = retrofit_recurrent(_source())
    names = freeze_except_router(new, train_base=True)
    assert any(".moe.router.base." in n for n in names)
    assert {n.split(".")[0] for n in names} == {"model"}
    assert any(n.startswith("model.router_cell.") for n in names)
    assert not any(".experts." in n or ".attn." in n for n in names)
    with pytest.raises(ValueError, match="no router parameters"):
        freeze_except_router(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "source, kw, match",
    [
        (dict(router_type="recurrent"), {}, "router_type 'linear'"),
        (dict(router_type="linear", router_bias=True), {}, "router_bias"),
        (dict(router_type="linear"), dict(router_scorer="cosine"), "router_scorer 'linear'"),
        (dict(router_type="linear"), dict(hidden_size=64), "only the recurrent stage's keys"),
        (dict(router_type="linear"), dict(router_logit_residual=0.5), "router_logit_residual"),
    ],
)
def test_retrofit_refuses_what_would_change_the_function(source, kw, match):
    with pytest.raises(ValueError, match=match):
        retrofit_recurrent(RMoEForCausalLM(tiny_config(**source)), **kw)
