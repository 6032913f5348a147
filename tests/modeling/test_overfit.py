import pytest
import torch
from tests.conftest import NEW_VARIANTS, ROUTER_TYPES, tiny_config

from rmoe import RMoEForCausalLM
from rmoe.modeling import install_router_step_hook

TEXT = (
    b"def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    b"for i in range(10):\n    print(i * i)\n"
)
BOUND = 0.5  # nats per byte after 120 steps; an untrained model starts near ln(258) = 5.55


VARIANTS = {**{rt: {"router_type": rt} for rt in ROUTER_TYPES}, **NEW_VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_model_overfits_two_batches(variant):
    torch.manual_seed(0)
    router_type = variant
    cfg = tiny_config(hidden_size=64, num_hidden_layers=2, **VARIANTS[variant])
    model = RMoEForCausalLM(cfg).train()
    data = torch.tensor(list(TEXT))
    batches = [data[i * 40 : i * 40 + 33].unsqueeze(0).repeat(2, 1) for i in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    install_router_step_hook(model, opt)  # expert-bias updates, where the router has a bias
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
