"""The registries own the names: every registered router/scorer/cell builds, validates and counts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_config
from torch.utils.flop_counter import FlopCounterMode

import rmoe.registry as registry
from rmoe import RMoEConfig, RMoEForCausalLM
from rmoe.modeling.accounting import count_config, parameter_counts
from rmoe.modeling.routing import build_cell, build_router, router_presets
from rmoe.registry import BACKENDS, CELLS, ROUTERS, SCORERS, Registry

STATE_SCORERS = SCORERS.names(lambda cls: cls.on_state)


def _router_configs():
    """Every registered router; the cell-using ones with every cell and state scorer."""
    for rt, cls in ROUTERS.items():
        if not cls.uses_cell:
            yield dict(router_type=rt)
            continue
        for cell in CELLS:
            for scorer in STATE_SCORERS:
                yield dict(router_type=rt, router_cell=cell, router_scorer=scorer)


CONFIGS = list(_router_configs())
IDS = ["-".join(c.values()) for c in CONFIGS]


def test_registry_module_imports_nothing_of_rmoe():
    tree = ast.parse(Path(registry.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("rmoe"), node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("rmoe") for a in node.names)


@pytest.mark.parametrize("reg", [ROUTERS, SCORERS, CELLS])
def test_every_class_carries_its_registered_name(reg):
    assert len(reg) == len(set(reg)) > 0
    for name, cls in reg.items():
        assert cls.name == name


def test_backends_are_registered_and_auto_is_extra():
    assert set(BACKENDS) == {"loop", "sorted", "grouped_mm"}
    assert registry.AUTO_BACKEND not in BACKENDS


def test_registry_rejects_duplicates_and_names_the_nearest():
    reg = Registry("thing", "rmoe.registry")

    @reg.register
    class Alpha:
        name = "alpha"

    with pytest.raises(ValueError, match="registered twice"):
        reg.register(type("Again", (), {"name": "alpha"}))
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register(type("Nameless", (), {}))
    assert reg.lookup("alpha") is Alpha and list(reg) == ["alpha"]
    with pytest.raises(ValueError, match=r"thing='alpah' is not valid.*nearest: 'alpha'"):
        reg.lookup("alpah")


@pytest.mark.parametrize(
    "field,bad,nearest",
    [
        ("router_type", "recurent", "recurrent"),
        ("router_type", "cosin", "cosine"),
        ("router_cell", "lstn", "lstm"),
        ("router_scorer", "xmo", "xmoe"),
        ("experts_backend", "sortd", "sorted"),
    ],
)
def test_config_rejects_unknown_names_with_the_nearest(field, bad, nearest):
    with pytest.raises(ValueError, match=rf"{field}='{bad}'.*\(nearest: '{nearest}'\)"):
        tiny_config(**{field: bad})


def test_mlp_scores_x_but_not_the_recurrent_state():
    assert "mlp" in SCORERS and "mlp" not in STATE_SCORERS
    tiny_config(router_type="mlp")
    with pytest.raises(ValueError, match="router_scorer='mlp'"):
        tiny_config(router_scorer="mlp")


def test_config_docstring_documents_every_registered_name():
    doc = RMoEConfig.__doc__
    for reg in (ROUTERS, SCORERS, CELLS, BACKENDS):
        for name in reg:
            assert f'"{name}"' in doc, (reg.field, name)


@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_every_registered_router_builds_and_runs(kw):
    cfg = tiny_config(**kw)
    router = build_router(cfg)
    assert type(router) is ROUTERS[cfg.router_type]
    assert isinstance(type(router).routing_space(cfg), str)
    model = RMoEForCausalLM(cfg).eval()
    assert (model.model.router_cell is not None) == type(router).uses_cell
    out = model(torch.randint(0, 256, (2, 5)), output_routing=True)
    assert len(out.routing) == len(cfg.moe_layer_indices)
    assert out.routing[0].probs.shape == (10, cfg.num_experts)


def _matmul_macs(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kw", CONFIGS, ids=IDS)
def test_each_class_counts_its_own_parameters_and_macs(kw, bias):
    """Router.layer_counts / RecurrentCell.counts against a built model: parameters exactly,
    multiply-adds against torch's FLOP counter on one router call."""
    cfg = tiny_config(router_bias=bias, num_shared_experts=1, mlp_only_layers=[1], **kw)
    cls = ROUTERS[cfg.router_type]
    model = RMoEForCausalLM(cfg)
    layer_p, layer_m = cls.layer_counts(cfg)
    cell = model.model.router_cell
    cell_p, cell_m = (0, 0) if cell is None else CELLS[cfg.router_cell].counts(cfg.router_dim)
    for i in cfg.moe_layer_indices:
        router = model.model.layers[i].moe.router
        assert sum(p.numel() for p in router.parameters()) == layer_p
    if cell is not None:
        assert sum(p.numel() for p in cell.parameters()) == cell_p
    shared = model.model.router_shared
    shared_p = cls.shared_counts(cfg)[0]
    assert (0 if shared is None else sum(p.numel() for p in shared.parameters())) == shared_p
    n_moe = len(cfg.moe_layer_indices)
    assert count_config(cfg).router_params == parameter_counts(model)["router"]
    assert count_config(cfg).router_params == n_moe * layer_p + cell_p + shared_p
    n = 7
    x = torch.randn(n, cfg.hidden_size)
    macs = _matmul_macs(model.model.layers[0].moe.router, x, None, cell, shared)
    assert macs == n * (layer_m + cell_m)


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_build_by_name(kind):
    cell = build_cell(kind, 6)
    assert type(cell) is CELLS[kind] and cell.name == kind
    assert cell.zero_state(3, torch.zeros(1)).shape == (3, cell.state_dim)


def test_router_presets_come_from_the_registry():
    presets = router_presets()
    assert list(presets)[: len(ROUTERS)] == list(ROUTERS)
    assert {"recurrent-np", "recurrent-detach", "recurrent-xmoe"} <= set(presets)
    for name, keys in presets.items():
        assert keys["router_type"] in ROUTERS
        assert name.split("-")[0] == keys["router_type"]
        tiny_config(**keys)  # every preset is a valid config
