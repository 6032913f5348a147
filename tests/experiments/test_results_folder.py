"""Committed per-run results: finished runs are exported; a rerun from an empty experiment
folder (a fresh clone that has only the results folder) skips exactly the runs found there."""

from __future__ import annotations

import copy
import json
import shutil

from rmoe.experiments import execute_runs, plan_runs, run_dir_of, spec_from_dict
from rmoe.experiments.evaluate import RESULTS_FILE, checkpoint_step
from rmoe.experiments.runner import RESULT_FILES, import_results
from rmoe.experiments.spec import quick_spec


def _spec(spec_dict, results, **over):
    spec_dict = copy.deepcopy(spec_dict)
    spec_dict["arms"] = [{"name": "smoe", "router": "linear"}]
    spec_dict["seeds"] = [0, 1]
    spec_dict["results"] = str(results)
    spec_dict["overrides"]["train"].update(over)
    return spec_from_dict(spec_dict)


def test_rerun_on_a_fresh_folder_skips_exactly_the_committed_runs(spec_dict, tmp_path):
    results = tmp_path / "repo" / "experiments" / "results" / "tiny"
    spec = _spec(spec_dict, results)
    runs = plan_runs(spec)
    first = execute_runs(runs, tmp_path / "exp1", spec.eval, 1, 1, results_dir=spec.results)
    assert [o.action for o in first] == ["trained", "trained"]
    for run in runs:
        exported = sorted(p.name for p in (results / run.run_id).iterdir())
        assert exported == sorted(RESULT_FILES)  # small files only: no checkpoints
        assert not any(p.suffix == ".safetensors" for p in (results / run.run_id).rglob("*"))

    # a fresh clone: the results folder only, one run's results missing
    clone = tmp_path / "clone" / "results"
    shutil.copytree(results, clone)
    shutil.rmtree(clone / runs[1].run_id)
    out = tmp_path / "exp2"
    again = execute_runs(runs, out, spec.eval, 1, 1, results_dir=clone)
    assert [o.action for o in again] == ["imported", "trained"]
    assert checkpoint_step(run_dir_of(out, runs[0])) == 0  # nothing was trained for it
    a = json.loads((results / runs[0].run_id / RESULTS_FILE).read_text())
    b = json.loads((run_dir_of(out, runs[0]) / RESULTS_FILE).read_text())
    assert a == b
    assert (clone / runs[1].run_id / RESULTS_FILE).is_file()  # the new run is exported
    third = execute_runs(runs, out, spec.eval, 1, 1, results_dir=clone)
    assert [o.action for o in third] == ["skipped", "skipped"]


def test_results_for_another_config_are_not_imported(spec_dict, tmp_path):
    results = tmp_path / "results"
    spec = _spec(spec_dict, results)
    run = plan_runs(spec)[0]
    execute_runs([run], tmp_path / "a", spec.eval, 1, 1, results_dir=results)
    changed = plan_runs(_spec(spec_dict, results, max_steps=5))[0]
    assert changed.run_id == run.run_id
    assert not import_results(changed, tmp_path / "b" / "x", results)
    same_but_threads = plan_runs(_spec(spec_dict, results, threads=2))[0]
    assert import_results(same_but_threads, tmp_path / "c" / "x", results)


def test_quick_spec_never_writes_committed_results(spec_dict, tmp_path):
    spec = _spec(spec_dict, tmp_path / "results")
    assert spec.results and quick_spec(spec).results is None


def test_a_changed_config_sets_the_old_run_aside(spec_dict, tmp_path):
    from rmoe.experiments.runner import set_aside_if_changed, write_arm_config

    spec = _spec(spec_dict, tmp_path / "results")
    run = plan_runs(spec)[0]
    d = run_dir_of(tmp_path / "exp", run)
    assert set_aside_if_changed(run, d) is None  # nothing there yet
    write_arm_config(run, d, threads=3)
    (d / RESULTS_FILE).write_text("{}")
    assert set_aside_if_changed(run, d) is None  # same config (threads aside)
    changed = plan_runs(_spec(spec_dict, tmp_path / "results", max_steps=5))[0]
    stale = set_aside_if_changed(changed, d)
    assert stale is not None and stale.name == f"{run.run_id}.stale-1"
    assert (stale / RESULTS_FILE).is_file() and not d.exists()


def test_results_written_before_a_field_existed_still_import(spec_dict, tmp_path):
    """An `arm.yaml` committed before a config field was added (here `train.trainable`, whose
    default trains everything) matches a run that leaves the field at its default; a run
    that sets it otherwise does not."""
    import yaml

    results = tmp_path / "results"
    spec = _spec(spec_dict, results)
    run = plan_runs(spec)[0]
    execute_runs([run], tmp_path / "a", spec.eval, 1, 1, results_dir=results)
    saved = results / run.run_id / "arm.yaml"
    cfg = yaml.safe_load(saved.read_text())
    del cfg["train"]["trainable"]  # as an older rmoe wrote it
    saved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert import_results(run, tmp_path / "b" / "x", results)
    frozen = plan_runs(_spec(spec_dict, results, trainable="router"))[0]
    assert frozen.run_id == run.run_id
    assert not import_results(frozen, tmp_path / "c" / "x", results)
