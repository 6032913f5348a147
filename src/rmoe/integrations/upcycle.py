"""Sparse upcycling: a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint as an rmoe MoE model.

`upcycle_checkpoint` is what ``rmoe upcycle`` runs. The dense checkpoint is read through its
table in :mod:`rmoe.integrations.families` (`DENSE_FAMILIES`, with the same checks and
refusals as ``rmoe import``); attention, norms and embeddings are taken as they are, and each
layer's SwiGLU MLP (gate W_g [F, D], up W_u [F, D], down W_d [D, F]) becomes an MoE block of
E routed experts with top-K routing (the top-K probabilities always renormalised,
``norm_topk_prob``):

* ``method="copy"`` (Komatsuzaki et al., "Sparse Upcycling", arXiv 2212.05055): every expert
  is a copy of the MLP (plus, with ``noise`` s > 0, independent Gaussian noise of standard
  deviation s times each weight's own standard deviation). Since the combine weights of the
  K chosen experts sum to one, the MoE block computes exactly the dense MLP: the upcycled
  model's logits equal the dense model's at the start (float rounding; any router, recurrent
  included; noise 0). With N shared experts, the shared part is N more copies; every copy's
  down projection is divided by N + 1 so the sum is still the MLP.
* ``method="split"`` (LLaMA-MoE, Zhu et al., arXiv 2406.16554): the F hidden neurons are cut
  into E + N contiguous groups of F / (E + N); routed expert e holds group e with its down
  projection multiplied by E, the N shared experts hold the last N groups unscaled. The dense
  MLP is the sum of all E + N groups' outputs r_g(x); the MoE block computes
  shared(x) + E * sum_{e in top-K} w_e r_e(x). The model's output therefore **differs from the
  dense model's** at the start: only K of the E routed groups are evaluated per token and they
  are weighted by the router. Only with K = E and a router whose top-K weights are uniform
  (w_e = 1/E, e.g. zero router weights) is it exactly the dense MLP; with a uniform router
  and K < E it is the dense MLP in expectation over which K groups are chosen. Continued
  training has to recover the rest (LLaMA-MoE trains 200B tokens).

The router is any registered rmoe router (``router_type``) with its own initialisation (the
model's init, drawn from a generator seeded with ``seed``); the output folder is the same as
``rmoe import``'s (config.json + safetensors, tokenizer, ``train.yaml``).

Shapes: D model width, F dense hidden width, E routed experts, f = expert width.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoints import (
    Checkpoint,
    build_model,
    copy_generation_config,
    copy_tokenizer,
    read_config_json,
    rmoe_options,
    save_model,
)
from .families import DENSE_FAMILIES, plan_from_hf
from .importing import (
    ImportResult,
    check_options,
    drop_zero_options,
    hf_config,
    hf_family,
    read_state,
    rmoe_settings,
)

METHODS = ("copy", "split")
"""How the experts are made from the dense MLP (see the module docstring)."""

_MLP_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")
_FIXED = frozenset(
    {
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "num_shared_experts",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "mlp_only_layers",
    }
)
"""rmoe settings the upcycling itself decides."""


def moe_settings(
    dense_width: int, experts: int, top_k: int, method: str, shared_experts: int
) -> dict[str, Any]:
    """The rmoe MoE settings of an upcycling of an MLP of width F = `dense_width`.

    Raises:
        ValueError: an unknown method, top-k outside 1..E, or (split) F not divisible into
            E + N equal groups.
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {list(METHODS)}")
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"--experts {experts} --top-k {top_k}: need 1 <= top-k <= experts")
    if shared_experts < 0:
        raise ValueError(f"--shared-experts must be >= 0, got {shared_experts}")
    parts = experts + shared_experts
    if method == "split" and dense_width % parts:
        ok = [n for n in range(2, min(dense_width, 64) + 1) if dense_width % n == 0][:8]
        raise ValueError(
            f"--method split cuts the MLP's {dense_width} hidden neurons into experts + shared "
            f"experts = {parts} equal groups, and {dense_width} is not divisible by {parts}; "
            f"totals that divide it: {ok}"
        )
    width = dense_width if method == "copy" else dense_width // parts
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": width,
        "intermediate_size": dense_width,
        "num_shared_experts": shared_experts,
        "shared_expert_intermediate_size": width,
        "norm_topk_prob": True,
        "mlp_only_layers": [],
    }


