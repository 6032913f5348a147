"""The tuning protocol (setting chosen on valid, comparison reported on test) and the seed-level
comparison tables, on hand-made run results (no training)."""

from __future__ import annotations

import copy
import json
import math

import pytest

from rmoe.experiments import plan_runs, run_dir_of, spec_from_dict
from rmoe.experiments.compare import effective_splits
from rmoe.experiments.report import aggregate, load_run_results, summary_markdown, write_report

TOKENS = [32, 32]

# (family, setting) -> (valid bpb, test bpb); per seed an offset is added
# rmoe: valid prefers `b`, test would prefer `a`; smoe: valid prefers `a`, test would prefer `b`
BPB = {
    ("smoe", "a"): (1.880, 1.880),
    ("smoe", "b"): (1.890, 1.700),
    ("rmoe", "a"): (1.900, 1.800),
    ("rmoe", "b"): (1.850, 1.950),
    ("twin", "a"): (1.881, 1.8805),  # ~ smoe at `a`: equivalent
    ("twin", "b"): (1.895, 1.900),
}
OFFSET = {
    "smoe": [0.0, 0.004, -0.002],
    "rmoe": [0.001, 0.006, -0.004],
    "twin": [0.0005, 0.0035, -0.0025],
}


def _split(bpb: float) -> dict:
    # batch sums (nats) that give exactly `bpb` at one token per byte
    nats = [bpb * math.log(2) * t for t in TOKENS]
    return {
        "loss": bpb * math.log(2),
        "bpb": bpb,
        "tokens_per_byte": 1.0,
        "batch_loss_sum": nats,
        "batch_tokens": TOKENS,
    }


def _results(valid: float, test: float) -> dict:
    routing = {k: 1.0 for k in ("inner_balance", "outer_balance", "entropy", "mi_mean")}
    return {
        "step": 4,
        "splits": {"valid": _split(valid), "test": _split(test)},
        "routing": routing,
        "tokens_per_s": 100.0,
    }


def _write(out, runs, skip=()):
    for r in runs:
        if r.run_id in skip:
            continue
        valid, test = BPB[(r.family, r.setting)]
        off = OFFSET[r.family][r.seed]
        d = run_dir_of(out, r)
        d.mkdir(parents=True, exist_ok=True)
        (d / "arm_results.json").write_text(json.dumps(_results(valid + off, test + off)))


@pytest.fixture
def swept(spec_dict):
    raw = copy.deepcopy(spec_dict)
    raw["seeds"] = [0, 1, 2]
    raw["arms"] = [
        {"name": "smoe", "router": "linear", "label": "SMoE"},
        {"name": "rmoe", "router": "recurrent", "label": "RMoE"},
        {"name": "twin", "router": "linear", "label": "Twin"},
    ]
    raw["sweep"] = [{"name": "a"}, {"name": "b", "set": {"optim.lr": 1e-3}}]
    raw["compare"] = {"margin": 0.01, "alpha": 0.05}
    return spec_from_dict(raw)


def test_setting_is_chosen_on_valid_and_reported_on_test(swept, tmp_path):
    runs = plan_runs(swept)
    _write(tmp_path, runs, skip={"rmoe@a-L2-s2"})
    rows = load_run_results(tmp_path, runs)
    agg = aggregate(swept, rows)

    tuning = {t["family"]: t for t in agg["tuning"]}
    assert {f: t["chosen"] for f, t in tuning.items()} == {"smoe": "a", "rmoe": "b", "twin": "a"}
    cells = {c["setting"]: c for c in tuning["rmoe"]["settings"]}
    assert cells["a"]["n"] == 2 and cells["a"]["planned"] == 3
    assert cells["a"]["mean"] == pytest.approx(1.900 + (0.001 + 0.006) / 2)
    assert cells["b"]["mean"] == pytest.approx(1.850 + (0.001 + 0.006 - 0.004) / 3)
    assert tuning["rmoe"]["label"] == "RMoE" and tuning["rmoe"]["split"] == "valid"

    comp = {c["family"]: c for c in agg["comparisons"]}
    assert set(comp) == {"rmoe", "twin"}  # the reference is not compared with itself
    r = comp["rmoe"]
    assert (r["arm"], r["reference_arm"], r["split"]) == ("rmoe@b", "smoe@a", "test")
    assert r["seeds"] == [0, 1, 2]
    for p in r["per_seed"]:  # the chosen settings' TEST numbers
        s = p["seed"]
        assert p["bpb"] == pytest.approx(1.950 + OFFSET["rmoe"][s])
        assert p["ref_bpb"] == pytest.approx(1.880 + OFFSET["smoe"][s])
    diffs = [0.07 + a - b for a, b in zip(OFFSET["rmoe"], OFFSET["smoe"], strict=True)]
    assert r["seed_level"]["mean"] == pytest.approx(sum(diffs) / 3)
    assert r["verdict"] == "worse"
    assert r["batch_bootstrap"]["diff"] == pytest.approx(sum(diffs) / 3)
    assert comp["twin"]["verdict"] == "equivalent"
    assert comp["twin"]["seed_level"]["mean"] == pytest.approx(0.001 / 3)  # [0.001, 0, 0]

    # the batch-bootstrap table pairs each arm with the reference at the same setting
    paired = {(p["arm"], p["split"]): p for p in agg["paired"]}
    assert paired[("rmoe@a", "test")]["reference_arm"] == "smoe@a"
    assert paired[("rmoe@b", "test")]["reference_arm"] == "smoe@b"
    assert len(paired[("rmoe@a", "test")]["per_seed"]) == 2  # seed 2 of rmoe@a is missing
    assert paired[("rmoe@b", "test")]["seed_level"]["mean"] == pytest.approx(0.25 + 0.001 / 3)


