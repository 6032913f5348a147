"""The profile and fine-grained suites run in --quick mode and produce their tables (structure
only; speed is never asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import finegrained, profile, step
from rmoe.cli.bench import SUITES

FAST = ["--quick", "--repeats", "1", "--warmup", "0", "--device", "cpu"]


def test_categorize_op_names():
    assert profile.categorize("aten::mm") == "GEMM"
    assert profile.categorize("aten::_grouped_mm") == "GEMM"
    assert (
        profile.categorize("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention core"
    )
    assert profile.categorize("aten::nll_loss_forward") == "loss"
    assert profile.categorize("aten::topk") == "routing + permutation"
    assert profile.categorize("aten::index_add_") == "routing + permutation"
    assert profile.categorize("aten::copy_") == "memory/layout"
    assert profile.categorize("aten::silu") == "elementwise/norms"
    assert (
        profile.categorize("autograd::engine::evaluate_function: MmBackward0") == "autograd engine"
    )
    assert profile.categorize("step::forward") == "python/framework"


def test_ceiling_size_is_a_multiple_of_64():
    assert profile.ceiling_size(4096, 192, 384) % 64 == 0
    assert profile.ceiling_size(1, 1, 1) == 64


def test_profile_quick(tmp_path):
    assert profile.main([*FAST, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["machine"]["cpu_cores"] and data["machine"]["torch"]
    (res,) = data["results"]
    shares = res["profile"]["categories_share"]
    assert set(shares) == set(profile.CATEGORIES)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert res["step_flops"] > 0 and res["dense_flops_per_s"] > 0 and res["ceiling_fraction"] > 0
    assert {"for-loop", "foreach", "fused"} >= set(res["optimizer"]["rows"]) >= {"for-loop"}
    assert res["optimizer"]["auto_picks"] == "fused"
    assert "MET" in data["verdicts"]["quick"]
    md = (tmp_path / "profile.md").read_text()
    for text in ("of ceiling", "| GEMM |", "routing + permutation", "AdamW implementations"):
        assert text in md


def test_finegrained_quick_layer(tmp_path):
    assert finegrained.main([*FAST, "--no-step", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "finegrained.json").read_text())
    assert [r["shape"]["E"] for r in data["layer"]] == list(finegrained.QUICK_EXPERTS)
    for res in data["layer"]:
        k, f = res["shape"]["K"], res["shape"]["F"]
        assert k * f == 2 * data["settings"]["width"]  # fixed active compute
        impls = {r["impl"] for r in res["rows"]}
        assert "hf[eager]" in impls and any(i.startswith("rmoe[") for i in impls)
    assert set(data["growth_vs_first_E"]["layer"]["hf[eager]"]) == {"8", "64"}
    assert "total_ms" in data["rmoe_layer_hotspots"]
    md = (tmp_path / "finegrained.md").read_text()
    assert "× hf eager" in md and "what grows with E" in md


def test_finegrained_step_rows():
    s = step.StepShape(32, 1, 1, 8, 2, 32, 1, 16)
    res = finegrained.bench_step(s, torch.device("cpu"), torch.float32, 0, 1)
    names = [r["variant"] for r in res["rows"]]
    assert names[0] == "rmoe SMoE" and "Mixtral[eager]" in names
    assert "speedup_vs_Mixtral[eager]" in res["rows"][0]


def test_saved_activations_shrink_with_checkpointing():
    s = step.StepShape(32, 2, 2, 4, 2, 32, 2, 16)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq))
    torch.manual_seed(0)
    plain = step.saved_activation_bytes(step.build_rmoe(s, "linear"), ids)
    ckpt = step.build_rmoe(s, "linear", activation_checkpointing="layer")
    assert 0 < step.saved_activation_bytes(ckpt, ids) < plain


def test_new_suites_are_registered():
    assert {"profile", "finegrained"} <= set(SUITES)