def _noisy(t: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """t + noise * std(t) * N(0, 1), independently per element (t itself when noise is 0)."""
    if not noise:
        return t
    std = t.float().std()
    eps = torch.randn(t.shape, generator=generator, dtype=torch.float32)
    return (t.float() + noise * std * eps).to(t.dtype)


def upcycle_mlp(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    config: Any,
    method: str,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One layer's MoE tensors from its dense SwiGLU MLP.

    Args:
        gate, up: [F, D] the dense MLP's gate and up projections; down: [D, F].
        config: the upcycled `rmoe.RMoEConfig` (E = num_experts, N = num_shared_experts).
        method: ``copy`` or ``split`` (module docstring).
        noise: relative noise on the routed experts (0 = exact copies / groups).

    Returns:
        ``{"experts.gate_proj": [E, f, D], "experts.up_proj": [E, f, D], "experts.down_proj":
        [E, D, f]}`` and, with shared experts, ``shared_experts.{gate,up,down}_proj.weight``
        ([N f, D], [N f, D], [D, N f]); f = F (copy) or F / (E + N) (split).
    """
    e, n = config.num_experts, config.num_shared_experts
    g = generator or torch.Generator().manual_seed(0)
    if method == "copy":
        scale = 1.0 / (n + 1)
        routed = [(gate, up, down * scale)] * e
        shared = [(gate, up, down * scale)] * n
    else:
        f = config.moe_intermediate_size
        parts = [
            (gate[i * f : (i + 1) * f], up[i * f : (i + 1) * f], down[:, i * f : (i + 1) * f])
            for i in range(e + n)
        ]
        routed = [(gt, ut, dt * e) for gt, ut, dt in parts[:e]]
        shared = parts[e:]
    out = {
        f"experts.{name}": torch.stack([_noisy(w[j], noise, g) for w in routed])
        for j, name in enumerate(("gate_proj", "up_proj", "down_proj"))
    }
    if n:
        for j, name in enumerate(("gate_proj", "up_proj", "down_proj")):
            dim = 1 if name == "down_proj" else 0
            out[f"shared_experts.{name}.weight"] = torch.cat([w[j] for w in shared], dim=dim)
    return {k: v.contiguous() for k, v in out.items()}


def upcycle_state(
    dense: Mapping[str, torch.Tensor],
    config: Any,
    method: str,
    noise: float = 0.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The rmoe state dict of the upcycled model: `dense` (an rmoe state dict whose layers are
    all dense, from `read_state`) with each ``model.layers.{i}.mlp.*`` turned into
    ``model.layers.{i}.moe.*`` by `upcycle_mlp` (no router tensors: the model initialises
    them)."""
    out: dict[str, torch.Tensor] = {}
    mlps: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in dense.items():
        m = _MLP_KEY.fullmatch(key)
        if m is None:
            out[key] = t
        else:
            mlps.setdefault(int(m.group(1)), {})[m.group(2)] = t
    generator = torch.Generator().manual_seed(int(seed))
    for i in sorted(mlps):
        w = mlps[i]
        moe = upcycle_mlp(
            w["gate_proj"], w["up_proj"], w["down_proj"], config, method, noise, generator
        )
        out.update({f"model.layers.{i}.moe.{k}": v for k, v in moe.items()})
    return out


def upcycle_checkpoint(
    dense_dir: str | Path,
    out_dir: str | Path,
    *,
    experts: int,
    top_k: int,
    router: str = "linear",
    method: str = "copy",
    noise: float = 0.0,
    shared_experts: int = 0,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    **router_kwargs: Any,
) -> ImportResult:
    """Upcycle a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint folder into an rmoe MoE
    model folder `out_dir` (written atomically; see the module docstring for what the two
    methods guarantee).

    Args:
        dense_dir: a transformers checkpoint folder (config.json, safetensors, tokenizer).
        experts, top_k: E routed experts per layer, K chosen per token.
        router: any registered rmoe router type (``linear``, ``recurrent``, ...).
        method: ``copy`` or ``split``.
        noise: relative Gaussian noise on the routed experts' weights (0 = none).
        shared_experts: N always-on shared experts.
        seed: the router initialisation and the noise.
        dtype: the weights' dtype (a name or torch dtype); None = as stored.
        force: replace a non-empty `out_dir`.
        router_kwargs: more rmoe settings (router_dim, router_cell, router_aux_loss_coef, ...).

    Raises:
        ValueError: what rmoe cannot represent (named), or settings that do not fit.
    """
    from ..config import RMoEConfig
    from ..runtime import resolve_dtype

    bad = sorted(set(router_kwargs) - rmoe_options())
    fixed = sorted(set(router_kwargs) & _FIXED)
    if bad or fixed:
        raise ValueError(
            f"{bad or fixed}: " + ("not rmoe model settings" if bad else "set by the upcycling")
        )
    if noise < 0:
        raise ValueError(f"--noise must be >= 0, got {noise}")
    torch_dtype = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    src = Path(dense_dir).expanduser()
    family = hf_family(read_config_json(src), DENSE_FAMILIES, "upcycle")
    config = hf_config(src, family)
    kw, notes = rmoe_settings(family, config, read_config_json(src))
    plan = plan_from_hf(family, config)
    with Checkpoint(src) as ckpt:
        plan, dropped = drop_zero_options(ckpt, family, plan, kw)
        dense = read_state(ckpt, family, plan)
    kw.update(moe_settings(kw["intermediate_size"], experts, top_k, method, shared_experts))
    kw = check_options({**kw, "router_type": router, **router_kwargs}, family.name)
    cfg = RMoEConfig(**kw)
    state = upcycle_state(dense, cfg, method, noise, seed)
    model = build_model(cfg, state, torch_dtype, seed)
    if method == "split":
        notes.append(
            "--method split: the output differs from the dense model's at the start (only K "
            "of the E neuron groups run per token, weighted by the router)"
        )

    def extra(tmp: Path) -> list[str]:
        copy_generation_config(src, tmp)
        return copy_tokenizer(src, tmp, cfg)

    notes += dropped + save_model(model, out_dir, force, extra=extra)
    out = Path(out_dir).expanduser()
    files = sorted(p.name for p in out.iterdir())
    return ImportResult(out, family.name, cfg.router_type, cfg, files, notes)
