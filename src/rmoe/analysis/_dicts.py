"""Dataclass records to metrics dicts: optional fields that were not computed are left out."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any


def asdict_without_none(record: Any, optional: Collection[str]) -> dict[str, Any]:
    """``dataclasses.asdict(record)`` without the ``optional`` fields whose value is None."""
    return {
        k: v for k, v in dataclasses.asdict(record).items() if not (k in optional and v is None)
    }
