"""Number formatting for the tables and summaries rmoe writes (one rule for missing values)."""

from __future__ import annotations

import math
from typing import Any


def fmt_number(value: Any, spec: str = ".3g", missing: str = "n/a") -> str:
    """``format(value, spec)``, or ``missing`` for None and non-finite floats (NaN, ±Inf).

    Examples: ``fmt_number(0.12345, ".3f") == "0.123"``, ``fmt_number(None) == "n/a"``,
    ``fmt_number(-0.5, "+.3f") == "-0.500"``.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def yaml_error_line(exc: Exception) -> str:
    """A YAML parser error in one line: ``line L, column C: PROBLEM`` (1-based), or the error's
    first line when it carries no position."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
