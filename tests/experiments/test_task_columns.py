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
from rmoe.experiments.runner import _comparable, import_results, run_dir_of, write_arm_config
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


@pytest.mark.parametrize("name", ["cpu-study-a", "cpu-study-b", "cpu-study-c"])
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
        # fields added since the run was written (at their defaults) do not make it stale
        assert _comparable(mine) == _comparable(saved), run.run_id


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


# ----------------------------------------------------------------------------------------------
# finished runs whose results lack the spec's tasks
# ----------------------------------------------------------------------------------------------
def test_missing_tasks_follow_the_spec():
    from rmoe.experiments.evaluate import current_task_scores, missing_tasks

    ev = EvalSpec(tasks=["rmoe_pydoc", "arc_easy"], task_limit=8)
    assert missing_tasks(None, ev) == missing_tasks({"step": 4}, ev) == ["rmoe_pydoc", "arc_easy"]
    scores = {"rmoe_pydoc_mc": {"acc": 0.3}, "rmoe_pydoc_cloze": {"acc": 0.1}}
    tag = {"tasks": scores, "task_limit": 8, "tasks_requested": ["rmoe_pydoc"]}
    assert missing_tasks(tag, ev) == ["arc_easy"]  # a tag's scores are under its tasks' names
    assert current_task_scores(tag, ev) == scores
    other_limit = {**tag, "task_limit": 300}
    assert missing_tasks(other_limit, ev) == ev.tasks and current_task_scores(other_limit, ev) == {}
    before = {"tasks": {"arc_easy": {"acc": 0.4}}, "task_limit": 8}  # no tasks_requested yet
    assert missing_tasks(before, ev) == ["rmoe_pydoc"]
    assert missing_tasks(tag, EvalSpec()) == [] and current_task_scores(tag, EvalSpec()) == {}


def _commit_results(spec, run, folder: Path, tasks: dict | None = None) -> dict:
    """A finished run's small files (arm.yaml, arm_results.json) in `folder`; the results."""
    write_arm_config(run, folder)
    res = _fake_results(spec, run.seed, 0.5)
    del res["tasks"], res["task_limit"]
    res["step"] = run.max_steps
    if tasks is not None:
        res.update(tasks=tasks, task_limit=4)
    (folder / RESULTS_FILE).write_text(json.dumps(res))
    return res


def test_imported_runs_name_the_task_scores_that_need_their_model(spec_dict, tmp_path, caplog):
    import dataclasses
    import logging

    from rmoe.experiments.evaluate import model_present

    spec = spec_from_dict(spec_dict)
    runs = plan_runs(spec)
    results = tmp_path / "results"
    committed = {r.run_id: _commit_results(spec, r, results / r.run_id) for r in runs}
    # without eval.tasks: imported, then skipped, silently, as before
    plain = tmp_path / "plain"
    assert [o.action for o in execute_runs(runs, plain, spec.eval, results_dir=results)] == [
        "imported",
        "imported",
    ]
    again = execute_runs(runs, plain, spec.eval, results_dir=results)
    assert [(o.action, o.message) for o in again] == [("skipped", ""), ("skipped", "")]
    assert "task_missing" not in write_report(spec, runs, plain)
    assert "Task scores missing" not in (plain / "summary.md").read_text()
    # with eval.tasks: the model is not here, so the plan's log and the report say so
    ev = dataclasses.replace(spec.eval, tasks=["rmoe_pydoc_mc"], task_limit=4)
    out = tmp_path / "exp"
    with caplog.at_level(logging.WARNING, logger="rmoe.experiments.runner"):
        first = execute_runs(runs, out, ev, results_dir=results)
        second = execute_runs(runs, out, ev, results_dir=results)
    assert [o.action for o in first + second] == ["imported"] * 2 + ["skipped"] * 2
    for o in first + second:
        assert "task scores for rmoe_pydoc_mc need the model" in o.message, o
    assert caplog.text.count("need the model") == 4
    for r in runs:
        assert not model_present(run_dir_of(out, r))
        assert json.loads((run_dir_of(out, r) / RESULTS_FILE).read_text()) == committed[r.run_id]
        assert json.loads((results / r.run_id / RESULTS_FILE).read_text()) == committed[r.run_id]
    report = write_report(dataclasses.replace(spec, eval=ev), runs, out)
    assert report["task_missing"] == [
        {"run_id": r.run_id, "tasks": ["rmoe_pydoc_mc"], "model": False} for r in runs
    ]
    summary = (out / "summary.md").read_text()
    assert "Task scores missing (–) for 2 run(s) whose model is not here" in summary
    assert f"`{runs[0].run_id}` (rmoe_pydoc_mc)" in summary


