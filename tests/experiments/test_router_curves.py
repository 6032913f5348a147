"""The router-sharpness plot reads the per-layer logit std and entropy of the training logs."""

from __future__ import annotations

import json

from rmoe.experiments import spec_from_dict
from rmoe.experiments.plots import plot_router_curves


def test_router_curves_plot_from_training_logs(spec_dict, tmp_path):
    spec = spec_from_dict(spec_dict)
    rows = []
    for arm, scale in (("smoe", 0.2), ("rmoe", 0.01)):
        run_id = f"{arm}-L2-s0"
        d = tmp_path / "runs" / run_id
        d.mkdir(parents=True)
        with open(d / "metrics.jsonl", "w") as f:
            for step in (1, 10, 20):
                rec = {"step": step, "loss": 3.0, "layer_logit_std": [scale * step, scale]}
                rec["layer_entropy"] = [1.0 - 0.01 * step, 0.99]
                f.write(json.dumps(rec) + "\n")
        rows.append({"run_id": run_id, "arm": arm, "seed": 0, "label": arm})
    rows.append({"run_id": "missing-L2-s0", "arm": "smoe", "seed": 1, "label": "smoe"})
    path = plot_router_curves(tmp_path, rows, spec)
    assert path == tmp_path / "router_curves.png" and path.stat().st_size > 10_000