def test_summary_shows_tuning_and_verdicts(swept, tmp_path):
    runs = plan_runs(swept)
    _write(tmp_path, runs)
    result = write_report(swept, runs, tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert "## Tuning (setting chosen on valid)" in md
    rmoe_line = next(ln for ln in md.splitlines() if ln.startswith("| RMoE | 2 | 1."))
    assert rmoe_line == "| RMoE | 2 | 1.9010 (3/3) | **1.8510 (3/3)** | `b` |"
    assert "## Comparisons to `smoe` on test" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| RMoE | 2 | `b` | `a` | 3 |"))
    assert "**worse**" in line
    twin = next(ln for ln in md.splitlines() if ln.startswith("| Twin | 2 | `a` | `a` |"))
    assert "**equivalent**" in twin
    assert "Margin δ = ±0.01 bits/byte, α = 0.05" in md
    assert "90% interval (TOST)" in md and "95% t-interval" in md

    saved = json.loads((tmp_path / "results.json").read_text())
    assert [c["verdict"] for c in saved["comparisons"]] == ["worse", "equivalent"]
    assert [t["chosen"] for t in saved["tuning"]] == ["a", "b", "a"]
    assert saved["comparisons"] == json.loads(json.dumps(result["comparisons"]))
    assert saved["comparisons"][0]["seed_level"]["tost_level"] == pytest.approx(0.9)


def test_without_a_sweep_comparisons_come_with_a_verdict_and_no_tuning(spec_dict, tmp_path):
    raw = copy.deepcopy(spec_dict)
    raw["seeds"] = [0, 1]
    spec = spec_from_dict(raw)
    runs = plan_runs(spec)
    for r in runs:
        d = run_dir_of(tmp_path, r)
        d.mkdir(parents=True)
        base = 1.90 if r.arm == "rmoe" else 1.80
        off = 0.002 * r.seed
        (d / "arm_results.json").write_text(json.dumps(_results(base + off, base + off)))
    rows = load_run_results(tmp_path, runs)
    agg = aggregate(spec, rows)
    assert [(t["family"], t["chosen"]) for t in agg["tuning"]] == [("smoe", ""), ("rmoe", "")]
    (comp,) = agg["comparisons"]
    assert comp["verdict"] == "worse" and comp["seed_level"]["n"] == 2
    assert comp["seed_level"]["lo"] == pytest.approx(0.1) == comp["seed_level"]["hi"]
    assert [p["seed_level"]["verdict"] for p in agg["paired"]] == ["worse", "worse"]
    md = summary_markdown(spec, agg, rows, {}, "rmoe experiment x", [])
    assert "## Tuning" not in md
    head = next(ln for ln in md.splitlines() if ln.startswith("| arm | L | seeds | per seed"))
    assert "setting" not in head
    assert "| RMoE | 2 | 2 | s0: +0.1000; s1: +0.1000 | +0.1000 |" in md
    assert "| verdict |" in md and "| worse |" in md  # the paired table's verdict column


def test_one_seed_is_inconclusive_and_unevaluated_splits_fall_back(spec_dict, tmp_path):
    raw = copy.deepcopy(spec_dict)
    raw["eval"]["splits"] = ["test"]
    spec = spec_from_dict(raw)
    assert effective_splits(spec) == ("test", "test")
    runs = plan_runs(spec)
    for r in runs:
        d = run_dir_of(tmp_path, r)
        d.mkdir(parents=True)
        res = _results(2.0, 2.0 if r.arm == "smoe" else 1.5)
        res["splits"].pop("valid")
        (d / "arm_results.json").write_text(json.dumps(res))
    agg = aggregate(spec, load_run_results(tmp_path, runs))
    (comp,) = agg["comparisons"]
    assert comp["split"] == "test" and comp["selected_on"] == "test"
    assert comp["verdict"] == "inconclusive" and comp["seed_level"]["mean"] == pytest.approx(-0.5)
    md = summary_markdown(spec, agg, load_run_results(tmp_path, runs), {}, "", [])
    assert "| 1 | s0: -0.5000 | -0.5000 | – | – | **inconclusive** |" in md
