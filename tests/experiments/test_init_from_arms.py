"""Experiment arms that start from a checkpoint (`init_from`): spec, plan, runner."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml
from tests.conftest import MICRO_MODEL

from rmoe.experiments.plan import checkpoint_model, plan_runs
from rmoe.experiments.runner import (
    execute_runs,
    run_dir_of,
    set_aside_if_changed,
    write_arm_config,
)
from rmoe.experiments.spec import CHECKPOINT_ROUTER, spec_from_dict

TINY_MODEL = {k: v for k, v in MICRO_MODEL.items() if k != "router_dim"}
TINY_MODEL.update(router_type="linear", max_position_embeddings=32)


def _save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    """A tiny linear-router model folder and its recurrent retrofit (same weights otherwise)."""
    from rmoe.data import build_tokenizer
    from rmoe.modeling.transformer import RMoEForCausalLM
    from rmoe.training.config import from_dict
    from rmoe.training.surgery import retrofit_recurrent

    tok = build_tokenizer("bytes")
    cfg = from_dict({"model": dict(TINY_MODEL)})
    config = cfg.model_config(
        vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id
    )
    linear = RMoEForCausalLM(config)
    linear.init_weights_seeded(0)
    recurrent = retrofit_recurrent(linear, seed=0, router_dim=8)
    return {
        "linear": _save(linear, tok, tmp_path / "ckpt-linear"),
        "recurrent": _save(recurrent, tok, tmp_path / "ckpt-recurrent"),
    }


def _init_spec(spec_dict: dict, checkpoints: dict[str, Path]) -> dict:
    raw = copy.deepcopy(spec_dict)
    raw["name"] = "tiny-init"
    raw["arms"] = [
        {"name": "cont-linear", "init_from": str(checkpoints["linear"])},
        {"name": "cont-rmoe", "init_from": str(checkpoints["recurrent"]), "router": "recurrent"},
    ]
    raw["reference"] = "cont-linear"
    return raw


def test_specs_without_init_from_are_unchanged(spec_dict, tmp_path):
    """No `init_from` key in the spec dict, the run summary or arm.yaml of a plain spec."""
    spec = spec_from_dict(spec_dict)
    assert all("init_from" not in a for a in spec.to_dict()["arms"])
    runs = plan_runs(spec)
    assert all(r.init_from is None and "init_from" not in r.summary() for r in runs)
    path = write_arm_config(runs[0], tmp_path / "run")
    assert "init_from" not in json.loads((tmp_path / "run" / "arm.json").read_text())
    assert "init_from" not in yaml.safe_load(path.read_text())["train"]


def test_init_from_arm_plans_the_checkpoint_model(spec_dict, checkpoints):
    spec = spec_from_dict(_init_spec(spec_dict, checkpoints))
    assert spec.arm("cont-linear").router == CHECKPOINT_ROUTER
    assert spec.to_dict()["arms"][0]["init_from"] == str(checkpoints["linear"])
    runs = {r.arm: r for r in plan_runs(spec)}
    lin, rec = runs["cont-linear"], runs["cont-rmoe"]
    assert lin.config.model["router_type"] == "linear"
    assert rec.config.model["router_type"] == "recurrent"
    assert rec.config.model["router_dim"] == 8
    assert lin.config.model["hidden_size"] == 32  # the checkpoint's width, not the base's
    assert "vocab_size" not in lin.config.model
    assert lin.run_id == "cont-linear-L2-s0" and lin.preset == {}
    assert lin.summary()["init_from"] == str(checkpoints["linear"])
    # same data, steps and seeds for both arms
    assert lin.config.data == rec.config.data and lin.max_steps == rec.max_steps
    assert lin.config.train.seed == rec.config.train.seed
    # FLOPs: the continued training only (3 x forward FLOPs/token x tokens of this run)
    assert lin.train_flops == pytest.approx(
        3 * lin.counts.forward_flops_per_token * lin.tokens_per_step * lin.max_steps
    )
    assert rec.counts.router_params > lin.counts.router_params


def test_flops_matched_init_from_arm(spec_dict, checkpoints):
    raw = _init_spec(spec_dict, checkpoints)
    raw["arms"].append(
        {"name": "lin-flops", "init_from": str(checkpoints["linear"]), "match": "flops"}
    )
    raw["budget"] = {"flops_reference": "cont-rmoe"}
    runs = {r.arm: r for r in plan_runs(spec_from_dict(raw))}
    matched, ref = runs["lin-flops"], runs["cont-rmoe"]
    assert matched.max_steps >= ref.max_steps
    assert matched.train_flops == pytest.approx(ref.train_flops, rel=0.2)


def test_init_from_errors(spec_dict, checkpoints, tmp_path):
    raw = _init_spec(spec_dict, checkpoints)
    raw["arms"][0]["router"] = "recurrent"  # a linear checkpoint
    with pytest.raises(ValueError, match="rmoe import --router recurrent"):
        plan_runs(spec_from_dict(raw))
    raw = _init_spec(spec_dict, checkpoints)
    raw["arms"][0]["init_from"] = str(tmp_path / "nowhere")
    spec = spec_from_dict(raw)  # the checkpoint may be made after the spec: checked at plan
    with pytest.raises(FileNotFoundError):
        plan_runs(spec)
    raw["arms"][0]["init_from"] = 3
    with pytest.raises(ValueError, match="init_from must be a path"):
        spec_from_dict(raw)


def test_checkpoint_model_reads_a_run_directory(checkpoints, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoints["linear"].rename(run / "checkpoints" / "step-5")
    model, vocab = checkpoint_model(run)
    assert model["router_type"] == "linear" and vocab > 0


def test_init_from_arm_trains_from_its_checkpoint(spec_dict, checkpoints, tmp_path):
    """The runner passes `--init-from`; a rerun skips the run; a changed `init_from` (the same
    architecture from another folder: the same arm.yaml) sets the old run aside."""
    spec = spec_from_dict(_init_spec(spec_dict, checkpoints))
    spec.eval.batches, spec.eval.bootstrap, spec.eval.routing_tokens = 1, 10, 64
    (run,) = plan_runs(spec, only=["cont-rmoe"])
    out = tmp_path / "exp"
    (outcome,) = execute_runs([run], out, spec.eval, workers=1, threads=1)
    assert outcome.action == "trained", outcome.message
    run_dir = run_dir_of(out, run)
    assert "--init-from" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "arm.json").read_text())["init_from"] == run.init_from
    cfg = yaml.safe_load((run_dir / "arm.yaml").read_text())
    assert cfg["model"]["router_type"] == "recurrent"
    assert (run_dir / "arm_results.json").is_file()
    (again,) = execute_runs([run], out, spec.eval, workers=1, threads=1)
    assert again.action == "skipped"
    assert set_aside_if_changed(run, run_dir) is None
    other = tmp_path / "ckpt-recurrent-copy"
    shutil.copytree(checkpoints["recurrent"], other)
    raw = _init_spec(spec_dict, checkpoints)
    raw["arms"][1]["init_from"] = str(other)
    (moved,) = plan_runs(spec_from_dict(raw), only=["cont-rmoe"])
    assert moved.config.to_dict() == run.config.to_dict()
    assert set_aside_if_changed(moved, run_dir) == run_dir.with_name(f"{run_dir.name}.stale-1")


def test_shipped_retrofit_demo_spec_loads():
    """The demo spec reads without its checkpoints (they are made by its driver script)."""
    from rmoe.experiments.spec import load_spec

    spec = load_spec("retrofit-demo")
    assert [a.init_from for a in spec.arms] == [
        "runs/retrofit-demo/models/linear",
        "runs/retrofit-demo/models/recurrent",
    ]
    assert spec.reference == "cont-linear"
