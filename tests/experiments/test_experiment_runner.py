"""Runs: states, skip-when-finished, resume-when-interrupted, and the end-to-end command."""

from __future__ import annotations

import json
import signal
import time

import pytest
import yaml

from rmoe.experiments import execute_runs, plan_runs, run_dir_of, run_state, spec_from_dict
from rmoe.experiments.evaluate import RESULTS_FILE, checkpoint_step, read_metrics
from rmoe.training import train


def _one_arm(spec_dict):
    spec_dict["arms"] = [{"name": "rmoe", "router": "recurrent"}]
    spec_dict["reference"] = None
    spec = spec_from_dict(spec_dict)
    return spec, plan_runs(spec)[0]


def test_run_states(spec_dict, tmp_path):
    spec, run = _one_arm(spec_dict)
    out = tmp_path / "exp"
    d = run_dir_of(out, run)
    assert run_state(run, d) == "new"

    def stop_at_2(step, loss):  # Ctrl-C during step 2: the trainer finishes it and saves
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    res = train(run.config, d, progress=False, on_step=stop_at_2)
    assert res.status == "interrupted" and checkpoint_step(d) == 2
    assert run_state(run, d) == "resume"
    train(run.config, d, resume=True, progress=False)
    assert checkpoint_step(d) == run.max_steps
    assert run_state(run, d) == "evaluate"
    (d / RESULTS_FILE).write_text("{}")
    assert run_state(run, d) == "done"


def test_time_limited_run_counts_as_trained(spec_dict, tmp_path):
    spec, run = _one_arm(spec_dict)
    d = run_dir_of(tmp_path, run)

    def stop_at_1(step, loss):
        if step == 1:
            raise KeyboardInterrupt

    train(run.config, d, progress=False, on_step=stop_at_1)
    (d / "train_status.json").write_text(json.dumps({"status": "time_limit", "step": 1}))
    assert run_state(run, d) == "evaluate"


@pytest.mark.slow
def test_interrupted_run_resumes_and_finished_run_is_skipped(spec_dict, tmp_path):
    spec, run = _one_arm(spec_dict)
    out = tmp_path / "exp"
    d = run_dir_of(out, run)

    def stop_at_2(step, loss):  # Ctrl-C during step 2: the trainer finishes it and saves
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    train(run.config, d, progress=False, on_step=stop_at_2)  # as if killed after step 2
    [outcome] = execute_runs([run], out, spec.eval, workers=1, threads=1)
    assert outcome.action == "resumed", outcome.message
    assert checkpoint_step(d) == run.max_steps == 4
    steps = [r["step"] for r in read_metrics(d)["train"]]
    assert steps == [1, 2, 3, 4]
    res = json.loads((d / RESULTS_FILE).read_text())
    assert res["step"] == 4 and set(res["splits"]) == {"valid", "test"}
    assert len(res["splits"]["test"]["batch_loss_sum"]) == spec.eval.batches
    assert res["routing"]["tokens"] == 128 and len(res["routing"]["layer_inner_balance"]) == 2
    assert run_state(run, d) == "done"

    t0 = time.perf_counter()
    [again] = execute_runs([run], out, spec.eval, workers=1, threads=1)
    assert again.action == "skipped"
    assert time.perf_counter() - t0 < 5
    assert checkpoint_step(d) == 4


@pytest.mark.slow
def test_experiment_command_end_to_end(spec_dict, tmp_path, capsys):
    from rmoe.cli.main import main

    spec_dict["budget"] = {"flops_reference": "rmoe"}
    spec_dict["arms"].append({"name": "smoe-flops", "router": "linear", "match": "flops"})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    out = tmp_path / "exp"
    assert main(["experiment", str(path), "--out", str(out), "--workers", "3"]) == 0
    printed = capsys.readouterr().out
    assert "[trained] rmoe-L2-s0" in printed and "summary:" in printed
    for name in (
        "summary.md",
        "results.json",
        "loss_curves.png",
        "bpb_vs_depth.png",
        "routing.png",
    ):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 100
    results = json.loads((out / "results.json").read_text())
    assert {a["arm"] for a in results["arms"]} == {"smoe", "rmoe", "smoe-flops"}
    assert {(p["arm"], p["split"]) for p in results["paired"]} == {
        (a, s) for a in ("rmoe", "smoe-flops") for s in ("valid", "test")
    }
    for a in results["arms"]:
        assert a["test_bpb_mean"] > 0 and a["inner_balance_mean"] >= 1
    summary = (out / "summary.md").read_text()
    assert "Paired differences to `smoe`" in summary

    # a rerun skips every finished run and rewrites the report
    assert main(["experiment", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("[skipped]") == 3


@pytest.mark.slow
def test_gpu_spec_quick_smoke_on_cpu(tmp_path, capsys):
    """The shipped GPU spec, shrunk by --quick, runs end to end on a CPU (bf16 autocast, the
    FLOP-matched arm, several concurrent runs), so the first GPU run does not fail on a typo."""
    from rmoe.cli.main import main

    out = tmp_path / "gpu-quick"
    assert (
        main(
            [
                "experiment",
                "gpu-10min",
                "--quick",
                "--out",
                str(out),
                "--only",
                "smoe-flops",
                "--workers",
                "1",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    # one arm (the FLOP-matched one, whose budget is computed from the RMoE reference) keeps CI
    # fast; the whole quick spec runs with `rmoe experiment gpu-10min --quick`
    done = {r["arm"] for r in results["runs"] if r.get("results")}
    assert done == {"smoe-flops"}
    assert (out / "summary.md").is_file()
