"""Figure writers and the HTML/JSON report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rmoe.analysis import experts as X
from rmoe.analysis import plots as P
from rmoe.analysis import routing as R
from rmoe.analysis.report import to_jsonable, write_report


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_report_renders_every_figure(tmp_path: Path):
    rng = np.random.default_rng(0)
    e, n, layers = 8, 200, 3
    probs = [_softmax(rng.normal(size=(n, e)) * (i + 1)) for i in range(layers)]
    topk = [np.argsort(-p, axis=1)[:, :2] for p in probs]
    ent = [R.router_entropy(p) for p in probs]
    summaries = [R.entropy_summary(h, e) for h in ent]
    loads = [R.expert_load(t, e) for t in topk]
    mi = R.binned_mutual_information_matrix(probs)
    ranks = X.norm_score_rank_counts(rng.uniform(size=(n, e)), probs[0])

    outside = tmp_path / "elsewhere"  # figures outside out_dir get copied in
    out = tmp_path / "report"
    figs = [
        (
            P.plot_heatmap(
                out / "mi.png",
                mi,
                "binned MI",
                second=mi.T,
                second_title="copy",
                annotate=True,
                labels=[f"L{i}" for i in range(layers)],
            ),
            "Cross-layer MI",
            "Higher off-diagonal values mean more shared routing information.",
        ),
        (P.plot_entropy_histograms(out / "entropy.png", ent, e), "Entropy", "Flat router."),
        (
            P.plot_entropy_histograms(outside / "entropy2.png", summaries, e, second=ent),
            "Entropy (two models)",
            "Overlay.",
        ),
        (P.plot_load_bars(out / "sub" / "load.png", [s.counts for s in loads]), "Load", "Bars."),
        (P.plot_rank_counts(outside / "ranks.png", [ranks, ranks]), "Ranks", "<diagonal> & co"),
        (P.plot_rank_counts(out / "rank1.png", torch.from_numpy(ranks)), "Rank", "one"),
    ]
    metrics = {
        "layers": [R.routing_layer_metrics(p, t) for p, t in zip(probs, topk)],
        "mi": mi,
        "load": loads[0],
        "nan": float("nan"),
        "tensor": torch.ones(2),
        "np_scalar": np.float32(1.5),
    }
    report = write_report(out, metrics, figs)

    assert report == out / "report.html"
    data = json.loads((out / "metrics.json").read_text())
    assert data["nan"] is None and data["np_scalar"] == 1.5 and data["tensor"] == [1.0, 1.0]
    assert len(data["mi"]) == layers
    text = report.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == len(figs)
    for src in srcs:
        assert (out / src).is_file(), src
    for png, title, _ in figs:
        assert Path(png).is_file() and Path(png).stat().st_size > 0
        assert title in text
    assert "&lt;diagonal&gt; &amp; co" in text  # readings are HTML-escaped
    assert "figures/" in text  # outside figures were copied


def test_report_missing_figure(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path, {}, [(tmp_path / "nope.png", "t", "r")])
    with pytest.raises(ValueError, match="png_path, title"):
        write_report(tmp_path, {}, [("a.png", "t")])  # type: ignore[list-item]


def test_to_jsonable_rejects_objects():
    assert to_jsonable({1: (math.inf, np.int64(3))}) == {"1": [None, 3]}
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        to_jsonable({"x": object()})


def test_new_figure_writers(tmp_path: Path):
    rng = np.random.default_rng(0)
    grid = P.plot_matrix_grid(
        tmp_path / "grid.png",
        [[rng.normal(size=(4, 4)), None, rng.normal(size=(5, 5))], [rng.normal(size=(4, 4))]],
        row_names=["A", "B"],
        col_names=["layer 0", "layer 1", "layer 2"],
        title="grid",
    )
    curves = P.plot_layer_curves(
        tmp_path / "curves.png",
        {"IB": {"IB": [1.0, 1.2, None]}, "cos": {"act": [0.1, 0.2, 0.3], "up": [0, 0, 0]}},
        second={"IB": {"IB": [1.1, 1.0, 1.3]}},
        names=("smoe", "rmoe"),
        log_panels=["IB"],
        reference={"IB": 1.0},
    )
    scatter = P.plot_scatter_grid(
        tmp_path / "pca.png",
        [[(rng.normal(size=(8, 2)), np.arange(8)), None], [(rng.normal(size=(8, 1)), None)]],
        row_names=["A", "B"],
        col_names=["l0", "l1"],
        annotate=True,
    )
    bars = P.plot_load_bars(
        tmp_path / "load.png", [np.arange(4)] * 2, second=[np.ones(4)] * 3, names=("a", "b")
    )
    for png in (grid, curves, scatter, bars):
        assert png.is_file() and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="rows is empty"):
        P.plot_matrix_grid(tmp_path / "x.png", [[None]])
    with pytest.raises(ValueError, match="row_names"):
        P.plot_matrix_grid(tmp_path / "x.png", [[np.eye(2)]], row_names=["a", "b"])
    with pytest.raises(ValueError, match="panels is empty"):
        P.plot_layer_curves(tmp_path / "x.png", {})
    with pytest.raises(ValueError, match="coords must be"):
        P.plot_scatter_grid(tmp_path / "x.png", [[(np.zeros(3), None)]])
