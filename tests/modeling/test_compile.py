"""torch.compile(fullgraph=True) of the MoE block: no graph break, one graph for several token
counts, outputs and gradients equal to eager (sorted and grouped_mm backends)."""

import pytest
import torch
from tests.conftest import tiny_config

from rmoe.modeling.experts import grouped_mm_unsupported_reason
from rmoe.modeling.moe import MoEBlock
from rmoe.modeling.routing import build_router_cell

BACKENDS = ["sorted", "grouped_mm"]


def _grads(fn, x, state, params):
    out = fn(x, state)
    loss = (out[0] ** 2).sum() + out[1] + (0.0 if out[2] is None else out[2].square().sum())
    inputs = [x] + ([state] if state is not None else [])
    return out[0].detach(), torch.autograd.grad(loss, inputs + params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("router_type", ["linear", "recurrent"])
def test_fullgraph_compile_equals_eager(backend, router_type):
    if backend == "grouped_mm":
        reason = grouped_mm_unsupported_reason(torch.zeros(1), torch.zeros(1))
        if reason is not None:
            pytest.skip(reason)
    torch._dynamo.reset()
    torch.manual_seed(0)
    # D = 32 aligned, F = 20 (80 bytes: aligned), E = 6: uneven loads, some experts may be empty
    cfg = tiny_config(
        router_type=router_type, experts_backend=backend, num_experts=6, moe_intermediate_size=20
    )
    block = MoEBlock(cfg).train()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cell = build_router_cell(cfg)
    params = list(block.parameters()) + ([] if cell is None else list(cell.parameters()))

    def step(x, state):
        out = block(x, state, cell, compute_losses=True)
        return out.hidden, out.aux_loss, out.routing.state

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for t in (3, 7, 12):  # several token counts under one compiled function
        x = torch.randn(2, t, cfg.hidden_size, requires_grad=True)
        state = None
        if cell is not None:
            state = torch.randn(2 * t, cell.state_dim, requires_grad=True)
        y_ref, g_ref = _grads(step, x, state, params)
        y, g = _grads(compiled, x, state, params)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_mm_unaligned_width_compiles():
    """D * 4 bytes not a multiple of 16 (D = 30): the padded path traces too."""
    if grouped_mm_unsupported_reason(torch.zeros(1), torch.zeros(1)) is not None:
        pytest.skip("no grouped_mm here")
    torch._dynamo.reset()
    torch.manual_seed(1)
    cfg = tiny_config(
        hidden_size=30,
        num_attention_heads=3,
        num_key_value_heads=3,
        router_type="linear",
        experts_backend="grouped_mm",
    )
    block = MoEBlock(cfg).eval()
    for p in block.parameters():  # the experts' weights start uninitialised (torch.empty)
        torch.nn.init.normal_(p, std=0.2)

    def step(x):
        return block(x, compute_losses=False).hidden

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for t in (4, 9):
        x = torch.randn(1, t, 30)
        torch.testing.assert_close(compiled(x), step(x), rtol=1e-5, atol=1e-5)
