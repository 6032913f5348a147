"""The names of rmoe's interchangeable parts: routers, scorers, recurrent cells, score functions,
balance losses, dispatch backends.

Each `Registry` maps a config value (``RMoEConfig.router_type``, ``router_scorer``,
``router_cell``, ``router_score_func``, ``router_aux_loss_type``, ``experts_backend``) to the object that implements it. Entries are added once,
when their home module is imported, by ``@REGISTRY.register`` on a class that carries its name
as the class attribute ``name`` (or ``REGISTRY.add(name, obj)`` for a function). A name is
spelled in exactly one place: where its class or function is defined.

This module imports nothing else of rmoe, so `rmoe.config` can validate against it without an
import cycle. A lookup first imports the registry's home module (by its dotted name), so the
entries are there whatever was imported first. After import nothing is ever added or removed.

    ROUTERS    router_type     -> a `rmoe.modeling.routing.Router` subclass (logits producer)
    SCORERS    router_scorer   -> a scorer module class (in_dim -> E logits)
    CELLS      router_cell     -> a `rmoe.modeling.routing.RecurrentCell` subclass
    SCORE_FUNCS router_score_func -> a `rmoe.modeling.routing.ScoreFunction` (softmax, sigmoid)
    BALANCERS  router_aux_loss_type -> a `rmoe.modeling.balancing.Balancer` subclass
    BACKENDS   experts_backend -> a dispatch function (`rmoe.modeling.experts`); the config
                                  also accepts `AUTO_BACKEND`, which picks one at run time
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

AUTO_BACKEND = "auto"
"""The `experts_backend` value that picks a registered backend by device, dtype and load."""

GW_SELECTIONS = ("entropy", "random")
"""GW-MoE token selections: by router entropy (GW-MoE), or the same count at random (control)."""

ACTIVATION_CHECKPOINTING = ("none", "moe", "layer")
"""`RMoEConfig.activation_checkpointing`: nothing, each MoE block, or each whole decoder layer."""


ROUTER_INITS = ("normal", "uniform")
"""`router_init`: N(0, router_init_std or initializer_range), or PyTorch's nn.Linear default."""


def nearest(name: object, choices: Iterable[str]) -> str:
    """`` (nearest: 'x')`` for the closest of `choices` to `name`, or "" when there are none."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.0)
    return f" (nearest: {match[0]!r})" if match else ""


def check_choice(field: str, value: object, choices: Iterable[str]) -> None:
    """Raise ValueError naming `field`, the valid `choices` and the nearest one, unless
    `value` is one of them."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(
            f"{field}={value!r} is not valid; expected one of {choices}" + nearest(value, choices)
        )


class Registry(Mapping[str, Any]):
    """Name -> implementation for one config field, filled when `home` is imported.

    Args:
        field: the config field whose values are this registry's names (used in errors).
        home: dotted name of the module whose import registers every entry.
    """

    def __init__(self, field: str, home: str) -> None:
        self.field = field
        self.home = home
        self._entries: dict[str, Any] = {}

    def add(self, name: str, obj: Any) -> Any:
        """Register `obj` under `name` (at import time only); returns `obj`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.field}: a registered name must be a non-empty string")
        if name in self._entries:
            raise ValueError(f"{self.field}: {name!r} is registered twice")
        self._entries[name] = obj
        return obj

    def register(self, cls: type) -> type:
        """Class decorator: register `cls` under its class attribute ``name``."""
        return self.add(getattr(cls, "name", None), cls)

    def _loaded(self) -> dict[str, Any]:
        importlib.import_module(self.home)
        return self._entries

    def __getitem__(self, name: str) -> Any:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._loaded()))

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        return f"Registry({self.field!r}: {list(self._entries)})"

    def names(self, where: Callable[[Any], bool] | None = None) -> tuple[str, ...]:
        """Registered names in registration order, optionally only those whose entry passes
        `where`."""
        return tuple(n for n, obj in self._loaded().items() if where is None or where(obj))

    def lookup(self, name: str, where: Callable[[Any], bool] | None = None) -> Any:
        """The entry called `name`; ValueError with the valid names and the nearest otherwise."""
        check_choice(self.field, name, self.names(where))
        return self._entries[name]


ROUTERS = Registry("router_type", "rmoe.modeling.routing")
SCORERS = Registry("router_scorer", "rmoe.modeling.routing")
CELLS = Registry("router_cell", "rmoe.modeling.routing")
SCORE_FUNCS = Registry("router_score_func", "rmoe.modeling.routing")
BALANCERS = Registry("router_aux_loss_type", "rmoe.modeling.balancing")
BACKENDS = Registry("experts_backend", "rmoe.modeling.experts")
