"""Optional dependencies: which ``pip install 'rmoe[EXTRA]'`` provides each one.

A plain ``pip install rmoe`` lacks the extras (see ``[project.optional-dependencies]`` in
``pyproject.toml``). Code that needs one imports it as usual; a missing module is turned into one
line that names the extra with :func:`missing_extra_message`, or checked up front with
:func:`require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module name -> the extra that installs it
EXTRAS: dict[str, str] = {
    "scipy": "analysis",
    "matplotlib": "analysis",
    "datasets": "data",
    "pyarrow": "data",
    "tensorboard": "tensorboard",
    "lm_eval": "eval",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra to install."""


def missing_extra_message(exc: ImportError, feature: str) -> str | None:
    """One line naming the extra for the module ``exc`` failed to import, or None if the module
    is not an optional dependency of rmoe (then the error is a real bug: re-raise it).

    Example: ``"rmoe analyze needs scipy: pip install 'rmoe[analysis]'"``.
    """
    if isinstance(exc, MissingExtraError):
        return str(exc)
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in EXTRAS:
        return None
    return f"{feature} needs {name}: pip install 'rmoe[{EXTRAS[name]}]'"


def require(module: str, feature: str) -> ModuleType:
    """Import ``module``; raise :class:`MissingExtraError` naming its extra if it is missing.

    Args:
        module: the module to import, e.g. ``"scipy.stats"``.
        feature: what needs it, for the message, e.g. ``"rmoe analyze"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = missing_extra_message(exc, feature)
        if message is None:
            raise
        raise MissingExtraError(message, name=exc.name) from exc