class _InProcess:
    """Stands in for the runner's subprocesses: runs `python -m rmoe.experiments.evaluate ...`
    in this process and records the commands."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(self, cmd: list[str], log_path: Path, env: dict[str, str]) -> int:
        from rmoe.experiments import evaluate

        self.commands.append(cmd)
        assert cmd[1:3] == ["-m", "rmoe.experiments.evaluate"], cmd
        return evaluate.main(cmd[3:])


def test_a_finished_run_with_its_model_gets_only_the_missing_task_scores(
    spec_dict, tmp_path, monkeypatch
):
    pytest.importorskip("lm_eval")
    import torch

    from rmoe.data import build_tokenizer
    from rmoe.experiments.evaluate import model_present
    from rmoe.experiments.runner import execute_run
    from rmoe.training.checkpoint import save_checkpoint
    from rmoe.training.prepare import build_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RMOE_LM_EVAL_DIR", str(tmp_path / "lm_eval_tasks"))
    d = copy.deepcopy(spec_dict)
    d["arms"] = d["arms"][:1]
    d["eval"].update(tasks=["rmoe_pydoc_cloze", "rmoe_pydoc_mc"], task_limit=4)
    spec = spec_from_dict(d)
    (run,) = plan_runs(spec)
    out, results = tmp_path / "exp", tmp_path / "results"
    run_dir = run_dir_of(out, run)
    assert not model_present(run_dir)
    cloze = {"rmoe_pydoc_cloze": {"acc": 0.125, "acc_stderr": None, "perplexity": 9.0}}
    before = _commit_results(spec, run, run_dir, tasks=cloze)  # scored before mc was added
    tok = build_tokenizer(run.config.data.tokenizer)
    model = build_model(run.config, tok, None)
    save_checkpoint(run_dir, run.max_steps, model, tok, {"step": run.max_steps}, keep_last=1)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run.config.to_dict()))
    assert model_present(run_dir)
    threads = torch.get_num_threads()
    children = _InProcess()
    try:
        outcome = execute_run(run, out, spec.eval, 1, children, results_dir=results)
        again = execute_run(run, out, spec.eval, 1, children, results_dir=results)
    finally:
        torch.set_num_threads(threads)  # the evaluation sets the run's threads
    assert (outcome.action, again.action) == ("tasks", "skipped"), outcome.message
    assert len(children.commands) == 1 and "--tasks-only" in children.commands[0]
    after = json.loads((run_dir / RESULTS_FILE).read_text())
    assert {k: v for k, v in after.items() if not k.startswith("task")} == {
        k: v for k, v in before.items() if not k.startswith("task")
    }  # bits/byte, routing, step: unchanged
    assert after["tasks"]["rmoe_pydoc_cloze"] == cloze["rmoe_pydoc_cloze"]  # not run again
    assert 0 <= after["tasks"]["rmoe_pydoc_mc"]["acc"] <= 1 and after["task_limit"] == 4
    assert after["tasks_requested"] == ["rmoe_pydoc_cloze", "rmoe_pydoc_mc"]
    assert json.loads((results / run.run_id / RESULTS_FILE).read_text()) == after  # exported
