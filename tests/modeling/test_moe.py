import pytest
import torch
from tests.conftest import ROUTER_VARIANTS, randomize_expert_biases, tiny_config

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.modeling import GWPolicy
from rmoe.modeling.experts import DISPATCH_BACKENDS, Experts
from rmoe.modeling.moe import MoEBlock, select_gw_tokens
from rmoe.modeling.routing import build_router_cell


def dense_oracle(block: MoEBlock, x: torch.Tensor, routing) -> torch.Tensor:
    """Run every expert on every token, then pick the top-k ones with their weights."""
    xf = x.reshape(-1, x.shape[-1])
    all_out = torch.stack(
        [block.experts.expert_forward(xf, e) for e in range(block.experts.num_experts)], 1
    )
    picked = all_out.gather(1, routing.topk_idx[..., None].expand(-1, -1, xf.shape[-1]))
    y = (picked * routing.topk_weight[..., None]).sum(1)
    if block.shared_experts is not None:
        y = y + block.shared_experts(xf)
    return y.reshape(x.shape)


@pytest.mark.parametrize("variant", list(ROUTER_VARIANTS))
@pytest.mark.parametrize("shared", [0, 1])
def test_moe_output_equals_dense_oracle(variant, shared):
    cfg = tiny_config(num_shared_experts=shared, **ROUTER_VARIANTS[variant])
    model = RMoEForCausalLM(cfg)  # initialised weights, training mode (capacity applies)
    randomize_expert_biases(model)
    block = model.model.layers[0].moe
    cell = model.model.router_cell
    x = torch.randn(2, 5, cfg.hidden_size)
    width = (0 if cell is None else cell.state_dim) + (
        cfg.num_experts if cfg.router_logit_residual else 0
    )
    state = torch.randn(10, width) if width else None
    out = block(x, state, cell, shared=model.model.router_shared)
    torch.testing.assert_close(
        out.hidden, dense_oracle(block, x, out.routing), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("backend", sorted(DISPATCH_BACKENDS))
def test_backends_agree_with_loop_edge_cases(backend):
    experts = Experts(4, 16, 8, backend="loop")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cases = {
        "one_token": torch.tensor([[2, 0]]),
        "all_on_one": torch.tensor([[1, 3]] * 6),
        "empty_expert": torch.tensor([[0, 1], [1, 0], [0, 3]]),
    }
    for idx in cases.values():
        x = torch.randn(idx.shape[0], 16, requires_grad=True)
        w = torch.rand(idx.shape, requires_grad=True)
        outs, grads = [], []
        for b in ("loop", backend):
            y = experts(x, idx, w, backend=b)
            g = torch.autograd.grad((y * torch.arange(16.0)).sum(), [x, w, *experts.parameters()])
            outs.append(y)
            grads.append(g)
        torch.testing.assert_close(outs[0], outs[1])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


def test_gw_broadcasts_uncertain_tokens_in_training_only():
    cfg = tiny_config(router_type="linear", gw_entropy_threshold=0.0)  # every token uncertain
    model = RMoEForCausalLM(cfg)
    block = model.model.layers[0].moe
    x = torch.randn(2, 5, cfg.hidden_size)
    block.train()
    out = block(x)
    assert out.gw_tokens == 10
    xf = x.reshape(10, -1)
    dense = sum(
        out.routing.probs[:, e : e + 1] * block.experts.expert_forward(xf, e) for e in range(4)
    )
    torch.testing.assert_close(out.hidden.reshape(10, -1), dense, rtol=1e-5, atol=1e-6)
    block.eval()
    out_eval = block(x)
    assert out_eval.gw_tokens == 0
    torch.testing.assert_close(out_eval.hidden, dense_oracle(block, x, out_eval.routing))


def test_gw_threshold_cap_and_random_control():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3 * 8, 4, generator=g) * 3
    probs = torch.softmax(logits, -1)
    ent = -(probs * probs.log()).sum(-1) / torch.log(torch.tensor(4.0))
    chosen = select_gw_tokens(probs, (3, 8), 0.5, None, None)
    assert torch.equal(chosen.reshape(-1), ent > 0.5)
    capped = select_gw_tokens(probs, (3, 8), 0.5, 2, None)
    assert (capped.sum(1) <= 2).all()
    # the capped ones are the highest-entropy uncertain tokens of each sequence
    for b in range(3):
        e_b = ent.view(3, 8)[b]
        unc = (e_b > 0.5).nonzero().squeeze(1)
        top = unc[e_b[unc].argsort(descending=True)[:2]]
        assert set(capped[b].nonzero().squeeze(1).tolist()) == set(top.tolist())
    rnd = select_gw_tokens(probs, (3, 8), 0.5, 2, None, selection="random")
    assert torch.equal(rnd.sum(1), capped.sum(1))


