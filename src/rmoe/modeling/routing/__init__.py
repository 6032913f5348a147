"""Router stages: logits producers (routers.py, with the shared cell in cells.py and scorers in
scorers.py), score functions and selection (selection.py), router linear init (init.py).

Importing this package registers every router, scorer, cell and score function in
`rmoe.registry` (ROUTERS, SCORERS, CELLS, SCORE_FUNCS). See routers.py for the data flow.
"""

from .cells import (
    GRURouterCell,
    LSTMRouterCell,
    RecurrentCell,
    RNNRouterCell,
    build_cell,
    build_router_cell,
)
from .init import RouterLinear
from .routers import (
    ROUTERS,
    CosineRouter,
    LinearRouter,
    MLPRouter,
    RandomRouter,
    RecurrentRouter,
    Router,
    RoutingResult,
    SharedRouter,
    XMoERouter,
    build_router,
    build_shared_router,
    router_presets,
)
from .scorers import CosineScorer, LinearScorer, MLPScorer, Scorer, XMoEScorer, build_scorer
from .selection import (
    ScoreFunction,
    SigmoidScore,
    SoftmaxScore,
    capacity_keep,
    expert_capacity,
    select_experts,
    select_topk,
)

__all__ = [
    "ROUTERS",
    "CosineRouter",
    "CosineScorer",
    "GRURouterCell",
    "LSTMRouterCell",
    "LinearRouter",
    "LinearScorer",
    "MLPRouter",
    "MLPScorer",
    "RNNRouterCell",
    "RandomRouter",
    "RecurrentCell",
    "RecurrentRouter",
    "Router",
    "RouterLinear",
    "RoutingResult",
    "ScoreFunction",
    "Scorer",
    "SharedRouter",
    "SigmoidScore",
    "SoftmaxScore",
    "XMoERouter",
    "XMoEScorer",
    "build_cell",
    "build_router",
    "build_router_cell",
    "build_scorer",
    "build_shared_router",
    "capacity_keep",
    "expert_capacity",
    "router_presets",
    "select_experts",
    "select_topk",
]
