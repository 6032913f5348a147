"""Every string the analysis report puts into HTML is escaped: the report is safe to open."""

from __future__ import annotations

import html

from rmoe.analysis.report import write_report

EVIL = "<script>alert(1)</script>\"&'"


def test_report_escapes_names_paths_and_values(tmp_path):
    fig_dir = tmp_path / "<b>x\"&'"
    fig_dir.mkdir()
    png = fig_dir / "fig<i>\"&'.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    metrics = {
        "models": {EVIL: {"path": f"/runs/{EVIL}", "corpus": EVIL, "entropy": 1.5}},
        "label": EVIL,
    }
    report = write_report(tmp_path / "out", metrics, [(png, EVIL, EVIL)], title=f"model {EVIL}")
    text = report.read_text(encoding="utf-8")
    assert "<script>" not in text and "alert(1)</script>" not in text
    assert "<b>" not in text and "<i>" not in text
    assert html.escape(EVIL) in text  # title, figure title, reading, values
    assert text.count("<img ") == 1
    assert "\"&'" not in text
