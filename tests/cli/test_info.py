"""`rmoe info --init-stats`: how sharp each router is at initialisation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rmoe.analysis.routing import router_logit_stats
from rmoe.cli.main import main
from rmoe.modeling.routing import RoutingResult
from rmoe.registry import SCORE_FUNCS


def _routing(logits: torch.Tensor, score_func: str = "softmax") -> RoutingResult:
    """A RoutingResult of hand-made logits [N, E] scored by a registered score function."""
    fn = SCORE_FUNCS.lookup(score_func)
    probs = fn.distribution(fn.scores(logits))
    idx = probs.topk(2, -1).indices
    return RoutingResult(logits, probs, idx, probs.gather(-1, idx), None)


def test_router_logit_stats_reference():
    uniform = torch.zeros(6, 4)
    sharp = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0]])
    st = router_logit_stats([_routing(uniform), _routing(sharp)])
    assert st["logit_std"][0] == 0.0 and st["entropy"][0] == pytest.approx(1.0)
    assert st["logit_std"][1] == pytest.approx(float(sharp.std(unbiased=False)))
    p = torch.softmax(sharp[0], -1)
    assert st["entropy"][1] == pytest.approx(float(-(p * p.log()).sum() / math.log(4)), rel=1e-5)


def test_router_logit_stats_use_the_routers_distribution_for_sigmoid():
    # sigmoid scores s = (0.99995, 0.5, 0.5, 0.5) normalised: not the softmax of the logits
    sharp = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    st = router_logit_stats([_routing(sharp, "sigmoid")])
    s = torch.sigmoid(sharp[0])
    p = s / s.sum()
    expect = float(-(p * p.log()).sum() / math.log(4))
    assert st["entropy"][0] == pytest.approx(expect, rel=1e-5)
    q = torch.softmax(sharp[0], -1)
    assert abs(st["entropy"][0] - float(-(q * q.log()).sum() / math.log(4))) > 0.5


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


def test_init_stats_sigmoid_router_runs(capsys):
    argv = ["info", "tiny", "--init-stats", "--json", "--set", "model.router_type=linear",
            "--set", "model.router_score_func=sigmoid", "--set", "model.num_hidden_layers=2",
            "--set", "model.hidden_size=64", "--set", "model.router_init=normal"]  # fmt: skip
    assert main(argv) == 0
    st = json.loads(capsys.readouterr().out)["init_router"]
    # sigmoid scores of small logits are all near 0.5: the normalised distribution is flat
    assert len(st["entropy"]) == 2 and min(st["entropy"]) > 0.99


def test_router_line_names_the_options_that_are_set(capsys):
    assert main(["info", "tiny", "--set", "model.router_type=linear"]) == 0
    assert "router:              linear\n" in capsys.readouterr().out  # defaults: the name only
    argv = ["info", "tiny", "--json", "--set", "model.router_type=recurrent",
            "--set", "model.router_score_func=sigmoid", "--set", "model.router_scale=2.5",
            "--set", "model.router_logit_residual=0.5", "--set", "model.router_detach_residual=true",
            "--set", "model.router_share_proj=true", "--set", "model.router_expert_bias=true",
            "--set", "model.router_aux_loss_type=sequence", "--set", "model.capacity_factor=1.25"]  # fmt: skip
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out)["router"]
    assert line.startswith("recurrent (RMoE; gru")
    for part in ("sigmoid scores x 2.5", "logit residual alpha=0.5, detached", "S-proj",
                 "expert bias (rate 0.001)", "sequence balance loss", "capacity 1.25 train / dropless eval"):  # fmt: skip
        assert part in line, part
