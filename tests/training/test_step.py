"""The training step on its own: accumulation, loss composition, masking, clipping."""

from __future__ import annotations

import itertools

import pytest
import torch

from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.modeling.losses import training_loss
from rmoe.training.optim import adamw, param_groups
from rmoe.training.step import StepRecord, accumulate_gradients, apply_update, lm_losses


def _model(**kw) -> RMoEForCausalLM:
    cfg = dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, router_dim=8,
        max_position_embeddings=32, router_aux_loss_coef=0.1, router_z_loss_coef=0.01,
    )  # fmt: skip
    cfg.update(kw)
    torch.manual_seed(0)
    return RMoEForCausalLM(RMoEConfig(**cfg))


def _batches(n: int, b: int = 2, t: int = 8):
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 64, (b, t + 1), generator=g) for _ in range(n)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def test_training_loss_composition():
    lm, aux, z = torch.tensor(2.0), torch.tensor(1.5), torch.tensor(4.0)
    assert training_loss(lm, aux, z, 0.1, 0.0).item() == pytest.approx(2.15)
    assert training_loss(lm, aux, z, 0.1, 0.01).item() == pytest.approx(2.19)
    assert training_loss(lm, None, None, 0.1, 0.01).item() == 2.0


def test_lm_losses_matches_model_loss_with_labels():
    model = _model().train()
    ((x, y),) = _batches(1)
    loss, lm, aux, z, _ = lm_losses(model, model.config, x, y)
    assert lm.item() > 0 and aux.item() > 0 and z.item() > 0
    expect = lm + 0.1 * aux + 0.01 * z
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    # the model's own loss with labels (shifted inside) is the same next-token loss: the logits
    # of the first T positions of x + y's last token are those of x (causal attention)
    model.eval()
    full = torch.cat([x, y[:, -1:]], dim=1)
    _, lm_eval, *_ = lm_losses(model, model.config, x, y)
    out = model(input_ids=full, labels=full)
    assert out.lm_loss.item() == pytest.approx(lm_eval.item(), rel=1e-5)
    # in eval mode the model's loss is the LM loss (router losses join it in training only)
    assert out.aux_loss.item() > 0 and torch.equal(out.loss, out.lm_loss)
    model.train()
    out = model(input_ids=full, labels=full)
    assert out.loss.item() == pytest.approx(
        training_loss(out.lm_loss, out.aux_loss, out.z_loss, 0.1, 0.01).item(), rel=1e-6
    )


def test_accumulation_equals_one_big_batch():
    """Two micro-batches of 2 windows give the gradient of the mean over both (÷ accum)."""
    batches = _batches(2)
    a, b = _model(router_type="linear"), _model(router_type="linear")
    rec = accumulate_gradients(a, a.config, iter(batches), 2)
    assert isinstance(rec, StepRecord) and rec.routing is None
    for x, y in batches:
        loss, *_ = lm_losses(b, b.config, x, y)
        (loss / 2).backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    per = [lm_losses(b, b.config, x, y)[0].item() for x, y in batches]
    assert rec.loss == pytest.approx(sum(per) / 2, rel=1e-5)


def test_log_routing_records_per_layer_stats():
    model = _model()
    rec = accumulate_gradients(model, model.config, iter(_batches(1)), 1, log_routing=True)
    # dropless, no expert bias: "dropped" is 0 and there is no "bias_range"
    assert set(rec.routing) == {
        "load_cv",
        "max_violation",
        "entropy",
        "aux",
        "dropped",
        "logit_std",
    }
    assert all(len(v) == 2 for v in rec.routing.values())
    assert rec.routing["dropped"] == [0.0, 0.0]
    assert all(0 < e <= 1 for e in rec.routing["entropy"])


class _CountingMasker:
    def __init__(self, params):
        self.calls, self.params = 0, params

    def apply_(self) -> None:
        self.calls += 1
        for p in self.params:
            p.grad.zero_()


def test_apply_update_masks_clips_and_steps():
    model = _model()
    opt = adamw(model, lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    accumulate_gradients(model, model.config, iter(_batches(1)), 1)
    frozen = [model.lm_head.weight]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masker = _CountingMasker(frozen)
    norm = apply_update(opt, sched, model.parameters(), grad_clip=1e-3, masker=masker)
    assert masker.calls == 1
    assert norm is not None and norm > 1e-3  # the norm before clipping
    assert torch.equal(before["lm_head.weight"], model.lm_head.weight)  # masked: no update
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert moved and sched.get_last_lr()[0] == pytest.approx(5e-3)
    assert apply_update(opt, None, model.parameters(), grad_clip=0.0) is None


def test_param_groups_decay_matrices_only_and_skip_frozen():
    model = _model()
    model.lm_head.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = {id(p) for p in itertools.chain(decay["params"], no_decay["params"])}
    assert id(model.lm_head.weight) not in ids
    assert len(ids) == sum(1 for p in model.parameters() if p.requires_grad)


def test_router_lr_multiplier_and_weight_decay_get_their_own_groups():
    from rmoe.modeling.accounting import is_router_parameter
    from rmoe.training.optim import warmup_constant

    model = _model(router_bias=True)
    assert len(param_groups(model, 0.1, lr=1e-3, router_lr_mult=1.0)) == 2  # unchanged default
    groups = param_groups(model, 0.1, lr=1e-3, router_lr_mult=4.0, router_weight_decay=0.0)
    router = [g for g in groups if g.get("router")]
    assert [g["lr"] for g in router] == [4e-3, 4e-3]
    assert [g["weight_decay"] for g in router] == [0.0, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        assert all(is_router_parameter(names[id(p)]) == bool(g.get("router")) for p in g["params"])
    covered = sum(len(g["params"]) for g in groups)
    assert covered == sum(1 for _ in model.parameters())
    assert any("router_cell" in names[id(p)] for g in router for p in g["params"])
    with pytest.raises(ValueError, match="base lr"):
        param_groups(model, 0.1, router_lr_mult=2.0)
    # the schedule scales every group from its own lr
    opt = adamw(model, 1e-3, 0.1, router_lr_mult=4.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(2))
    assert sched.get_last_lr()[-1] == pytest.approx(4 * sched.get_last_lr()[0])


def test_router_lr_multiplier_from_the_run_config(micro_cfg):
    from rmoe.training.config import TrainConfig
    from rmoe.training.optim import build_optimizer

    cfg = micro_cfg(optim=dict(router_lr_mult=0.5, router_weight_decay=0.01))
    assert isinstance(cfg, TrainConfig)
    opt = build_optimizer(_model(), cfg)
    router = [g for g in opt.param_groups if g.get("router")]
    assert router and all(g["lr"] == pytest.approx(cfg.optim.lr * 0.5) for g in router)
    assert {g["weight_decay"] for g in router} == {0.01, 0.0}
    with pytest.raises(ValueError, match="router_lr_mult"):
        micro_cfg(optim=dict(router_lr_mult=0.0))
