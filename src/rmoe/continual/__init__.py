"""Continual learning: MIGU gradient masking and continual-learning / stability-gap metrics.

- :class:`MIGU` masks gradient rows (output units) of linear layers and of 3-D expert weights by
  the magnitude of their outputs (Du et al., arXiv 2406.17245); :class:`RandomMask` is the
  same-ratio random-row control.
- :mod:`rmoe.continual.metrics` computes AA / BWT / forgetting from an accuracy matrix and
  stability-gap statistics from an evaluation curve, and writes JSON / markdown / PNG reports.
"""

from rmoe.continual.metrics import (
    ContinualMetrics,
    StabilityGap,
    accuracy_markdown,
    average_accuracy,
    backward_transfer,
    continual_metrics,
    forgetting,
    forward_transfer,
    plot_stability_curves,
    stability_gap,
    write_accuracy_matrix,
)
from rmoe.continual.migu import MIGU, ExpertOutputProbe, RandomMask, num_kept_rows

__all__ = [
    "MIGU",
    "ContinualMetrics",
    "ExpertOutputProbe",
    "RandomMask",
    "StabilityGap",
    "accuracy_markdown",
    "average_accuracy",
    "backward_transfer",
    "continual_metrics",
    "forgetting",
    "forward_transfer",
    "num_kept_rows",
    "plot_stability_curves",
    "stability_gap",
    "write_accuracy_matrix",
]
