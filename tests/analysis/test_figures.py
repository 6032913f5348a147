"""Every registered figure on tiny hand-built records (one and two models), and the registry."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from rmoe.analysis.pipeline import figures as FG
from rmoe.analysis.pipeline.figures import FIGURES, FigureResult, write_figures
from rmoe.analysis.pipeline.figures._common import both, layer_columns, plot_layers

_PNG = b"\x89PNG\r\n\x1a\n"
_STEMS = {
    "load": "load",
    "entropy": "entropy",
    "balance": "routing_summary",
    "mi_binned": "mi_binned",
    "mi_index": "mi_index",
    "weight_similarity": "weight_similarity",
    "neuron_avg_similarity": "neuron_avg_similarity",
    "output_grid": "output_similarity",
    "ranks": "rank_counts",
    "expert_curves": "expert_summary",
    "pca_experts": "pca_experts",
    "pca_neurons": "pca_neurons",
    "grads": "router_grads",
}


def _check(result: FigureResult | None, fig_dir, stem: str) -> None:
    assert isinstance(result, FigureResult)
    assert result.path == fig_dir / f"{stem}.png"
    assert result.path.read_bytes()[:8] == _PNG
    assert result.title and result.reading.endswith(".")


def test_registry_lists_each_figure_once_as_a_top_level_function():
    names = [spec.name for spec in FIGURES]
    assert names == list(_STEMS) and len(set(names)) == len(names)
    draws = [spec.draw for spec in FIGURES]
    assert len(set(draws)) == len(draws)
    for draw in draws:
        assert inspect.isfunction(draw) and "<locals>" not in draw.__qualname__
        assert list(inspect.signature(draw).parameters) == ["fig_dir", "models", "comparison"]


@pytest.mark.parametrize("spec", FIGURES, ids=lambda s: s.name)
def test_figure_one_model(spec, one_model, tmp_path):
    _check(spec.draw(tmp_path, one_model, None), tmp_path, _STEMS[spec.name])


@pytest.mark.parametrize("spec", FIGURES, ids=lambda s: s.name)
def test_figure_two_models(spec, two_models, comparison, tmp_path):
    result = spec.draw(tmp_path, two_models, comparison)
    _check(result, tmp_path, _STEMS[spec.name])
    if spec.name != "pca_neurons":  # the one reading without numbers
        assert "alpha " in result.reading and "beta " in result.reading


def test_figures_that_do_not_apply_return_none(record_factory, tmp_path):
    bare = record_factory("bare", with_outputs=False, with_grads=False)
    no_mi = dataclasses.replace(bare.routing, mi_binned=None, mi_index=None, mi_index_topk=None)
    bare = dataclasses.replace(bare, routing=no_mi)
    for draw in (
        FG.output_similarity_figure,
        FG.rank_counts_figure,
        FG.router_grads_figure,
        FG.mi_binned_figure,
        FG.mi_index_figure,
    ):
        assert draw(tmp_path, [bare], None) is None, draw.__name__
    assert not list(tmp_path.glob("*.png"))
    result = FG.expert_summary_figure(tmp_path, [bare], None)
    assert "activation ratio: bare n/a" in result.reading


def test_write_figures_runs_the_registry_in_order(two_models, comparison, tmp_path):
    timing: dict[str, float] = {}
    calls = []

    def progress(iterable, total=None, desc=""):
        calls.append((desc, total))
        return iterable

    written = write_figures(tmp_path, two_models, comparison, progress, timing)
    assert calls == [("figures", len(FIGURES))]
    assert [r.path.stem for r in written] == list(_STEMS.values())
    assert all(r.path.parent == tmp_path / "figures" for r in written)
    assert list(timing) == [f"figure: {spec.name}" for spec in FIGURES]


def test_figure_helpers(one_model, two_models):
    assert plot_layers(4) == [0, 1, 2, 3]
    assert plot_layers(12) == [0, 2, 4, 7, 9, 11]
    assert layer_columns(one_model[0], 3) == ["layer 1", "layer 2", ""]
    assert layer_columns(one_model[0], 1) == ["layer 1"]
    assert both(two_models, lambda m: m.lm_loss) == "alpha 5, beta 5"
    assert both(one_model, lambda m: None) == "alpha n/a"
    assert both(one_model, lambda m: float("nan"), 2) == "alpha n/a"
    assert both(one_model, lambda m: 0.123456, 2) == "alpha 0.12"
