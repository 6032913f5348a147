"""Dispatch backends agree with the loop oracle (forward and backward), plus auto/fallback rules."""

from __future__ import annotations

import logging

import pytest
import torch

from rmoe.modeling import experts as ex
from rmoe.modeling.experts import DISPATCH_BACKENDS, Experts, auto_backend, resolve_backend

FAST = [b for b in sorted(DISPATCH_BACKENDS) if b != "loop"]
DTYPES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _experts(e: int, d: int, f: int, dtype: torch.dtype) -> Experts:
    m = Experts(e, d, f)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.to(dtype)


def _run(m: Experts, x, idx, w, backend: str, gy):
    """Output and grads w.r.t. (x, routing weights, gate, up, down) for one backend."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = m(x, idx, w, backend=backend)
    grads = torch.autograd.grad(y, [x, w, *m.parameters()], gy, allow_unused=True)
    return [y, *grads]


def _close(a: list, b: list, dtype: torch.dtype) -> None:
    names = ["y", "dx", "dweight", "dgate", "dup", "ddown"]
    for name, u, v in zip(names, a, b):
        assert u is not None and v is not None, name
        torch.testing.assert_close(u.float(), v.float(), **DTYPES[dtype], msg=name)


CASES = {
    # name: (N, E, K, idx builder)
    "random": (33, 6, 2, None),
    "one_token": (1, 4, 2, lambda: torch.tensor([[2, 0]])),
    "all_on_one": (7, 4, 1, lambda: torch.full((7, 1), 3)),
    "all_on_one_k2": (6, 4, 2, lambda: torch.tensor([[1, 3]] * 6)),
    "empty_experts": (3, 8, 2, lambda: torch.tensor([[0, 1], [1, 0], [0, 7]])),
    "all_experts": (5, 4, 4, lambda: torch.arange(4).repeat(5, 1)),
}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", FAST)
def test_backend_matches_loop(backend: str, case: str, dtype: torch.dtype) -> None:
    n, e, k, make = CASES[case]
    d, f = 16, 24
    m = _experts(e, d, f, dtype)
    idx = torch.randn(n, e).topk(k, dim=-1).indices if make is None else make()
    x = torch.randn(n, d, dtype=dtype)
    w = torch.rand(n, k)  # float32 routing weights, as the router produces
    gy = torch.randn(n, d, dtype=dtype)
    want = _run(m, x, idx, w, "loop", gy)
    got = _run(m, x, idx, w, backend, gy)
    _close(got, want, dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("d,f", [(13, 7), (20, 6)])
def test_unaligned_sizes_are_padded(backend: str, d: int, f: int) -> None:
    """D, F whose strides are not 16-byte multiples (grouped_mm pads them)."""
    m = _experts(5, d, f, torch.float32)
    idx = torch.randn(19, 5).topk(2, dim=-1).indices
    x, w, gy = torch.randn(19, d), torch.rand(19, 2), torch.randn(19, d)
    _close(_run(m, x, idx, w, backend, gy), _run(m, x, idx, w, "loop", gy), torch.float32)


def test_unused_experts_get_zero_gradients() -> None:
    m = _experts(6, 8, 8, torch.float32)
    idx = torch.tensor([[0, 1], [1, 0]])
    for backend in FAST:
        got = _run(m, torch.randn(2, 8), idx, torch.rand(2, 2), backend, torch.randn(2, 8))
        for g in got[3:]:
            assert torch.count_nonzero(g[2:]) == 0


def test_noncontiguous_idx_and_gw_style_call() -> None:
    """GW-MoE calls the experts with an expanded [n, E] index and [n, E] probabilities."""
    m = _experts(4, 8, 8, torch.float32)
    idx = torch.arange(4).expand(3, 4)
    x, w, gy = torch.randn(3, 8), torch.softmax(torch.randn(3, 4), -1), torch.randn(3, 8)
    want = _run(m, x, idx, w, "loop", gy)
    for backend in FAST:
        _close(_run(m, x, idx, w, backend, gy), want, torch.float32)


def test_auto_rule_on_cpu() -> None:
    gate = torch.zeros(8, 4, 16)
    x, many, few = torch.randn(4, 16), torch.zeros(4, 2, dtype=torch.long), torch.zeros(1, 2)
    gmm_ok = ex.grouped_mm_unsupported_reason(x, gate) is None
    assert auto_backend(x, gate, many) == ("grouped_mm" if gmm_ok else "sorted")
    assert auto_backend(x[:1], gate, few) == "sorted"  # N*K < E: most experts idle
    assert auto_backend(x.double(), gate.double(), many) == "sorted"
    want = DISPATCH_BACKENDS[auto_backend(x, gate, many)]
    assert resolve_backend("auto", x, gate, many) is want


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match="grouped_mm"):
        resolve_backend("grouped", torch.randn(2, 2))


def test_grouped_mm_falls_back_cleanly(monkeypatch, caplog) -> None:
    """Where grouped_mm cannot run (here: forced), the backend logs once and uses `sorted`."""
    monkeypatch.setattr(ex, "grouped_mm_unsupported_reason", lambda x, g: "forced for the test")
    m = _experts(4, 8, 8, torch.float32)
    idx = torch.tensor([[0, 1], [2, 3]])
    x, w, gy = torch.randn(2, 8), torch.rand(2, 2), torch.randn(2, 8)
    with caplog.at_level(logging.WARNING, logger=ex.__name__):
        got = _run(m, x, idx, w, "grouped_mm", gy)
        _run(m, x, idx, w, "grouped_mm", gy)
    assert sum("forced for the test" in r.message for r in caplog.records) == 1
    _close(got, _run(m, x, idx, w, "loop", gy), torch.float32)


def test_grouped_mm_support_reasons() -> None:
    x32 = torch.randn(2, 8)
    assert ex.grouped_mm_unsupported_reason(x32, x32.to(torch.bfloat16)) is not None  # dtype mix
    if ex._grouped_mm_fn() is not None and ex._TORCH_VERSION >= "2.9":
        assert ex.grouped_mm_unsupported_reason(x32, x32) is None
        x64 = x32.double()
        assert "dtype" in ex.grouped_mm_unsupported_reason(x64, x64)


def test_empty_input() -> None:
    m = _experts(4, 8, 8, torch.float32)
    for backend in DISPATCH_BACKENDS:
        y = m(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), backend)
        assert y.shape == (0, 8)


# ----------------------------------------------------------------------------------------------
# benchmarks: each suite's --quick main runs and writes its JSON; `rmoe bench` finds the folder
# ----------------------------------------------------------------------------------------------
SMOKE_ARGS = ["--quick", "--threads", "1", "--warmup", "0", "--repeats", "1", "--device", "cpu"]


@pytest.fixture
def keep_threads():
    """The suites call torch.set_num_threads; restore the session's setting afterwards."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("suite", ["layer", "flops", "step", "migu"])
