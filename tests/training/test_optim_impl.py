"""AdamW implementation choice: auto picks fused for plain CPU tensors; the three agree."""

from __future__ import annotations

import pytest
import torch

from rmoe.training.optim import ADAMW_IMPLEMENTATIONS, adamw, adamw_implementation


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def test_auto_picks_fused_on_cpu():
    m = _model()
    assert adamw_implementation(list(m.parameters())) == "fused"
    opt = adamw(m, 1e-3, 0.1)
    assert all(g.get("fused") for g in opt.param_groups)


def test_implementations_agree():
    x = torch.randn(32, 8)
    results = {}
    for impl in ADAMW_IMPLEMENTATIONS:
        m = _model()
        opt = adamw(m, 1e-2, 0.1, implementation=impl)
        for _ in range(3):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        results[impl] = torch.cat([p.detach().flatten() for p in m.parameters()])
    for impl, v in results.items():
        torch.testing.assert_close(v, results["for-loop"], rtol=1e-5, atol=1e-6, msg=impl)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="fused"):
        adamw(_model(), 1e-3, 0.0, implementation="apex")
