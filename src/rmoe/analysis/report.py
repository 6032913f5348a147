"""Write an analysis run to disk: ``metrics.json`` plus a self-contained ``report.html``.

The HTML page lists every figure (title, image, one-line reading) and a table of the scalar
metrics; it references the PNGs by relative path, copying into ``out_dir/figures/`` any figure
that lives outside ``out_dir`` so the folder can be moved or archived as a whole.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch

__all__ = ["to_jsonable", "write_report"]

_MAX_TABLE_ROWS = 500


def to_jsonable(obj: Any) -> Any:
    """Convert metrics to JSON-ready Python values.

    numpy/torch arrays become (nested) lists, numpy scalars Python numbers, objects with a
    ``to_dict()`` (the analysis dataclasses) their dict, other dataclasses ``asdict``, paths
    strings, tuples/sets lists, mapping keys strings, and NaN/±inf ``None`` (strict JSON).
    """
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().float().cpu().numpy() if obj.is_floating_point() else obj.cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    raise ValueError(
        f"metrics contain a value of type {type(obj).__name__} that cannot be written as JSON; "
        "pass numbers, strings, arrays, dicts or lists"
    )


def _scalar_rows(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts to (dotted key, scalar) rows; lists are skipped."""
    rows: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            rows.extend(_scalar_rows(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        rows.append((prefix, obj))
    return rows


def _format(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "—" if v is None else str(v)


def _place_figure(png: Path, out_dir: Path, index: int) -> str:
    """Return the path of ``png`` relative to ``out_dir`` (as a URL), copying it in if needed."""
    if not png.is_file():
        raise FileNotFoundError(
            f"figure {png} does not exist; write it first (rmoe.analysis.plots) and pass its path"
        )
    src = png.resolve()
    root = out_dir.resolve()
    try:
        rel = src.relative_to(root)
    except ValueError:
        dest = root / "figures" / f"{index:02d}_{src.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        rel = dest.relative_to(root)
    return quote(rel.as_posix())


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    figures: Sequence[tuple[str | Path, str, str]],
    title: str = "rmoe analysis report",
) -> Path:
    """Write ``metrics.json`` and ``report.html`` into ``out_dir``.

    Args:
        out_dir: output folder (created if missing).
        metrics: nested dict of results (values as accepted by :func:`to_jsonable`).
        figures: (png_path, title, one_line_reading) per figure, in display order; a relative
            png_path is resolved against the current directory. Figures outside ``out_dir``
            are copied into ``out_dir/figures/``.
        title: page title.

    Returns:
        Path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(dict(metrics))
    (out / "metrics.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:2em 0}"
        "figcaption{color:#333;margin-top:.4em}table{border-collapse:collapse;font-size:13px}"
        "td{border-bottom:1px solid #eee;padding:2px 10px}td.v{text-align:right;"
        "font-family:monospace}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p>All numbers: <a href="metrics.json">metrics.json</a>.</p>',
    ]
    if figures:
        parts.append("<h2>Figures</h2>")
    for i, fig in enumerate(figures):
        if len(fig) != 3:
            raise ValueError(
                f"figures[{i}] must be (png_path, title, one_line_reading); got {len(fig)} items"
            )
        png, fig_title, reading = fig
        src = _place_figure(Path(png), out, i)
        parts.append(
            f'<figure id="fig{i}"><h3>{html.escape(str(fig_title))}</h3>'
            f'<img src="{html.escape(src, quote=True)}" alt="{html.escape(str(fig_title), quote=True)}">'
            f"<figcaption>{html.escape(str(reading))}</figcaption></figure>"
        )
    rows = _scalar_rows(data)
    if rows:
        parts.append("<h2>Scalar metrics</h2><table>")
        for key, value in rows[:_MAX_TABLE_ROWS]:
            parts.append(
                f'<tr><td>{html.escape(key)}</td><td class="v">{html.escape(_format(value))}</td></tr>'
            )
        parts.append("</table>")
        if len(rows) > _MAX_TABLE_ROWS:
            parts.append(f"<p>{len(rows) - _MAX_TABLE_ROWS} more scalars are in metrics.json.</p>")
    parts.append("</body></html>")
    report = out / "report.html"
    report.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return report