def test_benchmark_quick_writes_json(suite: str, tmp_path, keep_threads) -> None:
    import importlib
    import json

    module = importlib.import_module(f"benchmarks.{suite}")
    assert module.main([*SMOKE_ARGS, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / f"{suite}.json").read_text())
    assert data["suite"] == suite
    for key in ("cpu_model", "cpu_cores", "torch", "device", "date"):
        assert data["machine"][key] is not None
    assert (tmp_path / f"{suite}.md").read_text().startswith(f"# benchmark `{suite}`")
    if suite == "migu":  # the expert weights are covered on top of the linear layers
        res = data["results"][0]
        covered = res["covered_weights"]
        assert covered["migu (linear + experts)"] > covered["migu linear only"]
        assert set(res["overhead_vs_plain"]["wall"]) == set(covered)


def test_bench_cli_finds_folder_and_reports_absence(tmp_path) -> None:
    from rmoe.cli import bench

    found = bench.find_benchmarks()
    assert (found / "layer.py").is_file()
    with pytest.raises(FileNotFoundError, match="--bench-dir"):
        bench.find_benchmarks(str(tmp_path / "nowhere"))


def test_bench_cli_runs_a_suite(tmp_path, capsys, keep_threads) -> None:
    from rmoe.cli.main import main

    assert main(["bench", "flops", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "flops.json").is_file()
    assert main(["bench", "flops", "--bench-dir", str(tmp_path / "missing")]) == 2
    assert "benchmarks/ folder not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# probes: every backend shows a hook the real rows of each weight's outputs
# ----------------------------------------------------------------------------------------------
def _capture_probes(m: Experts) -> tuple[dict[str, list], list]:
    seen: dict[str, list] = {"gate_proj": [], "up_proj": [], "down_proj": []}
    handles = []
    for probe in (m.gate_probe, m.up_probe, m.down_probe):

        def hook(mod, args, out, kind=probe.migu_param):
            h, ids, tok = args
            assert out is h  # identity
            seen[kind].append((h.detach().clone(), ids.clone(), tok.clone()))

        handles.append(probe.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("backend", sorted(DISPATCH_BACKENDS))
def test_probes_report_each_weights_outputs_on_real_rows(backend: str) -> None:
    # d=6, f=10 are not 16-byte aligned in fp32: grouped_mm pads, the probes must not see it
    torch.manual_seed(3)
    e, d, f, n, k = 5, 6, 10, 13, 2
    m = _experts(e, d, f, torch.float32)
    x, w = torch.randn(n, d), torch.rand(n, k)
    idx = torch.randn(n, e).topk(k, dim=-1).indices
    plain = m(x, idx, w, backend=backend)
    seen, handles = _capture_probes(m)
    y = m(x, idx, w, backend=backend)
    torch.testing.assert_close(y, plain, rtol=0, atol=0)
    pairs = sorted((t, int(idx[t, j])) for t in range(n) for j in range(k))
    with torch.no_grad():
        oracle = {
            "gate_proj": lambda t, ex_: x[t] @ m.gate_proj[ex_].T,
            "up_proj": lambda t, ex_: x[t] @ m.up_proj[ex_].T,
            "down_proj": lambda t, ex_: m.expert_forward(x[t : t + 1], ex_)[0],
        }
        for kind, calls in seen.items():
            h = torch.cat([c[0] for c in calls])
            ids = torch.cat([c[1] for c in calls]).tolist()
            tok = torch.cat([c[2] for c in calls]).tolist()
            assert h.shape == (n * k, d if kind == "down_proj" else f), kind
            assert sorted(zip(tok, ids)) == pairs, kind
            for row, (t, ex_) in enumerate(zip(tok, ids)):
                torch.testing.assert_close(h[row], oracle[kind](t, ex_), rtol=1e-5, atol=1e-5)
    for hd in handles:
        hd.remove()


def test_probes_are_not_called_without_hooks_and_map_token_index() -> None:
    m = _experts(4, 8, 8, torch.float32)
    x, w = torch.randn(6, 8), torch.rand(6, 2)
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])

    def boom(*args, **kwargs):
        raise AssertionError("probe called without a hook")

    for probe in (m.gate_probe, m.up_probe, m.down_probe):
        probe.forward = boom
    for backend in DISPATCH_BACKENDS:
        m(x, idx, w, backend=backend)
    del m.gate_probe.forward, m.up_probe.forward, m.down_probe.forward

    seen, handles = _capture_probes(m)
    global_rows = torch.tensor([10, 3, 7, 0, 12, 5])  # x is a subset of a larger batch
    m(x, idx, w, backend="sorted", token_index=global_rows)
    tok = torch.cat([c[2] for c in seen["gate_proj"]])
    assert sorted(tok.tolist()) == sorted(global_rows.repeat_interleave(2).tolist())
    for hd in handles:
        hd.remove()
    assert not m.gate_probe.hooked
    assert not any(n for n, _ in m.named_parameters() if "probe" in n)
    assert set(m.state_dict()) == {"gate_proj", "up_proj", "down_proj"}


def test_fallback_report_has_no_module_global_state(monkeypatch, caplog) -> None:
    """Each Experts module logs a fallback reason once; a second module logs it again (nothing
    is remembered at module level); the bare backend function warns with a stable category."""
    monkeypatch.setattr(ex, "grouped_mm_unsupported_reason", lambda x, g: "forced again")
    assert not hasattr(ex, "_warned")
    idx = torch.tensor([[0, 1], [2, 3]])
    x, w, gy = torch.randn(2, 8), torch.rand(2, 2), torch.randn(2, 8)
    with caplog.at_level(logging.WARNING, logger=ex.__name__):
        for _ in range(2):
            m = _experts(4, 8, 8, torch.float32)
            _run(m, x, idx, w, "grouped_mm", gy)
            _run(m, x, idx, w, "grouped_mm", gy)
    assert sum("forced again" in r.message for r in caplog.records) == 2
    gate, up, down = m.gate_proj, m.up_proj, m.down_proj
    with pytest.warns(ex.GroupedMMFallbackWarning, match="forced again"):
        got = ex.dispatch_grouped_mm(x, idx, w, gate, up, down)
    torch.testing.assert_close(got, ex.dispatch_sorted(x, idx, w, gate, up, down))
