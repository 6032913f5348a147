"""Model surgery for fine-tuning (rmoe.training.surgery): router freezing, GW-MoE switching."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import tiny_config

from rmoe import RMoEForCausalLM
from rmoe.training.surgery import freeze_router, gw_training, router_parameter_names


def _model(**overrides) -> RMoEForCausalLM:
    return RMoEForCausalLM(tiny_config(router_type="recurrent", **overrides))


def test_router_names_cover_routers_and_the_shared_cell():
    names = router_parameter_names(_model())
    assert names and all(".router" in n or "router_cell" in n for n in names)
    assert any("router_cell" in n for n in names)


def test_freeze_router_freezes_only_router_parameters():
    model = _model()
    frozen = set(freeze_router(model))
    for name, p in model.named_parameters():
        assert p.requires_grad == (name not in frozen), name
    with pytest.raises(ValueError, match="no router parameters"):
        freeze_router(torch.nn.Linear(2, 2))


def test_gw_training_errors():
    with pytest.raises(ValueError, match="need --gw-threshold"), gw_training(_model(), None, 3):
        pass
    with (
        pytest.raises(ValueError, match="need an rmoe model"),
        gw_training(torch.nn.Linear(2, 2), 0.5),
    ):
        pass
    with gw_training(torch.nn.Linear(2, 2), None):  # nothing asked: any model
        pass


def test_gw_training_sets_the_policy_leaves_the_config_and_restores():
    from rmoe.modeling.moe import GWPolicy

    model = _model()
    config = copy.deepcopy(model.config.to_dict())
    before = model.gw_policy
    with gw_training(model, 0.3, max_tokens_per_seq=2, random=True):
        assert model.gw_policy == GWPolicy(threshold=0.3, max_tokens_per_seq=2, selection="random")
        assert model.config.to_dict() == config
    assert model.gw_policy == before
    assert model.config.to_dict() == config


def test_gw_training_keeps_what_it_is_not_given_and_restores_an_explicit_policy():
    from rmoe.modeling.moe import GWPolicy

    model = _model()
    mine = GWPolicy(threshold=0.5, max_tokens_per_seq=4)
    model.set_gw_policy(mine)
    with gw_training(model, None, random=True):
        assert model.gw_policy == GWPolicy(threshold=0.5, max_tokens_per_seq=4, selection="random")
    assert model.gw_policy == mine
    with pytest.raises(RuntimeError), gw_training(model, 0.1):
        raise RuntimeError("training failed")
    assert model.gw_policy == mine  # restored on errors too
