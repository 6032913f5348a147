"""`train.trainable`: `router` trains only the recurrent stage of a retrofitted model (its
original W_i, experts, attention, embeddings stay bit-for-bit), `router+base` also W_i,
`all` everything; an unknown choice is refused by name."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rmoe.cli.main import main
from rmoe.training.config import from_dict


@pytest.fixture
def retrofitted(micro_cfg, tmp_path):
    cfg = micro_cfg(model=dict(router_type="linear"), train=dict(max_steps=2))
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    base = tmp_path / "base"
    assert main(["train", str(path), "--out", str(base), "--no-progress"]) == 0
    model = tmp_path / "retro"
    assert main(["import", str(base), "--router", "recurrent", "--out", str(model)]) == 0
    return model, cfg


def _continue(model, cfg, tmp_path, trainable: str):
    train_yaml = yaml.safe_load((model / "train.yaml").read_text())
    train_yaml["data"] = cfg.to_dict()["data"]
    train_yaml["train"] = {**cfg.to_dict()["train"], "max_steps": 3, "trainable": trainable}
    path = tmp_path / f"cont-{trainable}.yaml"
    path.write_text(yaml.safe_dump(train_yaml))
    out = tmp_path / f"cont-{trainable}"
    argv = ["train", str(path), "--init-from", str(model), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    before = load_file(model / "model.safetensors")
    after = load_file(out / "model.safetensors")
    return {k for k in before if not torch.equal(before[k], after[k])}, set(before)


def _router_stage(name: str) -> bool:
    return "router_cell" in name or ".moe.router.proj." in name or ".moe.router.scorer." in name


def test_router_trains_only_the_recurrent_stage(retrofitted, tmp_path, capsys):
    model, cfg = retrofitted
    changed, names = _continue(model, cfg, tmp_path, "router")
    assert "train.trainable=router: training" in capsys.readouterr().out
    assert changed and all(_router_stage(n) for n in changed)
    assert any(".moe.router.scorer." in n for n in changed)  # G_i leaves zero
    assert not any(".moe.router.base." in n for n in changed)


def test_router_plus_base_also_trains_the_original_router(retrofitted, tmp_path):
    model, cfg = retrofitted
    changed, _ = _continue(model, cfg, tmp_path, "router+base")
    assert any(".moe.router.base." in n for n in changed)
    assert all(_router_stage(n) or ".moe.router.base." in n for n in changed)


def test_all_trains_everything(retrofitted, tmp_path):
    model, cfg = retrofitted
    changed, _ = _continue(model, cfg, tmp_path, "all")
    assert any(".experts." in n for n in changed) and any("embed" in n for n in changed)


def test_an_unknown_choice_is_refused():
    with pytest.raises(ValueError, match=r"train.trainable='routers'.*nearest: 'router'"):
        from_dict({"train": {"trainable": "routers"}})
