"""Downstream-task columns in the experiment harness (`eval: {tasks, task_limit}`), and a spec
without them reading, exporting and importing exactly as before."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from rmoe.experiments import execute_runs, load_spec, plan_runs, spec_from_dict
from rmoe.experiments.evaluate import RESULTS_FILE
from rmoe.experiments.report import write_report
from rmoe.experiments.runner import import_results, run_dir_of, write_arm_config
from rmoe.experiments.spec import EvalSpec, quick_spec

REPO = Path(__file__).resolve().parents[2]


def test_a_spec_without_tasks_reads_as_before(spec_dict):
    spec = spec_from_dict(spec_dict)
    assert spec.eval.tasks == [] and spec.eval.task_limit is None
    assert set(spec.to_dict()["eval"]) == {
        "splits", "batches", "batch_size", "routing_tokens", "bootstrap", "mi_bins",
    }  # fmt: skip
    assert quick_spec(spec).eval.tasks == []


def test_task_keys_are_validated(spec_dict):
    d = copy.deepcopy(spec_dict)
    d["eval"].update(tasks="rmoe_pydoc_mc, rmoe_pydoc_cloze", task_limit=300)
    spec = spec_from_dict(d)
    assert spec.eval.tasks == ["rmoe_pydoc_mc", "rmoe_pydoc_cloze"]
    assert spec.to_dict()["eval"]["task_limit"] == 300
    assert quick_spec(spec).eval.task_limit == 8
    for bad, message in (({"task_limit": 0}, "task_limit"), ({"tasks": [""]}, "eval.tasks")):
        d = copy.deepcopy(spec_dict)
        d["eval"].update({"tasks": ["rmoe_pydoc_mc"], **bad})
        with pytest.raises(ValueError, match=message):
            spec_from_dict(d)
    d = copy.deepcopy(spec_dict)
    d["eval"]["task_limt"] = 3
    with pytest.raises(ValueError, match="nearest: 'task_limit'"):
        spec_from_dict(d)


@pytest.mark.parametrize("name", ["cpu-study-a", "cpu-study-b"])
def test_committed_studies_still_import_as_finished(name, tmp_path):
    results = REPO / "experiments" / "results" / name
    if not results.is_dir():
        pytest.skip(f"no committed results for {name}")
    runs = [r for r in plan_runs(load_spec(name)) if (results / r.run_id / RESULTS_FILE).is_file()]
    assert runs
    for run in runs:
        assert import_results(run, tmp_path / "imported" / run.run_id, results), run.run_id
        write_arm_config(run, tmp_path / "written" / run.run_id)
        saved = yaml.safe_load((results / run.run_id / "arm.yaml").read_text())
        mine = yaml.safe_load((tmp_path / "written" / run.run_id / "arm.yaml").read_text())
        for cfg in (saved, mine):
            cfg["train"].pop("threads", None)
        assert mine == saved, run.run_id


@pytest.mark.slow  # trains and evaluates one tiny arm in subprocesses (~10-25 s)
def test_task_accuracy_columns_end_to_end(spec_dict, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RMOE_LM_EVAL_DIR", str(tmp_path / "lm_eval_tasks"))
    d = copy.deepcopy(spec_dict)
    d["arms"] = d["arms"][:1]
    d["eval"].update(tasks=["rmoe_pydoc_mc"], task_limit=4)
    spec = spec_from_dict(d)
    runs = plan_runs(spec)
    out = tmp_path / "exp"
    outcomes = execute_runs(runs, out, spec.eval, workers=1, threads=1)
    assert [o.action for o in outcomes] == ["trained"], outcomes[0].message
    arm = json.loads((run_dir_of(out, runs[0]) / RESULTS_FILE).read_text())
    assert 0 <= arm["tasks"]["rmoe_pydoc_mc"]["acc"] <= 1 and arm["task_limit"] == 4
    report = write_report(spec, runs, out)
    assert report["task_metrics"] == ["acc/rmoe_pydoc_mc", "acc_norm/rmoe_pydoc_mc"]
    entry = report["arms"][0]
    assert entry["acc/rmoe_pydoc_mc_mean"] == arm["tasks"]["rmoe_pydoc_mc"]["acc"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["spec"]["eval"]["tasks"] == ["rmoe_pydoc_mc"]
    table = (out / "summary.md").read_text().split("## Results per arm")[1]
    assert "acc/rmoe_pydoc_mc" in table and "the first 4 items" in table


def test_no_task_columns_without_tasks(spec_dict):
    from rmoe.experiments.report import aggregate, summary_markdown

    spec = spec_from_dict(spec_dict)
    rows = [dict(r.summary(), results=None) for r in plan_runs(spec)]
    agg = aggregate(spec, rows)
    assert "task_metrics" not in agg
    assert "acc/" not in summary_markdown(spec, agg, rows, {}, "", [])
    assert EvalSpec(**json.loads(json.dumps(EvalSpec().__dict__))) == EvalSpec()


def _fake_results(spec, seed: int, acc: float) -> dict:
    split = {"bpb": 2.0, "loss": 1.4, "tokens_per_byte": 1.0, "batch_loss_sum": [14.0, 14.2]}
    split["batch_tokens"] = [10, 10]
    return {
        "step": 4,
        "splits": {s: dict(split) for s in spec.eval.splits},
        "tokens_per_s": 100.0,
        "routing": None,
        "tasks": {"rmoe_pydoc_mc": {"acc": acc, "acc_stderr": 0.1, "acc_norm": acc / 2}},
        "task_limit": 8,
    }


def test_task_columns_mean_and_std_over_seeds(spec_dict):
    from rmoe.experiments.report import aggregate, summary_markdown

    d = copy.deepcopy(spec_dict)
    d.update(seeds=[0, 1])
    d["eval"].update(tasks=["rmoe_pydoc_mc"], task_limit=8)
    spec = spec_from_dict(d)
    rows = []
    for r in plan_runs(spec):
        acc = 0.25 + 0.5 * r.seed + (0.1 if r.arm == "rmoe" else 0.0)
        rows.append(dict(r.summary(), results=_fake_results(spec, r.seed, acc)))
    agg = aggregate(spec, rows)
    assert agg["task_metrics"] == ["acc/rmoe_pydoc_mc", "acc_norm/rmoe_pydoc_mc"]
    smoe, rmoe = agg["arms"]
    assert smoe["acc/rmoe_pydoc_mc_mean"] == pytest.approx(0.5)
    assert rmoe["acc/rmoe_pydoc_mc_mean"] == pytest.approx(0.6)
    assert smoe["acc/rmoe_pydoc_mc_std"] == pytest.approx(0.5**0.5 / 2)  # sample std
    md = summary_markdown(spec, agg, rows, {}, "", [])
    table = md.split("## Results per arm")[1].split("##")[0]
    assert "| acc/rmoe_pydoc_mc | acc_norm/rmoe_pydoc_mc |" in table
    assert "0.500 ± 0.354" in table and "the first 8 items" in table
