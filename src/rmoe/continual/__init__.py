"""Continual learning: MIGU gradient masking, task sequences, continual pre-training strategies,
continual-learning and stability-gap metrics.

- :class:`MIGU` masks gradient rows (output units) of linear layers and of 3-D expert weights by
  the magnitude of their outputs (Du et al., arXiv 2406.17245); :class:`RandomMask` is the
  same-ratio random-row control. Both cover rmoe's ``Experts`` weights through the probes the
  experts call from their dispatch (:class:`ExpertOutputProbe`); what they cover and measure is
  in :mod:`rmoe.continual.migu_stats`, and :mod:`rmoe.continual.masking` builds the masker a
  fine-tuning config asks for (the fine-tuning loop takes it from its caller).
- :mod:`rmoe.continual.metrics` computes AA / BWT / forgetting from an accuracy matrix and
  stability-gap statistics from an evaluation curve, and writes JSON / markdown / PNG reports.
- :mod:`rmoe.continual.tasks` loads tasks (prompt/answer or classification jsonl, ``hf:``) and
  builds the built-in sequence from the standard library and ``pydoc``;
  :mod:`rmoe.continual.harness` trains a sequence with plain fine-tuning, MIGU, random masking
  or replay (:mod:`rmoe.training.sft` does each stage) and reports the accuracy matrix.
- :mod:`rmoe.continual.cpt` materialises continual pre-training strategies (subset x epochs,
  relevance / perplexity selection, replay) as a corpus for the unchanged trainer (document
  scorers in :mod:`rmoe.continual.selection`);
  :mod:`rmoe.continual.gap` measures the stability gap of a run's evaluation curves;
  :mod:`rmoe.continual.demo` is ``rmoe continual cpt-demo``.
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
