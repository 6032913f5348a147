"""What every figure function shares: its signature, its result, layer selection and the
"name value, name value" readings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rmoe.analysis.pipeline.records import Comparison, ModelRecord
from rmoe.formatting import fmt_number

MAX_PLOT_LAYERS = 6
"""Per-layer panels in grid figures (first, evenly spaced, last)."""


class FigureResult(NamedTuple):
    """A written figure: the PNG, its title and a one-line reading (as the report lists it)."""

    path: Path
    title: str
    reading: str


FigureFn = Callable[[Path, Sequence[ModelRecord], Comparison | None], FigureResult | None]
"""``draw(fig_dir, models, comparison)`` writes one PNG into ``fig_dir`` and returns it, or
returns None when the figure does not apply (e.g. nothing to show)."""


def plot_layers(num_layers: int) -> list[int]:
    """Indices of the layers shown in grid figures: all, or :data:`MAX_PLOT_LAYERS` spread."""
    if num_layers <= MAX_PLOT_LAYERS:
        return list(range(num_layers))
    return sorted({round(v) for v in np.linspace(0, num_layers - 1, MAX_PLOT_LAYERS)})


def layer_columns(model: ModelRecord, width: int) -> list[str]:
    """Column titles "layer i" of the shown expert layers of ``model``, padded with "" (or cut)
    to ``width`` columns."""
    pl = model.experts.per_layer
    names = [f"layer {pl[j].layer_index}" for j in plot_layers(len(pl))]
    return (names + [""] * (width - len(names)))[:width]


def pair_names(models: Sequence[ModelRecord]) -> tuple[str, str]:
    """The two models' names for legends (("A", "B") with one model)."""
    return (models[0].name, models[1].name) if len(models) == 2 else ("A", "B")


def both(
    models: Sequence[ModelRecord], getter: Callable[[ModelRecord], Any], digits: int = 3
) -> str:
    """ "name1 v1, name2 v2" for one number of every model (None / NaN: "n/a")."""
    return ", ".join(f"{m.name} {fmt_number(getter(m), f'.{digits}g')}" for m in models)
