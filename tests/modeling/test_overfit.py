import pytest
import torch
from tests.conftest import ROUTER_TYPES, tiny_config

from rmoe import RMoEForCausalLM

TEXT = (
    b"def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    b"for i in range(10):\n    print(i * i)\n"
)
BOUND = 0.5  # nats per byte after 120 steps; an untrained model starts near ln(258) = 5.55


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_tiny_model_overfits_two_batches(router_type):
    torch.manual_seed(0)
    cfg = tiny_config(router_type=router_type, hidden_size=64, num_hidden_layers=2)
    model = RMoEForCausalLM(cfg).train()
    data = torch.tensor(list(TEXT))
    batches = [data[i * 40 : i * 40 + 33].unsqueeze(0).repeat(2, 1) for i in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(120):
        b = batches[step % 2]
        loss = model(b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = max(model(b, labels=b).lm_loss.item() for b in batches)
    assert final < BOUND, f"{router_type} did not overfit: {final:.3f}"
