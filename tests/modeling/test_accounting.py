import pytest
from tests.conftest import ROUTER_TYPES, tiny_config

from rmoe import RMoEForCausalLM
from rmoe.modeling.accounting import count_config, parameter_counts


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
@pytest.mark.parametrize("extra", [{}, {"num_shared_experts": 1, "mlp_only_layers": [0]}])
def test_config_counts_match_model(router_type, extra):
    cfg = tiny_config(router_type=router_type, router_bias=router_type == "mlp", **extra)
    model = RMoEForCausalLM(cfg)
    counts = count_config(cfg)
    real = parameter_counts(model)
    assert counts.total_params == real["total"]
    assert counts.router_params == real["router"]
    assert counts.expert_params == real["experts"]
    assert counts.active_params < counts.total_params


def test_rmoe_and_np_and_detach_cost_the_same():
    a = count_config(tiny_config(router_type="recurrent"))
    b = count_config(tiny_config(router_type="recurrent", router_pass_state=False))
    c = count_config(tiny_config(router_type="recurrent", router_detach_state=True))
    assert a == b == c
    ma = parameter_counts(RMoEForCausalLM(tiny_config(router_type="recurrent")))
    mb = parameter_counts(
        RMoEForCausalLM(tiny_config(router_type="recurrent", router_pass_state=False))
    )
    assert ma == mb


@pytest.mark.parametrize("bias", [False, True])
def test_router_parameter_formula(bias):
    layers, d, p, e = 3, 32, 8, 4
    cfg = tiny_config(router_type="recurrent", router_bias=bias)
    expected = layers * (d * p + p * e) + (6 * p * p + 6 * p)  # GRU: 3 gates x (W_ih, W_hh, 2 b)
    if bias:
        expected += layers * (p + e)
    assert count_config(cfg).router_params == expected
    assert parameter_counts(RMoEForCausalLM(cfg))["router"] == expected


def test_router_flops_recurrent_vs_linear():
    lin = count_config(tiny_config(router_type="linear"), seq_len=64)
    rec = count_config(tiny_config(router_type="recurrent"), seq_len=64)
    d, p, e, layers = 32, 8, 4, 3
    assert lin.router_flops_per_token == 2 * layers * d * e
    assert rec.router_flops_per_token == 2 * layers * (d * p + 6 * p * p + p * e)
    assert rec.forward_flops_per_token - lin.forward_flops_per_token == (
        rec.router_flops_per_token - lin.router_flops_per_token
    )
