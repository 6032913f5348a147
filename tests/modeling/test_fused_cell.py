"""The fused recurrent cells (torch's native cell ops) equal their gate-by-gate reference and
torch.nn's cells, in value and gradient."""

import pytest
import torch
from torch import nn

from rmoe.modeling.routing.cells import build_cell

TORCH_CELLS = {"gru": nn.GRUCell, "rnn": nn.RNNCell, "lstm": nn.LSTMCell}


@pytest.mark.parametrize("kind", ["gru", "rnn", "lstm"])
def test_fused_cell_equals_reference(kind):
    torch.manual_seed(0)
    cell = build_cell(kind, 16)
    x = torch.randn(37, 16, requires_grad=True)
    state = torch.randn(37, cell.state_dim, requires_grad=True)
    params = list(cell.parameters())
    ins = [x, state, *params]
    fused = cell(x, state)
    ref = cell.reference_forward(x, state)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(ref)
    g_fused = torch.autograd.grad((fused * w).sum(), ins)
    g_ref = torch.autograd.grad((ref * w).sum(), ins)
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gru", "rnn", "lstm"])
def test_fused_cell_equals_torch_nn_cell(kind):
    torch.manual_seed(1)
    cell = build_cell(kind, 8)
    ref = TORCH_CELLS[kind](8, 8)
    ref.load_state_dict(cell.state_dict())
    x, state = torch.randn(5, 8), torch.randn(5, cell.state_dim)
    if kind == "lstm":
        h, c = ref(x, (state[:, :8], state[:, 8:]))
        expected = torch.cat([h, c], dim=-1)
    else:
        expected = ref(x, state)
    torch.testing.assert_close(cell(x, state), expected, rtol=1e-5, atol=1e-6)
