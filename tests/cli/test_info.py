"""`rmoe info --init-stats`: how sharp each router is at initialisation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rmoe.analysis.routing import router_logit_stats
from rmoe.cli.main import main


def test_router_logit_stats_reference():
    uniform = torch.zeros(6, 4)
    sharp = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0]])
    st = router_logit_stats([uniform, sharp])
    assert st["logit_std"][0] == 0.0 and st["entropy"][0] == pytest.approx(1.0)
    assert st["logit_std"][1] == pytest.approx(float(sharp.std(unbiased=False)))
    p = torch.softmax(sharp[0], -1)
    assert st["entropy"][1] == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-5)


def _init_stats(capsys, router: str) -> dict:
    argv = ["info", "tiny", "--init-stats", "--json", "--set", f"model.router_type={router}",
            "--set", "model.num_hidden_layers=2", "--set", "model.hidden_size=64"]  # fmt: skip
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)["init_router"]


def test_init_stats_show_the_recurrent_router_starts_flatter(capsys):
    lin, rec = _init_stats(capsys, "linear"), _init_stats(capsys, "recurrent")
    assert len(lin["logit_std"]) == len(rec["logit_std"]) == 2
    # the chain N(0, 0.02) Proj -> GRU -> N(0, 0.02) scorer gives far smaller logits than W x
    assert max(rec["logit_std"]) * 5 < min(lin["logit_std"])
    assert min(rec["entropy"]) > max(lin["entropy"])
    assert _init_stats(capsys, "linear") == lin  # seeded: the same numbers every time
    assert main(["info", "tiny", "--init-stats"]) == 0
    assert "router logits at init" in capsys.readouterr().out
