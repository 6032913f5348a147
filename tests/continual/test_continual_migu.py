"""Tests for rmoe.continual.migu: which gradient rows MIGU / RandomMask let through."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmoe.continual import MIGU, ExpertOutputProbe, RandomMask, num_kept_rows


class TinyMLP(nn.Module):
    """x [B, T, 8] -> fc1 (16 units) -> gelu -> fc2 (10 units)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TinyExperts(nn.Module):
    """Top-1 experts with 3-D weights, exposing per-expert outputs through probes.

    w_up [E, F, D] (output units on dim 1), w_down [E, F, D] used as [E, D_in=F, F_out=D]
    (output units on dim 2), b_up [E, F].
    """

    def __init__(self, num_experts: int = 3, d: int = 8, f: int = 12) -> None:
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(num_experts, f, d) / d**0.5)
        self.b_up = nn.Parameter(torch.randn(num_experts, f) * 0.1)
        self.w_down = nn.Parameter(torch.randn(num_experts, f, d) / f**0.5)
        self.up_probe = ExpertOutputProbe("w_up", out_dim=1, bias_name="b_up")
        self.down_probe = ExpertOutputProbe("w_down", out_dim=2)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [N, D], expert_ids [N] -> [N, D]."""
        h = torch.einsum("nd,nfd->nf", x, self.w_up[expert_ids]) + self.b_up[expert_ids]
        h = self.up_probe(h, expert_ids, token_index=torch.arange(len(x)))
        y = torch.einsum("nf,nfd->nd", F.gelu(h), self.w_down[expert_ids])
        return self.down_probe(y, expert_ids)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed_rows(after: torch.Tensor, before: torch.Tensor, out_dim: int = 0) -> torch.Tensor:
    """Bool per output unit (per expert for 3-D weights): did any entry of that row change?"""
    diff = after != before
    if diff.dim() == 1:
        return diff
    if diff.dim() == 2:
        return diff.any(dim=1)
    return diff.any(dim=2) if out_dim == 1 else diff.any(dim=1)  # [E, F_out]


def _make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_step_changes_only_kept_rows(opt_kind: str, precision: str) -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    migu = MIGU(model, ratio=0.7)
    opt = _make_optimizer(opt_kind, model.parameters())
    before = _snapshot(model)
    x = torch.randn(4, 5, 8)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with autocast:
        out = model(x)
    if precision == "bf16":
        assert out.dtype == torch.bfloat16
    loss = out.float().pow(2).mean()
    loss.backward()
    masks = migu.apply_()
    opt.step()
    assert set(masks) == {"fc1", "fc2"}
    for name in ("fc1", "fc2"):
        keep = masks[name]
        assert keep.dtype == torch.bool
        assert int(keep.sum()) == num_kept_rows(keep.numel(), 0.7)
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}"
            changed = _changed_rows(model.get_parameter(key).detach(), before[key])
            assert not changed[~keep].any(), f"{key}: a masked row moved"
            assert changed[keep].all(), f"{key}: a kept row did not move"


@pytest.mark.parametrize(
    ("n", "ratio", "kept"),
    [(10, 0.7, 3), (16, 0.7, 5), (64, 0.7, 19), (10, 0.5, 5), (7, 0.0, 7), (7, 1.0, 1)],
)
def test_num_kept_rows_table(n: int, ratio: float, kept: int) -> None:
    assert num_kept_rows(n, ratio) == kept


def test_kept_count_matches_torch_quantile_rule() -> None:
    """With distinct magnitudes, the kept rows are exactly acc >= torch.quantile(acc, ratio)."""
    torch.manual_seed(1)
    model = TinyMLP()
    migu = MIGU(model, ratio=0.7, norm="raw")
    model(torch.randn(3, 4, 8)).sum().backward()
    mags = migu.magnitudes()
    masks = migu.apply_()
    for name, keep in masks.items():
        rule = mags[name] >= torch.quantile(mags[name], 0.7)
        assert torch.equal(keep, rule)
        assert int(keep.sum()) == num_kept_rows(len(keep), 0.7)


@pytest.mark.parametrize("norm", ["l1", "raw"])
def test_two_micro_batches_equal_one_big_batch(norm: str) -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 6, 8)
    pad = torch.ones(4, 6)
    pad[0, 4:] = 0
    pad[3, 1:] = 0
    model = TinyMLP()

    big = MIGU(model, norm=norm)
    big.set_token_mask(pad)
    model(x).pow(2).mean().backward()
    big_mags = big.magnitudes()
    big_masks = big.apply_()
    big.remove()
    model.zero_grad()

    small = MIGU(model, norm=norm)
    for part in (slice(0, 2), slice(2, 4)):
        with small.token_mask(pad[part]):
            (model(x[part]).pow(2).mean() / 2).backward()
    small_mags = small.magnitudes()
    small_masks = small.apply_()

    for name in big_masks:
        torch.testing.assert_close(small_mags[name], big_mags[name])
        assert torch.equal(small_masks[name], big_masks[name])


def test_padding_is_excluded() -> None:
    """Magnitudes with a token mask equal those of the unpadded tokens alone."""
    torch.manual_seed(3)
    model = TinyMLP()
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    migu = MIGU(model)
    migu.set_token_mask(pad)
    model(x)
    masked = migu.magnitudes()
    migu.reset()
    migu.set_token_mask(None)
    model(x[pad.bool()])  # the 5 real tokens, [5, 8]
    plain = migu.magnitudes()
    for name in masked:
        torch.testing.assert_close(masked[name], plain[name])


def test_l1_and_raw_give_different_masks() -> None:
    """One loud token dominates the raw sum but counts as one token after L1 normalisation."""
    layer = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
    x = torch.tensor([[10.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])
    # raw sum |h| = [10, 2, 1] -> unit 0; L1 mean = [1, 4/3, 2/3] / 3 -> unit 1.
    masks = {}
    for norm in ("raw", "l1"):
        migu = MIGU(layer, ratio=0.7, norm=norm)  # 3 units at 0.7 -> keep 1
        layer(x).sum().backward()
        masks[norm] = migu.apply_()[""]
        migu.remove()
        layer.zero_grad()
    assert masks["raw"].tolist() == [True, False, False]
    assert masks["l1"].tolist() == [False, True, False]


def test_lora_inner_matrices_are_masked() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["fc1", "fc2"], init_lora_weights=False
    )
    model = peft.get_peft_model(TinyMLP(), config)
    migu = MIGU(model, ratio=0.7)
    lora_names = [n for n in migu.covered if "lora_" in n]
    assert len(lora_names) == 4  # lora_A and lora_B of fc1 and fc2
    assert not any("base_layer" in n for n in migu.covered)  # frozen: skipped
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = _snapshot(model)
    model(torch.randn(3, 4, 8)).pow(2).mean().backward()
    masks = migu.apply_()
    opt.step()
    assert set(masks) == set(lora_names)
    for name in lora_names:
        keep = masks[name]
        key = f"{name}.weight"
        assert int(keep.sum()) == num_kept_rows(len(keep), 0.7)
        changed = _changed_rows(model.get_parameter(key).detach(), before[key])
        assert not changed[~keep].any()
        assert changed[keep].all()
    for key, value in before.items():
        if "base_layer" in key:
            assert torch.equal(model.get_parameter(key).detach(), value)


def _expert_batch(n: int = 40, d: int = 8, num_experts: int = 3) -> tuple[torch.Tensor, ...]:
    x = torch.randn(n, d)
    ids = torch.arange(n) % num_experts
    return x, ids


def test_expert_weights_masked_per_expert_row() -> None:
    torch.manual_seed(5)
    model = TinyExperts()
    migu = MIGU(model, ratio=0.7)
    assert set(migu.covered) == {"w_up", "w_down"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _snapshot(model)
    x, ids = _expert_batch()
    model(x, ids).pow(2).mean().backward()
    masks = migu.apply_()
    opt.step()
    assert masks["w_up"].shape == (3, 12) and masks["w_down"].shape == (3, 8)
    for name, out_dim in (("w_up", 1), ("w_down", 2)):
        keep = masks[name]
        assert keep.sum(dim=1).tolist() == [num_kept_rows(keep.shape[1], 0.7)] * 3
        changed = _changed_rows(model.get_parameter(name).detach(), before[name], out_dim)
        assert not changed[~keep].any()
        assert changed[keep].all()
    bias_changed = model.b_up.detach() != before["b_up"]
    assert not bias_changed[~masks["w_up"]].any()
    assert bias_changed[masks["w_up"]].all()


def test_expert_magnitudes_match_loop_oracle() -> None:
    torch.manual_seed(6)
    model = TinyExperts()
    migu = MIGU(model)
    x, ids = _expert_batch()
    model(x, ids)
    with torch.no_grad():
        expected = []
        for e in range(3):
            h = x[ids == e] @ model.w_up[e].T + model.b_up[e]  # [n_e, F]
            expected.append((h.abs() / h.abs().sum(1, keepdim=True)).mean(0))
    torch.testing.assert_close(migu.magnitudes()["w_up"], torch.stack(expected))


def test_expert_token_mask_and_per_expert_batches() -> None:
    torch.manual_seed(12)
    model = TinyExperts()
    migu = MIGU(model, norm="raw")
    x, ids = _expert_batch()
    real = torch.rand(len(x)) > 0.3
    with migu.token_mask(real):
        model(x, ids)
    with torch.no_grad():
        expected = torch.stack(
            [
                (x[(ids == e) & real] @ model.w_up[e].T + model.b_up[e]).abs().mean(0)
                for e in range(3)
            ]
        )
    torch.testing.assert_close(migu.magnitudes()["w_up"], expected)
    # per-expert batches [E, C, F_out] fed by hand through the returned record function
    extra = nn.Parameter(torch.randn(3, 4, 5))
    record = migu.register_expert_weight(extra, out_dim=2, name="extra")
    h = torch.randn(3, 7, 5)
    record(h)
    torch.testing.assert_close(migu.magnitudes()["extra"], h.abs().mean(1))


def test_register_expert_weight_with_capture_fn() -> None:
    torch.manual_seed(7)

    class PlainExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 10, 8))  # [E, F_out, D_in]

        def forward(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nd,nfd->nf", x, self.w[expert_ids])

    model = PlainExperts()
    head = nn.Linear(10, 1)
    wrapper = nn.Sequential()
    wrapper.experts = model
    wrapper.head = head
    migu = MIGU(wrapper, targets=["head"])
    migu.register_expert_weight(
        model.w, out_dim=1, module=model, capture_fn=lambda m, args, out: (out, args[1])
    )
    assert migu.covered == ["head", "experts.w"]
    x, ids = _expert_batch(30, 8, 2)
    head(model(x, ids)).sum().backward()
    keep = migu.apply_()["experts.w"]
    assert keep.sum(dim=1).tolist() == [num_kept_rows(10, 0.7)] * 2
    assert (model.w.grad[~keep] == 0).all()
    assert (model.w.grad[keep] != 0).any(dim=1).all()


def test_random_mask_same_count_and_seeded() -> None:
    torch.manual_seed(8)
    model = TinyMLP()
    draws = []
    for _ in range(2):
        ctrl = RandomMask(model, ratio=0.7, seed=123)
        model(torch.randn(2, 3, 8)).sum().backward()
        draws.append(ctrl.apply_())
        ctrl.remove()
        model.zero_grad()
    for name in ("fc1", "fc2"):
        keep = draws[0][name]
        assert int(keep.sum()) == num_kept_rows(len(keep), 0.7)
        assert torch.equal(keep, draws[1][name])
    # grads outside the random rows are zero
    ctrl = RandomMask(model, ratio=0.7, seed=5)
    model(torch.randn(2, 3, 8)).sum().backward()
    keep = ctrl.apply_()["fc1"]
    assert (model.fc1.weight.grad[~keep] == 0).all()


def test_random_mask_expert_counts() -> None:
    model = TinyExperts()
    ctrl = RandomMask(model, ratio=0.5, seed=0)
    x, ids = _expert_batch()
    model(x, ids).sum().backward()
    masks = ctrl.apply_()
    assert masks["w_up"].sum(dim=1).tolist() == [num_kept_rows(12, 0.5)] * 3


def test_freeze_keeps_masked_rows_still_under_adamw() -> None:
    torch.manual_seed(9)

    def run(freeze: bool) -> list[bool]:
        torch.manual_seed(10)
        model = TinyMLP()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        migu = MIGU(model, freeze_masked_rows=freeze, optimizer=opt if freeze else None)
        migu.enabled = False  # first step unmasked: builds Adam moments for every row
        moved = []
        for step in range(4):
            migu.enabled = step > 0
            before = _snapshot(model)
            model(torch.randn(2, 4, 8)).pow(2).mean().backward()
            masks = migu.apply_()
            opt.step()
            opt.zero_grad()
            for name, keep in masks.items():
                for suffix in ("weight", "bias"):
                    key = f"{name}.{suffix}"
                    changed = _changed_rows(model.get_parameter(key).detach(), before[key])
                    moved.append(bool(changed[~keep].any()))
        return moved

    assert not any(run(freeze=True))
    assert all(run(freeze=False))  # weight decay and Adam moments move masked rows


def test_freeze_with_manual_restore() -> None:
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    migu = MIGU(model, freeze_masked_rows=True)
    before = _snapshot(model)
    model(torch.randn(2, 4, 8)).sum().backward()
    keep = migu.apply_()["fc1"]
    opt.step()
    migu.restore_()
    assert torch.equal(model.fc1.weight.detach()[~keep], before["fc1.weight"][~keep])


@pytest.mark.parametrize("mask_first", [False, True])
def test_grad_scaler_pattern(mask_first: bool) -> None:
    torch.manual_seed(11)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    migu = MIGU(model)
    before = _snapshot(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 4, 8)).float().pow(2).mean()
    scaler.scale(loss).backward()
    if mask_first:  # masking the scaled gradient: zeros stay zeros through unscale_
        masks = migu.apply_()
        scaler.unscale_(opt)
    else:
        scaler.unscale_(opt)
        masks = migu.apply_()
    scaler.step(opt)
    scaler.update()
    for name, keep in masks.items():
        changed = _changed_rows(
            model.get_parameter(f"{name}.weight").detach(), before[f"{name}.weight"]
        )
        assert not changed[~keep].any()
        assert changed[keep].all()


def test_disabled_and_no_grad_do_not_mask_or_accumulate() -> None:
    model = TinyMLP()
    migu = MIGU(model, enabled=False)
    model(torch.randn(2, 3, 8)).sum().backward()
    grad = model.fc1.weight.grad.clone()
    assert migu.apply_() == {}
    assert torch.equal(model.fc1.weight.grad, grad)
    migu.enabled = True
    with torch.no_grad():
        model(torch.randn(2, 3, 8))  # evaluation: ignored
    assert migu.magnitudes() == {}


def test_targets_by_glob_and_predicate() -> None:
    model = TinyMLP()
    assert MIGU(model, targets=["fc2"]).covered == ["fc2"]
    assert MIGU(model, targets=lambda name, m: m.out_features == 16).covered == ["fc1"]
    with pytest.raises(ValueError, match="found no layer"):
        MIGU(model, targets=["nothing*"])


def test_arguments_after_ratio_are_keyword_only() -> None:
    model = TinyMLP()
    with pytest.raises(TypeError):
        MIGU(model, 0.7, ["fc2"])  # type: ignore[misc]
    with pytest.raises(TypeError):
        RandomMask(model, 0.7, 3)  # type: ignore[misc]
    assert MIGU(model, 0.7, targets=["fc2"]).covered == ["fc2"]
    assert RandomMask(model, 0.7, seed=3, targets=["fc1"]).covered == ["fc1"]


def test_errors_name_the_problem() -> None:
    model = TinyMLP()
    with pytest.raises(ValueError, match="ratio"):
        MIGU(model, ratio=1.5)
    with pytest.raises(ValueError, match="norm"):
        MIGU(model, norm="l2")
    migu = MIGU(model)
    migu.set_token_mask(torch.ones(3, 3))
    with pytest.raises(ValueError, match="token mask has 9 tokens"):
        model(torch.randn(2, 3, 8))


# ----------------------------------------------------------------------------------------------
# rmoe models: the experts' built-in probes
# ----------------------------------------------------------------------------------------------
def _rmoe_model(tokenizer, backend: str, **overrides):
    from .conftest import make_model

    return make_model(tokenizer, experts_backend=backend, **overrides)


def _expert_oracle(model, ids, mask) -> tuple[dict[str, torch.Tensor], int]:
    """Per-expert mean L1-normalised |output| of every expert weight, recomputed from the
    (x, idx, token_index) each Experts call received; padding excluded by the token mask.
    Also returns the number of Experts calls that had a token_index (GW-MoE broadcasts)."""
    from rmoe.modeling.experts import Experts, swiglu_parts

    calls: dict[str, list] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, Experts):

            def hook(m, args, kwargs, out, name=name):
                x, idx = args[0], args[1]
                calls.setdefault(name, []).append((x.detach(), idx, kwargs.get("token_index")))

            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    flat_mask = mask.reshape(-1).float()
    expected = {}
    with torch.no_grad():
        for name, recs in calls.items():
            mod = model.get_submodule(name)
            f, d = mod.gate_proj.shape[1], mod.down_proj.shape[1]
            acc = {"g": torch.zeros(4, f), "u": torch.zeros(4, f), "d": torch.zeros(4, d)}
            count = torch.zeros(4)
            for x, idx, token_index in recs:
                rows = torch.arange(len(x)) if token_index is None else token_index
                for r in range(len(x)):
                    wgt = flat_mask[rows[r]]
                    for e in idx[r].tolist():
                        parts = swiglu_parts(
                            x[r : r + 1], mod.gate_proj[e], mod.up_proj[e], mod.down_proj[e]
                        )
                        for key, h in zip("gud", parts):
                            a = h[0].abs()
                            acc[key][e] += wgt * a / a.sum()
                        count[e] += wgt
            for key, attr in zip("gud", ("gate_proj", "up_proj", "down_proj")):
                expected[f"{name}.{attr}"] = acc[key] / count.clamp_min(1).unsqueeze(1)
    broadcasts = sum(r[2] is not None for recs in calls.values() for r in recs)
    return expected, broadcasts


@pytest.mark.parametrize("backend", ["loop", "sorted", "grouped_mm"])
@pytest.mark.parametrize("gw", [False, True])
def test_rmoe_expert_magnitudes_match_recomputation(tokenizer, backend: str, gw: bool) -> None:
    model = _rmoe_model(tokenizer, backend, **({"gw_entropy_threshold": 0.5} if gw else {}))
    model.train()
    migu = MIGU(model, ratio=0.7)
    expert_names = [n for n in migu.covered if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    expert_names = [n for n in expert_names if ".experts." in n]
    assert len(expert_names) == 2 * 3
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0
    migu.set_token_mask(mask)
    expected, broadcasts = _expert_oracle(model, ids, mask)  # one forward feeds MIGU too
    got = migu.magnitudes()
    for name in expert_names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # GW-MoE's broadcast call ran (and its rows were weighted by their own token's mask)
    assert (broadcasts > 0) == gw


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast"])
def test_rmoe_one_step_changes_only_kept_expert_rows(tokenizer, precision: str) -> None:
    model = _rmoe_model(tokenizer, "auto")
    migu = MIGU(model, ratio=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = _snapshot(model)
    ids = torch.randint(0, 50, (4, 16))
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16-autocast"
        else contextlib.nullcontext()
    )
    with ctx:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(m.shape[0] == 4 for n, m in migu.magnitudes().items() if ".experts." in n)
    masks = migu.apply_()
    opt.step()
    experts = [n for n in masks if ".experts." in n]
    assert len(experts) == 6
    for name in experts:
        keep = masks[name]
        assert keep.shape == (4, model.get_parameter(name).shape[1])
        changed = _changed_rows(model.get_parameter(name).detach(), before[name], out_dim=1)
        assert not changed[~keep].any(), name
        assert changed.any(), name


def test_weights_without_a_statistic_are_left_unmasked_with_one_warning(caplog) -> None:
    class Functional(TinyMLP):
        """fc2's weight is used through F.linear, so its module's forward hook never runs."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(F.gelu(self.fc1(x)), self.fc2.weight, self.fc2.bias)

    torch.manual_seed(0)
    model = Functional()
    migu = MIGU(model, ratio=0.7)
    x = torch.randn(4, 8)
    with caplog.at_level("WARNING", logger="rmoe.continual.migu"):
        for _ in range(2):
            model(x).pow(2).mean().backward()
            masks = migu.apply_()
            model.zero_grad()
    assert set(masks) == {"fc1"}  # fc2 had a gradient but no statistic: left unmasked
    warnings = [r for r in caplog.records if "no output statistic" in r.getMessage()]
    assert len(warnings) == 1 and "fc2" in warnings[0].getMessage()


@pytest.mark.slow
def test_migu_attached_before_torch_compile_sees_the_same_statistics(tokenizer) -> None:
    model = _rmoe_model(tokenizer, "auto")
    migu = MIGU(model, ratio=0.7)
    ids = torch.randint(0, 50, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {k: v.clone() for k, v in migu.magnitudes().items()}
    migu.apply_()
    model.zero_grad()
    try:
        compiled = torch.compile(model, backend="eager")
        compiled(input_ids=ids, labels=ids).loss.backward()
        got = migu.magnitudes()
    finally:
        torch._dynamo.reset()
    assert set(got) == set(eager) and any(".experts." in k for k in got)
    for name in eager:
        torch.testing.assert_close(got[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)