def test_gw_respects_padding():
    probs = torch.full((2 * 4, 4), 0.25)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    chosen = select_gw_tokens(probs, (2, 4), 0.5, None, mask)
    assert not chosen[0, 0] and chosen.sum() == 7


def test_dense_layers_pass_state_unchanged():
    cfg = tiny_config(router_type="recurrent", num_hidden_layers=4, mlp_only_layers=[1, 2])
    model = RMoEForCausalLM(cfg).eval()
    out = model(torch.randint(0, 256, (1, 5)), output_routing=True)
    assert len(out.routing) == 2
    assert build_router_cell(cfg) is not None


def _gw_model(**kw) -> RMoEForCausalLM:
    return RMoEForCausalLM(tiny_config(router_type="recurrent", **kw)).train()


def test_set_gw_policy_switches_broadcasting_without_touching_the_config(tmp_path):
    model = _gw_model()
    ids = torch.randint(0, 256, (2, 6))
    n_moe = len(model.config.moe_layer_indices)
    before = model.config.to_dict()
    assert model.gw_policy == GWPolicy(None) and model(ids).gw_tokens == 0

    model.set_gw_policy(GWPolicy(0.0))  # every token is uncertain
    assert model.gw_policy == GWPolicy(0.0)
    assert model.model.gw_policy == GWPolicy(0.0)
    assert model(ids).gw_tokens == 12 * n_moe
    model.set_gw_policy(GWPolicy(0.0, max_tokens_per_seq=2, selection="random"))
    assert model(ids).gw_tokens == 2 * 2 * n_moe
    assert model.config.to_dict() == before
    model.save_pretrained(tmp_path)
    assert RMoEConfig.from_pretrained(tmp_path).gw_entropy_threshold is None

    model.set_gw_policy(None)  # back to the config's policy
    assert model.gw_policy == GWPolicy.from_config(model.config)
    assert model(ids).gw_tokens == 0


def test_none_restores_the_configs_own_policy():
    model = _gw_model(gw_entropy_threshold=0.0, gw_max_tokens_per_seq=1)
    ids = torch.randint(0, 256, (2, 6))
    n_moe = len(model.config.moe_layer_indices)
    assert model(ids).gw_tokens == 2 * n_moe
    model.set_gw_policy(GWPolicy(None))
    assert model(ids).gw_tokens == 0
    model.set_gw_policy(None)
    assert model.gw_policy == GWPolicy(0.0, 1, "entropy")
    assert model(ids).gw_tokens == 2 * n_moe
    model.eval()
    assert model(ids).gw_tokens == 0  # training mode only


def test_forward_never_reads_or_mutates_gw_config():
    model = _gw_model()
    n_moe = len(model.config.moe_layer_indices)
    model.set_gw_policy(GWPolicy(0.0))
    # forward does not consult the config's GW fields: editing them afterwards changes nothing
    model.config.gw_entropy_threshold = 1.0  # would broadcast no token if it were read
    before = model.config.to_dict()
    ids = torch.randint(0, 256, (2, 6))
    assert model(ids, labels=ids).gw_tokens == 12 * n_moe
    assert model.config.to_dict() == before


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(threshold=1.5), "gw_entropy_threshold"),
        (dict(threshold=0.5, max_tokens_per_seq=0), "gw_max_tokens_per_seq"),
        (dict(threshold=0.5, selection="randm"), "nearest: 'random'"),
    ],
)
def test_gw_policy_is_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GWPolicy(**kw)
    with pytest.raises(ValueError, match="GWPolicy or None"):
        _gw_model().set_gw_policy(0.5)
