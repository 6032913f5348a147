"""Tests for rmoe.continual.metrics against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rmoe.continual import (
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

# A[i, j]: accuracy on task j after stage i. Task 0 improves after stage 1 (0.90 -> 0.95),
# so its best-ever accuracy is off the diagonal and forgetting differs from -BWT.
A = np.array(
    [
        [0.90, 0.10, 0.20],
        [0.95, 0.80, 0.30],
        [0.60, 0.50, 0.90],
    ]
)


def test_accuracy_matrix_metrics_by_hand() -> None:
    # AA = (0.60 + 0.50 + 0.90) / 3
    assert average_accuracy(A) == pytest.approx(2.0 / 3.0)
    # BWT = ((0.60 - 0.90) + (0.50 - 0.80)) / 2 = -0.30
    assert backward_transfer(A) == pytest.approx(-0.30)
    # f_0 = max(0.90, 0.95) - 0.60 = 0.35; f_1 = max(0.10, 0.80) - 0.50 = 0.30; F = 0.325
    assert forgetting(A) == pytest.approx(0.325)
    # FWT = ((A[0,1] - 0.10) + (A[1,2] - 0.25)) / 2 = (0.00 + 0.05) / 2
    assert forward_transfer(A, [0.1, 0.1, 0.25]) == pytest.approx(0.025)
    m = continual_metrics(A, baseline=[0.1, 0.1, 0.25])
    assert m.num_tasks == 3
    assert m.per_task_forgetting == pytest.approx([0.35, 0.30])
    assert m.forward_transfer == pytest.approx(0.025)


def test_single_task_and_bad_input() -> None:
    m = continual_metrics([[0.7]])
    assert m.average_accuracy == pytest.approx(0.7)
    assert m.backward_transfer is None and m.forgetting is None
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        average_accuracy([[0.5, np.nan], [0.5, 0.5]])


def test_stability_gap_loss_curve() -> None:
    # loss 2.0 -> 2.5 at step 10 -> back to 2.0 at step 30 -> 1.8 at step 40
    gap = stability_gap([0, 10, 30, 40], [2.0, 2.5, 2.0, 1.8])
    assert gap.initial_value == 2.0
    assert gap.worst_step == 10 and gap.worst_value == 2.5
    assert gap.dip_depth == pytest.approx(0.5)
    assert gap.recovery_step == 30 and gap.steps_to_recover == 30
    # triangle areas: 0.5 * 10 * 0.5 + 0.5 * 20 * 0.5 = 7.5; the part below 2.0 counts 0
    assert gap.gap_area == pytest.approx(7.5)
    assert gap.final_step == 40 and gap.final_value == 1.8


def test_stability_gap_accuracy_curve_and_crossing() -> None:
    gap = stability_gap([0, 10, 30, 40], [0.5, 0.3, 0.5, 0.6], higher_is_better=True)
    assert gap.dip_depth == pytest.approx(0.2)
    assert gap.worst_step == 10 and gap.recovery_step == 30
    assert gap.gap_area == pytest.approx(0.5 * 10 * 0.2 + 0.5 * 20 * 0.2)
    # loss crosses its initial level mid-segment: d = [0, 0.4, -0.4], crossing at step 15
    gap = stability_gap([0, 10, 20], [2.0, 2.4, 1.6])
    assert gap.gap_area == pytest.approx(0.5 * 10 * 0.4 + 0.5 * 5 * 0.4)
    assert gap.recovery_step == 20


def test_stability_gap_never_recovers_and_no_dip() -> None:
    gap = stability_gap([0, 1, 2], [2.0, 2.5, 2.2])
    assert gap.recovery_step is None and gap.steps_to_recover is None
    gap = stability_gap([5, 6, 7], [2.0, 1.9, 1.5])
    assert gap.dip_depth == 0.0 and gap.steps_to_recover == 0 and gap.gap_area == 0.0
    gap = stability_gap([0, 1, 2], [2.0, 2.5, 2.05], tolerance=0.1)
    assert gap.recovery_step == 2
    with pytest.raises(ValueError, match="increasing"):
        stability_gap([0, 2, 1], [1.0, 1.0, 1.0])


def test_writers(tmp_path) -> None:
    paths = write_accuracy_matrix(A, tmp_path / "cl", task_names=["a", "b", "c"], title="demo")
    payload = json.loads(paths["json"].read_text())
    assert payload["task_names"] == ["a", "b", "c"]
    assert np.allclose(payload["matrix"], A)
    assert payload["metrics"]["forgetting"] == pytest.approx(0.325)
    md = paths["markdown"].read_text()
    assert "| after stage | a | b | c |" in md and "backward transfer (BWT): -0.300" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert accuracy_markdown(A).count("\n| ") == 3  # one line per stage
    png = plot_stability_curves(
        {"full": ([0, 10, 30, 40], [2.0, 2.5, 2.0, 1.8]), "subset": ([0, 10, 20], [2.0, 2.2, 1.9])},
        tmp_path / "curves" / "gap.png",
        ylabel="loss",
    )
    assert png.read_bytes()[:4] == b"\x89PNG"
