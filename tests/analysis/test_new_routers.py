"""The rmoe adapter and the analysis pipeline on the router stages of issue 12: the shared
(Omni-Router) producer, the logit residual (r-alpha, detach-r), S-proj, sigmoid scoring with a
routed scale, the aux-loss-free expert bias and capacity-factor dropping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.analysis import routing as R
from rmoe.analysis.adapters import get_adapter
from rmoe.analysis.adapters.rmoe_model import router_facts
from rmoe.analysis.run import analyze
from rmoe.data import build_tokenizer
from rmoe.modeling.routing import router_presets
from rmoe.registry import ROUTERS

VOCAB = 64
_SIGMOID_BIAS = dict(router_score_func="sigmoid", router_expert_bias=True, router_scale=2.0)

VARIANTS: dict[str, dict] = {
    "shared": {"router_type": "shared"},
    "shared+sigmoid": {"router_type": "shared", "router_score_func": "sigmoid"},
    "recurrent-np-r0.5": dict(router_presets()["recurrent-np-r0.5"]),
    "recurrent-detach-r": dict(router_presets()["recurrent-detach-r"]),
    "recurrent-sproj": dict(router_presets()["recurrent-sproj"]),
    "linear-r1": {"router_type": "linear", "router_logit_residual": 1.0},
    "linear+sigmoid+bias": {"router_type": "linear", **_SIGMOID_BIAS},
    "recurrent+sigmoid+bias": {"router_type": "recurrent", **_SIGMOID_BIAS},
    "linear+capacity": {"router_type": "linear", "eval_capacity_factor": 0.5},
    "recurrent+sigmoid+bias+capacity": {
        "router_type": "recurrent",
        **_SIGMOID_BIAS,
        "eval_capacity_factor": 0.5,
    },
}


def _model(**keys) -> RMoEForCausalLM:
    torch.manual_seed(0)
    cfg = RMoEConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        moe_intermediate_size=16,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        router_dim=8,
        num_shared_experts=1,
        **keys,
    )
    model = RMoEForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # decisive routing, and biases that change the choice
        for name, p in model.named_parameters():
            if "router" in name and p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for module in model.modules():
            bias = getattr(module, "expert_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.3)
    return model


def _block_outputs(adapter) -> tuple[dict, list]:
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer in adapter.layers:

        def hook(module, args, output, i=layer.index):
            y = output.hidden if hasattr(output, "hidden") else output
            seen[i] = y.detach()

        handles.append(layer.block.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_capture_reproduces_every_router_stage(variant: str):
    keys = VARIANTS[variant]
    model = _model(**keys)
    cfg = model.config
    adapter = get_adapter(model)
    spec = adapter.spec
    assert spec.score == cfg.router_score_func
    assert spec.routed_scaling_factor == cfg.router_scale
    assert spec.score_correction_bias == cfg.router_expert_bias
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    blocks, handles = _block_outputs(adapter)
    with torch.no_grad(), adapter.capture(store_inputs=1000, store_outputs=True) as cap:
        out = model(ids, use_cache=False, output_router_logits=True)
    for h in handles:
        h.remove()
    n = ids.numel()
    capacity = cfg.eval_capacity_factor is not None
    for i, lc in enumerate(cap.layers):
        torch.testing.assert_close(lc.logits, out.router_logits[i].float().reshape(n, -1))
        torch.testing.assert_close(lc.probs.sum(-1), torch.ones(n))
        act = torch.sigmoid if spec.score == "sigmoid" else lambda z: torch.softmax(z, -1)
        torch.testing.assert_close(lc.scores, act(lc.logits))
        bias = adapter.score_correction_bias(i)
        assert (bias is not None) == cfg.router_expert_bias
        # The routing function reproduces the choice (bias included) and the dropless weights.
        decision = adapter.route(i, lc.logits)
        assert torch.equal(decision.topk_idx, lc.topk_idx)
        kept = torch.ones_like(lc.topk_idx, dtype=torch.bool)
        if capacity:
            assert lc.dropped is not None and lc.dropped.shape == lc.topk_idx.shape
            assert 0 < lc.dropped_share < 1
            kept = ~lc.dropped
            assert torch.all(lc.topk_weight[lc.dropped] == 0)
        else:
            assert lc.dropped is None and lc.dropped_share is None
        torch.testing.assert_close(decision.topk_weight * kept, lc.topk_weight)
        # The block output is sum_k w_k E_k(x) + the shared expert, from the adapter's pieces.
        x, outs = lc.inputs, lc.expert_outputs
        y = (outs[lc.topk_idx, torch.arange(n)[:, None]] * lc.topk_weight[..., None]).sum(1)
        with torch.no_grad():
            y = y + adapter.layers[i].shared(x)
        torch.testing.assert_close(y, blocks[i].reshape(n, -1), rtol=1e-4, atol=1e-5)
        # Stateless routers' logits are recomputed from the inputs; stateful ones refuse.
        stateful = ROUTERS[cfg.router_type].uses_cell or cfg.router_logit_residual > 0
        if stateful:
            with pytest.raises(ValueError, match="previous layer"):
                adapter.router_logits(i, x)
        else:
            torch.testing.assert_close(adapter.router_logits(i, x), lc.logits)
        assert adapter.router_weight(i).shape[0] == cfg.num_experts


def test_shared_router_weight_and_parameters():
    model = _model(router_type="shared")
    adapter = get_adapter(model)
    w = model.model.router_shared.weight.weight
    for i in range(adapter.num_layers):
        assert torch.equal(adapter.router_weight(i), w.detach())
        assert adapter.router_parameters(i) == []
    shared = adapter.shared_router_parameters()
    assert len(shared) == 1 and shared[0] is w
    assert adapter.layers[0].router_space == ROUTERS["shared"].routing_space(model.config)


def test_sproj_shares_the_projector_and_the_cell():
    model = _model(**router_presets()["recurrent-sproj"])
    adapter = get_adapter(model)
    ids = {id(p) for p in adapter.shared_router_parameters()}
    assert {id(p) for p in model.model.router_shared.parameters()} <= ids
    assert {id(p) for p in model.model.router_cell.parameters()} <= ids
    assert adapter.router_weight(0).shape == (4, 8)  # the per-layer scorer on the state P


def test_description_names_every_stage():
    def text(**keys) -> str:
        return router_facts(RMoEConfig(**keys)).description

    assert text(router_type="linear") == "linear"
    assert text(router_type="recurrent") == "recurrent:gru+linear"
    np_r = text(**router_presets()["recurrent-detach-r"])
    assert "no state passing" in np_r and "logit residual (alpha 1, detached)" in np_r
    assert "S-proj" in text(**router_presets()["recurrent-sproj"])
    stages = text(
        router_type="shared",
        router_score_func="sigmoid",
        router_scale=2.5,
        router_expert_bias=True,
        router_aux_loss_type="sequence",
        router_aux_loss_coef=1e-4,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
    )
    for part in (
        "shared",
        "sigmoid x 2.5",
        "expert bias (gamma 0.001)",
        "sequence aux loss (0.0001)",
        "capacity 1.25 (eval 2)",
    ):
        assert part in stages, (part, stages)
    assert "no aux loss" in text(router_type="linear", router_aux_loss_coef=0.0)
    assert "capacity 1 (eval dropless)" in text(router_type="linear", capacity_factor=1.0)
    assert router_facts(RMoEConfig(router_type="linear", router_logit_residual=0.5)).stateful
    assert not router_facts(RMoEConfig(router_type="shared")).stateful


def test_model_routing_reports_the_dropped_share():
    rng = np.random.default_rng(0)
    z = np.exp(rng.normal(size=(32, 4)))
    probs = [z / z.sum(1, keepdims=True)] * 2
    topk = [np.argsort(-p, 1)[:, :2] for p in probs]
    plain = R.model_routing(probs, topk, 4, [0, 1]).to_dict()
    assert "dropped_share" not in plain["per_layer"][0]
    assert "dropped_share_mean" not in plain["summary"]
    dropped = np.zeros((32, 2), dtype=bool)
    dropped[:8, 1] = True  # 8 of 64 assignments
    got = R.model_routing(probs, topk, 4, [0, 1], [dropped, None]).to_dict()
    assert got["per_layer"][0]["dropped_share"] == pytest.approx(0.125)
    assert "dropped_share" not in got["per_layer"][1]
    assert got["summary"]["dropped_share_mean"] == pytest.approx(0.125)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    gen = torch.Generator().manual_seed(0)
    words = "router expert token layer state balance sigmoid bias capacity shared".split()
    idx = torch.randint(0, len(words), (6000,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(words[i] for i in idx))
    return f"text:{path}"


def _save(path, **keys):
    torch.manual_seed(0)
    cfg = RMoEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        moe_intermediate_size=32,
        intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        router_dim=8,
        **keys,
    )
    RMoEForCausalLM(cfg).save_pretrained(path)
    build_tokenizer("bytes").save(path)
    return path


@pytest.mark.slow
def test_analyze_shared_and_sigmoid_capacity_models(corpus, tmp_path):
    """`rmoe analyze` end to end on a shared router and on a sigmoid + bias router with an eval
    capacity: metrics, the dropped share, the router gradients of the shared weight."""
    a = _save(tmp_path / "omni", router_type="shared")
    b = _save(
        tmp_path / "dsv3",
        router_type="recurrent",
        eval_capacity_factor=0.75,
        router_aux_loss_type="sequence",
        **_SIGMOID_BIAS,
    )
    out = tmp_path / "report"
    analyze(
        [a, b],
        data=corpus,
        tokens=128,
        out_dir=out,
        seq_len=32,
        batch_size=4,
        output_tokens=32,
        grad_batch_size=2,
        cache_dir=tmp_path / "cache",
    )
    data = json.loads((out / "metrics.json").read_text())
    omni, dsv3 = data["models"]["omni"], data["models"]["dsv3"]
    assert omni["adapter"]["routing"]["router"] == "shared"
    routing = dsv3["adapter"]["routing"]
    assert routing["score"] == "sigmoid" and routing["score_correction_bias"]
    assert "capacity dropless (eval 0.75)" in routing["router"]
    assert 0 < dsv3["routing"]["summary"]["dropped_share_mean"] < 1
    assert "dropped_share" not in omni["routing"]["per_layer"][0]
    grads = omni["router_gradients"]
    assert grads["lm"]["shared_cell"] > 0 and grads["lm"]["per_layer"] == [0.0, 0.0]
    assert "'sequence'" in dsv3["router_gradients"]["balance_loss_definition"]
    for m in (omni, dsv3):
        for layer in m["routing"]["per_layer"]:
            assert sum(layer["load"]["counts"]) == 128 * 2
    assert (out / "report.html").is_file()
