"""Model surgery for fine-tuning (rmoe.training.surgery): router freezing, GW-MoE switching."""

from __future__ import annotations

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
