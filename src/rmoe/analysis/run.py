"""The whole analysis of one or two MoE checkpoints: ``metrics.json``, PNG figures, ``report.html``.

:func:`analyze` loads each model directory with ``AutoModelForCausalLM.from_pretrained`` (rmoe
models are registered by ``import rmoe``; ``trust_remote_code`` is never used), takes
``tokens`` tokens from the valid split of a corpus through the data pipeline, runs the model
with a :class:`~rmoe.analysis.adapters.RoutingCapture`, and computes

* routing: load per layer, router-entropy distribution, inner/outer balance, both cross-layer
  mutual-information maps, and (two paths, same tokens) routing agreement;
* experts: flattened and neuron-averaged weight similarity, neuron matching, router-vs-expert
  R², PCA of experts and neurons, RMoE's diversity score, and on the first ``output_tokens``
  tokens every expert's output: output similarity, norm-rank vs score-rank counts and the
  activation ratio;
* router gradient norms from the LM loss and from the balance loss, separately, on one batch.

With two paths every figure shows both models side by side (or overlaid). Progress goes through
the ``progress`` callable (e.g. ``tqdm``) and ``logging``; nothing is printed.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rmoe.analysis import experts as X
from rmoe.analysis import plots as P
from rmoe.analysis import routing as R
from rmoe.analysis.adapters import (
    MATRIX_TYPES,
    ExpertWeights,
    LayerCapture,
    MoEAdapter,
    get_adapter,
)
from rmoe.analysis.report import write_report

__all__ = [
    "ProgressFn",
    "analyze",
    "find_tokenizer",
    "load_for_analysis",
    "resolve_model_dir",
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[..., Iterable]
"""A ``tqdm``-like wrapper: ``progress(iterable, total=int, desc=str)`` -> iterable."""

_MAX_PLOT_LAYERS = 6  # per-layer panels in grid figures (first, evenly spaced, last)
_NEURONS_PER_EXPERT_PCA = 64  # neurons sampled per expert for the neuron PCA
_STEP_DIR = re.compile(r"^(?:step|checkpoint)[-_](\d+)$")
_ACTIVE_THRESHOLD = 1e-3
_OUTPUT_CHUNK_FLOATS = 1 << 23  # E·n·max(D, F) floats per expert-output chunk


def _no_progress(iterable: Iterable, **_: Any) -> Iterable:
    return iterable


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def resolve_model_dir(path: str | Path) -> Path:
    """The directory holding ``config.json`` for a model path or an rmoe training run.

    Looked up in order: ``path`` itself, ``path/model``, ``path/final``, then the newest (highest
    step) ``step-N`` / ``checkpoint-N`` folder with a ``config.json`` directly under ``path`` or
    under ``path/checkpoints``. A path to a ``config.json`` file means its folder.

    Raises:
        FileNotFoundError: the path does not exist or no folder with ``config.json`` is found.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; give a model directory with config.json "
            "or an rmoe run directory"
        )
    if p.is_file():
        if p.name == "config.json":
            return p.parent
        raise FileNotFoundError(f"{str(path)!r} is a file; give the model directory instead")
    if (p / "config.json").is_file():
        return p
    for name in ("model", "final"):
        if (p / name / "config.json").is_file():
            return p / name
    steps: list[tuple[int, float, Path]] = []
    for parent in (p, p / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "config.json").is_file():
                steps.append((int(m.group(1)), child.stat().st_mtime, child))
    if steps:
        return max(steps)[2]
    raise FileNotFoundError(
        f"no config.json in {str(p)!r} nor in its model/, final/, step-N/, checkpoint-N/ or "
        "checkpoints/step-N/ folders; give the directory that holds config.json"
    )


def find_tokenizer(model_dir: Path, given: Path) -> Path | None:
    """The nearest folder with a ``tokenizer.json``: ``model_dir`` or one of its ancestors up
    to ``given`` (the path the user passed, e.g. a run directory), else None."""
    model_dir, given = model_dir.resolve(), given.expanduser().resolve()
    d = model_dir
    while True:
        if (d / "tokenizer.json").is_file():
            return d
        if d == given or d.parent == d or given not in d.parents:
            return None
        d = d.parent


@dataclass
class _Loaded:
    """A model ready for analysis."""

    name: str
    path: str
    model_dir: Path
    model: nn.Module
    adapter: MoEAdapter
    tokenizer: Any
    tokenizer_info: dict


def load_for_analysis(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any, dict]:
    """Load a model directory (see :func:`resolve_model_dir`) and its tokenizer.

    Returns:
        (model in eval mode on ``device``, tokenizer, info dict with ``model_dir``,
        ``tokenizer_dir`` and ``tokenizer_fallback`` — True when no tokenizer.json was found and
        the byte tokenizer is used).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    import rmoe  # noqa: F401  (registers the rmoe Auto classes)
    from rmoe.data import build_tokenizer

    model_dir = resolve_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"cannot read the model config in {str(model_dir)!r}: {exc}") from exc
    logger.info("loading %s model from %s", config.model_type, model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.to(device).eval()
    tok_dir = find_tokenizer(model_dir, Path(path))
    info: dict[str, Any] = {"model_dir": str(model_dir), "tokenizer_dir": None}
    if tok_dir is not None:
        tokenizer = build_tokenizer(str(tok_dir))
        info.update(tokenizer_dir=str(tok_dir), tokenizer_fallback=False)
    else:
        tokenizer = build_tokenizer("bytes")
        info.update(
            tokenizer_fallback=True,
            tokenizer_note=f"no tokenizer.json found in {model_dir} or above it; used the byte "
            "tokenizer (ids 0-255 = bytes, 256 = end of text)",
        )
        logger.warning("%s", info["tokenizer_note"])
    info["tokenizer"] = repr(tokenizer)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab and tokenizer.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model in {model_dir} has a "
            f"vocabulary of {vocab}; put the model's tokenizer.json next to its config.json"
        )
    return model, tokenizer, info


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *_DTYPES]}; got {dtype!r}")
    return _DTYPES[dtype]


def _model_names(paths: Sequence[str]) -> list[str]:
    names = [Path(p).expanduser().resolve().name or "model" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{chr(65 + i)}: {n}" for i, n in enumerate(names)]
    return names


# --------------------------------------------------------------------------------------------
# data and capture
# --------------------------------------------------------------------------------------------


def _token_windows(
    tokenizer: Any,
    data: str,
    tokens: int,
    seq_len: int,
    cache_dir: str | Path | None,
) -> tuple[np.ndarray, dict]:
    """[W, T + 1] int64 windows (inputs + next token) covering ``tokens`` valid-split tokens."""
    from rmoe.data import get_split_tokens

    split = get_split_tokens(data, tokenizer, "valid", cache_dir=cache_dir)
    n_avail = int(split.n_tokens)
    if n_avail < 2:
        raise ValueError(f"the valid split of {data!r} has {n_avail} tokens; use a larger corpus")
    seq_len = min(seq_len, tokens, n_avail - 1)
    n_windows = max(1, min(tokens // seq_len, (n_avail - 1) // seq_len))
    starts = np.arange(n_windows, dtype=np.int64) * seq_len
    arr = np.asarray(split.tokens)
    windows = arr[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    info = {
        "data": data,
        "split": "valid",
        "split_tokens": n_avail,
        "tokens_requested": tokens,
        "tokens_used": int(n_windows * seq_len),
        "seq_len": int(seq_len),
        "windows": int(n_windows),
        "bytes_per_token": float(split.bytes_per_token),
    }
    if n_windows * seq_len < tokens:
        info["note"] = (
            f"the valid split holds {n_avail} tokens; analysed {n_windows * seq_len} instead of "
            f"{tokens}"
        )
    return windows, info


@dataclass
class _Collected:
    layers: list[LayerCapture]
    lm_loss: float
    seconds: float


def _collect(
    loaded: _Loaded,
    windows: np.ndarray,
    batch_size: int,
    output_tokens: int,
    device: torch.device,
    progress: ProgressFn,
) -> _Collected:
    """Run the model over all windows inside a capture; mean next-token loss in nats."""
    t0 = time.perf_counter()
    model, adapter = loaded.model, loaded.adapter
    batches = [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]
    loss_sum, count = 0.0, 0
    with torch.no_grad(), adapter.capture(store_inputs=output_tokens) as cap:
        for batch in progress(batches, total=len(batches), desc=f"{loaded.name}: forward"):
            b = torch.from_numpy(batch).to(device)
            x, y = b[:, :-1], b[:, 1:]
            logits = model(input_ids=x, use_cache=False).logits
            loss_sum += float(
                F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            )
            count += y.numel()
        layers = cap.layers
    return _Collected(layers, loss_sum / max(count, 1), time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _offdiag_mean(m: np.ndarray) -> float:
    m = np.asarray(m, dtype=np.float64)
    if m.shape[0] < 2:
        return float("nan")
    return float(m[~np.eye(m.shape[0], dtype=bool)].mean())


def _adjacent_mean(m: np.ndarray) -> float:
    m = np.asarray(m, dtype=np.float64)
    if m.shape[0] < 2:
        return float("nan")
    return float(np.diag(m, 1).mean())


def _nanmean(values: Iterable[float | None]) -> float:
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _routing_metrics(layers: list[LayerCapture], spec_num_experts: int) -> dict:
    probs = [lc.probs.numpy() for lc in layers]
    topk = [lc.topk_idx.numpy() for lc in layers]
    per_layer = []
    for lc, p, t in zip(layers, probs, topk):
        m = R.routing_layer_metrics(p, t)
        m["layer_index"] = lc.layer_index
        m["choice_entropy"] = R.choice_entropy(t, spec_num_experts)
        per_layer.append(m)
    out: dict[str, Any] = {"per_layer": per_layer}
    if len({p.shape[1] for p in probs}) == 1:
        out["mi_binned"] = R.binned_mutual_information_matrix(probs)
        out["mi_index"] = R.index_mutual_information_matrix(topk, spec_num_experts)
        out["mi_index_topk"] = R.index_mutual_information_matrix(
            topk, spec_num_experts, use_topk=True
        )
    e, k = spec_num_experts, int(topk[0].shape[1])
    summary = {
        "num_tokens": int(probs[0].shape[0]),
        "mean_entropy": _nanmean(m["entropy"]["mean"] for m in per_layer),
        "mean_entropy_normalized": _nanmean(m["entropy"]["mean_normalized"] for m in per_layer),
        "inner_balance_mean": _nanmean(m["inner_balance"] for m in per_layer),
        "outer_balance_mean": _nanmean(m["outer_balance"] for m in per_layer),
        "outer_balance_uniform": k / e,
        "load_cv_mean": _nanmean(m["load"]["cv"] for m in per_layer),
        "load_max_violation_max": max(m["load"]["max_violation"] for m in per_layer),
        "unused_experts_total": int(sum(m["load"]["unused"] for m in per_layer)),
    }
    if "mi_binned" in out:
        summary.update(
            mi_binned_offdiag_mean=_offdiag_mean(out["mi_binned"]),
            mi_binned_adjacent_mean=_adjacent_mean(out["mi_binned"]),
            mi_index_offdiag_mean=_offdiag_mean(out["mi_index"]),
            mi_index_adjacent_mean=_adjacent_mean(out["mi_index"]),
            choice_entropy_mean=_nanmean(m["choice_entropy"] for m in per_layer),
        )
    out["summary"] = summary
    return out


def _chunks(n: int, size: int) -> Iterable[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def _dynamic_metrics(
    adapter: MoEAdapter, i: int, w: ExpertWeights, lc: LayerCapture
) -> dict[str, Any]:
    """Expert outputs on the stored inputs: output similarity, rank counts, activation ratio."""
    x = lc.inputs
    if x is None or x.shape[0] == 0:
        return {"skipped": "no MoE inputs were stored (output_tokens = 0)"}
    e, f, d = w.act.shape
    n = int(x.shape[0])
    scores = lc.scores[:n]
    chunk = max(1, _OUTPUT_CHUNK_FLOATS // (e * max(d, f)))
    cos_sum = np.zeros((e, e))
    ang_sum = np.zeros((e, e))
    counts = np.zeros((e, e), dtype=np.int64)
    active = np.zeros(e)
    norm_sum = np.zeros(e)
    chosen_norm, other_norm = 0.0, 0.0
    k = lc.topk_idx.shape[1]
    for sl in _chunks(n, chunk):
        outs, acts = adapter.expert_outputs(i, x[sl], with_activations=True, weights=w)
        m = sl.stop - sl.start
        sim = X.expert_output_similarity(outs)
        cos_sum += sim.cosine * m
        ang_sum += sim.angular * m
        norms = X.expert_output_norms(outs)  # [m, E]
        counts += X.norm_score_rank_counts(norms, scores[sl])
        active += (acts.abs() > _ACTIVE_THRESHOLD).float().mean(dim=2).sum(dim=1).cpu().numpy()
        norm_sum += norms.sum(axis=0)
        chosen = np.zeros_like(norms, dtype=bool)
        np.put_along_axis(chosen, lc.topk_idx[sl].numpy(), True, axis=1)
        chosen_norm += float(norms[chosen].sum())
        other_norm += float(norms[~chosen].sum())
    cosine, angular = cos_sum / n, ang_sum / n
    np.fill_diagonal(angular, 1.0)
    per_expert = active / n
    return {
        "num_tokens": n,
        "output_similarity": {"cosine": cosine, "angular": angular},
        "output_cosine_offdiag_mean": _offdiag_mean(cosine),
        "output_angular_offdiag_mean": _offdiag_mean(angular),
        "rank_counts": counts,
        "rank_agreement": X.rank_count_agreement(counts),
        "top1_score_is_top1_norm": float(counts[0, 0] / n),
        "mean_output_norm": norm_sum / n,
        "chosen_vs_other_norm_ratio": (chosen_norm / (n * k))
        / max(other_norm / (n * (e - k)), 1e-12)
        if e > k
        else float("nan"),
        "activation_ratio": float(per_expert.mean()),
        "activation_ratio_per_expert": per_expert,
    }


def _expert_layer_metrics(
    adapter: MoEAdapter,
    i: int,
    lc: LayerCapture,
    match_pairs: str,
    with_neuron_pca: bool,
    rng: np.random.Generator,
) -> dict[str, Any]:
    w0 = adapter.expert_weights(i)
    w = ExpertWeights(
        *(getattr(w0, t).detach().float() for t in MATRIX_TYPES),
        shared=None if w0.shared is None else {t: v.detach().float() for t, v in w0.shared.items()},
        layout=w0.layout,
    )
    mats = w.as_dict()
    e = w.num_experts
    out: dict[str, Any] = {"layer_index": lc.layer_index, "num_experts": e}
    out["weight_similarity"] = {t: X.expert_cosine_similarity(m) for t, m in mats.items()}
    out["weight_similarity_offdiag_mean"] = {
        t: _offdiag_mean(s) for t, s in out["weight_similarity"].items()
    }
    nav = {}
    for t, m in mats.items():
        items = [m] if w.shared is None else [m, w.shared[t]]
        nav[t] = X.neuron_averaged_similarity(items)
    out["neuron_avg_similarity"] = nav
    out["neuron_avg_includes_shared"] = w.shared is not None
    out["neuron_avg_similarity_offdiag_mean"] = {
        t: _offdiag_mean(s[:e, :e]) for t, s in nav.items()
    }
    if e >= 2 and match_pairs != "none":
        matching: dict[str, Any] = {}
        for t, m in mats.items():
            res = X.match_expert_pairs(m, match_pairs)
            matching[t] = {
                "pairs": [r.to_dict() for r in res],
                "flat_cosine_before_mean": _nanmean(r.flat_cosine_before for r in res),
                "flat_cosine_after_mean": _nanmean(r.flat_cosine_after for r in res),
                "kendall_tau_mean": _nanmean(r.kendall_tau for r in res),
            }
        out["neuron_matching"] = matching
    router_w = adapter.router_weight(i).detach().float()
    out["router_space"] = adapter.layers[i].router_space
    if e >= 3:
        try:
            fits = X.router_similarity_regression(router_w, mats)
            out["router_regression"] = {t: f.to_dict() for t, f in fits.items()}
        except ValueError as exc:
            out["router_regression"] = {"skipped": str(exc)}
    out["router_similarity_offdiag_mean"] = _offdiag_mean(X.expert_cosine_similarity(router_w))
    if e >= 2:
        out["pca_experts"] = {t: X.expert_pca(m, "flat") for t, m in mats.items()}
    if with_neuron_pca:
        f_dim = w.act.shape[1]
        take = min(f_dim, _NEURONS_PER_EXPERT_PCA)
        idx = torch.as_tensor(np.sort(rng.choice(f_dim, size=take, replace=False)))
        idx = idx.to(w.act.device)
        out["pca_neurons_act"] = X.neuron_pca(w.act[:, idx])
        out["pca_neurons_sampled_per_expert"] = take
    out["diversity_score"] = X.expert_diversity_score(list(mats.values()))
    out["diversity_score_normalized"] = out["diversity_score"] / len(mats)
    out["dynamic"] = _dynamic_metrics(adapter, i, w, lc)
    return out


def _expert_summary(per_layer: list[dict]) -> dict[str, float]:
    s: dict[str, float] = {}
    for t in MATRIX_TYPES:
        s[f"weight_cos_{t}"] = _nanmean(m["weight_similarity_offdiag_mean"][t] for m in per_layer)
        s[f"neuron_avg_cos_{t}"] = _nanmean(
            m["neuron_avg_similarity_offdiag_mean"][t] for m in per_layer
        )
        s[f"router_r2_{t}"] = _nanmean(
            m.get("router_regression", {}).get(t, {}).get("r2") for m in per_layer
        )
        s[f"matching_gain_{t}"] = _nanmean(
            m["neuron_matching"][t]["flat_cosine_after_mean"]
            - m["neuron_matching"][t]["flat_cosine_before_mean"]
            for m in per_layer
            if "neuron_matching" in m
        )
        s[f"matching_tau_{t}"] = _nanmean(
            m["neuron_matching"][t]["kendall_tau_mean"] for m in per_layer if "neuron_matching" in m
        )
    s["diversity_score"] = _nanmean(m["diversity_score"] for m in per_layer)
    dyn = [m["dynamic"] for m in per_layer if "skipped" not in m["dynamic"]]
    if dyn:
        s["output_angular_sim"] = _nanmean(d["output_angular_offdiag_mean"] for d in dyn)
        s["output_cosine_sim"] = _nanmean(d["output_cosine_offdiag_mean"] for d in dyn)
        s["rank_agreement"] = _nanmean(d["rank_agreement"] for d in dyn)
        s["top1_score_is_top1_norm"] = _nanmean(d["top1_score_is_top1_norm"] for d in dyn)
        s["chosen_vs_other_norm_ratio"] = _nanmean(d["chosen_vs_other_norm_ratio"] for d in dyn)
        s["activation_ratio"] = _nanmean(d["activation_ratio"] for d in dyn)
    return s


def _router_gradients(loaded: _Loaded, windows: np.ndarray, device: torch.device) -> dict:
    """‖∇ router‖ from the LM loss and from the balance loss, separately, on one batch."""
    model, adapter = loaded.model, loaded.adapter
    per_layer = [adapter.router_parameters(i) for i in range(adapter.num_layers)]
    shared = adapter.shared_router_parameters()
    params = [p for ps in per_layer for p in ps] + shared
    if not params:
        return {"skipped": "the routers have no trainable parameters"}
    b = torch.from_numpy(windows).to(device)
    x, y = b[:, :-1], b[:, 1:]
    with torch.enable_grad():
        out = model(input_ids=x, use_cache=False, output_router_logits=True)
        lm = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        aux = getattr(out, "aux_loss", None)
        g_lm = torch.autograd.grad(lm, params, retain_graph=aux is not None, allow_unused=True)
        g_aux = (
            torch.autograd.grad(aux, params, allow_unused=True)
            if aux is not None and aux.requires_grad
            else None
        )

    def norms(grads: Sequence[torch.Tensor | None] | None) -> dict | None:
        if grads is None:
            return None
        sq = [0.0 if g is None else float(g.double().pow(2).sum()) for g in grads]
        out_layers, pos = [], 0
        for ps in per_layer:
            out_layers.append(math.sqrt(sum(sq[pos : pos + len(ps)])))
            pos += len(ps)
        cell = math.sqrt(sum(sq[pos:])) if shared else None
        return {"per_layer": out_layers, "shared_cell": cell, "total": math.sqrt(sum(sq))}

    is_rmoe = adapter.family == "rmoe"
    result = {
        "num_tokens": int(y.numel()),
        "lm_loss": float(lm.detach()),
        "balance_loss": None if aux is None else float(aux.detach()),
        "balance_loss_definition": (
            "rmoe: Switch loss E·Σ f_e P_e per MoE layer, averaged over layers (unscaled)"
            if is_rmoe
            else "transformers load_balancing_loss_func (pooled over layers, unscaled)"
        ),
        "lm": norms(g_lm),
        "balance": norms(g_aux),
    }
    if aux is None:
        result["note"] = "the model returned no aux_loss, so balance-loss gradients are missing"
    model.zero_grad(set_to_none=True)
    return result


def _agreement(a: list[LayerCapture], b: list[LayerCapture]) -> list[dict]:
    out = []
    for la, lb in zip(a, b):
        ag = R.routing_agreement(la.topk_idx.numpy(), lb.topk_idx.numpy()).to_dict()
        ag["layer_index_a"], ag["layer_index_b"] = la.layer_index, lb.layer_index
        ag["chance_top1"] = 1.0 / la.probs.shape[1]
        out.append(ag)
    return out


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _plot_layers(num_layers: int) -> list[int]:
    if num_layers <= _MAX_PLOT_LAYERS:
        return list(range(num_layers))
    return sorted({round(v) for v in np.linspace(0, num_layers - 1, _MAX_PLOT_LAYERS)})


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}"


def _both(metrics: list[dict], getter: Callable[[dict], Any], digits: int = 3) -> str:
    """ "name1 v1, name2 v2" for one number of every model."""
    parts = []
    for m in metrics:
        try:
            v = getter(m)
        except (KeyError, TypeError, IndexError):
            v = None
        parts.append(f"{m['name']} {_fmt(v, digits)}")
    return ", ".join(parts)


def _write_figures(
    out_dir: Path,
    models: list[dict],
    captures: list[list[LayerCapture]],
    agreement: list[dict] | None,
    progress: ProgressFn,
    timing: dict[str, float],
) -> list[tuple[Path, str, str]]:
    fig_dir = out_dir / "figures"
    names = [m["name"] for m in models]
    two = len(models) == 2
    pair = (names[0], names[1]) if two else ("A", "B")
    figs: list[tuple[Path, str, str]] = []
    rs = [m["routing"] for m in models]
    es = [m["experts"] for m in models]
    e0 = models[0]["adapter"]["routing"]["num_experts"]

    steps: list[Callable[[], None]] = []

    def add(path: Path, title: str, reading: str) -> None:
        figs.append((path, title, reading))

    def load() -> None:
        counts = [[np.asarray(m["load"]["counts"]) for m in r["per_layer"]] for r in rs]
        p = P.plot_load_bars(
            fig_dir / "load.png",
            counts[0],
            layer_names=[f"layer {m['layer_index']}" for m in rs[0]["per_layer"]]
            if not two or len(counts[1]) <= len(counts[0])
            else None,
            second=counts[1] if two else None,
            names=pair,
        )
        add(
            p,
            "Expert load per layer",
            "Load coefficient of variation (0 = balanced), mean over layers: "
            + _both(models, lambda m: m["routing"]["summary"]["load_cv_mean"])
            + "; unused experts: "
            + _both(models, lambda m: m["routing"]["summary"]["unused_experts_total"])
            + ".",
        )

    def entropy() -> None:
        summaries = [
            [R.entropy_summary(R.router_entropy(lc.probs.numpy()), lc.probs.shape[1]) for lc in c]
            for c in captures
        ]
        second = summaries[1] if two and len(summaries[1]) == len(summaries[0]) else None
        p = P.plot_entropy_histograms(
            fig_dir / "entropy.png",
            summaries[0],
            e0,
            layer_names=[f"layer {lc.layer_index}" for lc in captures[0]],
            second=second,
            names=pair,
        )
        add(
            p,
            "Router entropy per layer",
            "Mean router entropy as a share of ln E (1 = uniform, 0 = one expert): "
            + _both(models, lambda m: m["routing"]["summary"]["mean_entropy_normalized"])
            + "; lower means more confident routing.",
        )

    def balance() -> None:
        def panels(r: dict) -> dict:
            pl = r["per_layer"]
            return {
                "inner balance IB (median top1/top2)": {"IB": [m["inner_balance"] for m in pl]},
                "outer balance OB (median selected mass)": {"OB": [m["outer_balance"] for m in pl]},
                "load CV": {"CV": [m["load"]["cv"] for m in pl]},
                "entropy / ln E": {"H": [m["entropy"]["mean_normalized"] for m in pl]},
            }

        extra = {}
        if agreement:
            extra = {
                "routing agreement A vs B": {
                    "top-1": [a["top1_agreement"] for a in agreement],
                    "Jaccard top-k": [a["mean_jaccard"] for a in agreement],
                }
            }
        first = {**panels(rs[0]), **extra}
        p = P.plot_layer_curves(
            fig_dir / "routing_summary.png",
            first,
            second=panels(rs[1]) if two else None,
            names=pair,
            title="Routing balance per layer",
            reference={
                "outer balance OB (median selected mass)": rs[0]["summary"][
                    "outer_balance_uniform"
                ],
                "inner balance IB (median top1/top2)": 1.0,
            },
        )
        reading = (
            "IB (1 = top-2 as strong as top-1): "
            + _both(models, lambda m: m["routing"]["summary"]["inner_balance_mean"])
            + "; OB (uniform = k/E = "
            + _fmt(rs[0]["summary"]["outer_balance_uniform"])
            + "): "
            + _both(models, lambda m: m["routing"]["summary"]["outer_balance_mean"])
        )
        if agreement:
            reading += "; top-1 agreement between the two models: " + _fmt(
                _nanmean(a["top1_agreement"] for a in agreement)
            )
            reading += f" (chance {_fmt(agreement[0]['chance_top1'])})"
        add(p, "Balance, entropy and agreement per layer", reading + ".")

    def mi(key: str, title: str, reading_head: str) -> Callable[[], None]:
        def draw() -> None:
            if key not in rs[0]:
                return
            labels = [f"L{lc.layer_index}" for lc in captures[0]]
            second = rs[1].get(key) if two else None
            p = P.plot_heatmap(
                fig_dir / f"{key}.png",
                rs[0][key],
                title=names[0],
                labels=labels if second is None or len(second) == len(labels) else None,
                second=second,
                second_title=names[1] if two else "",
                colorbar_label="nats",
                annotate=len(labels) <= 8,
            )
            add(
                p,
                title,
                reading_head
                + _both(models, lambda m: m["routing"]["summary"][f"{key}_offdiag_mean"])
                + " nats (adjacent layers: "
                + _both(models, lambda m: m["routing"]["summary"][f"{key}_adjacent_mean"])
                + ").",
            )

        draw.__name__ = key
        return draw

    def weight_grid(kind: str, title: str, reading: str) -> Callable[[], None]:
        def draw() -> None:
            rows, row_names, ticks = [], [], []
            for m in models:
                pl = m["experts"]["per_layer"]
                sel = _plot_layers(len(pl))
                for t in MATRIX_TYPES:
                    rows.append([np.asarray(pl[j][kind][t]) for j in sel])
                    row_names.append(f"{m['name']} · {t}")
                    e = pl[0]["num_experts"]
                    n_all = np.asarray(pl[0][kind][t]).shape[0]
                    ticks.append(
                        [str(j) for j in range(e)] + ["SE"] * (n_all - e) if n_all <= 16 else None
                    )
            cols = max(len(r) for r in rows)
            col_names = [
                f"layer {models[0]['experts']['per_layer'][j]['layer_index']}"
                for j in _plot_layers(len(models[0]["experts"]["per_layer"]))
            ]
            col_names += [""] * (cols - len(col_names))
            p = P.plot_matrix_grid(
                fig_dir / f"{kind}.png",
                rows,
                row_names,
                col_names[:cols],
                title=title,
                vmin=-1.0 if kind == "weight_similarity" else None,
                vmax=1.0,
                cmap="RdBu_r",
                colorbar_label="cosine",
                tick_labels=ticks,
            )
            add(p, title, reading)

        draw.__name__ = kind
        return draw

    def output_grid() -> None:
        rows, row_names = [], []
        for m in models:
            pl = m["experts"]["per_layer"]
            rows.append(
                [
                    None
                    if "skipped" in pl[j]["dynamic"]
                    else np.asarray(pl[j]["dynamic"]["output_similarity"]["angular"])
                    for j in _plot_layers(len(pl))
                ]
            )
            row_names.append(m["name"])
        if not any(x is not None for r in rows for x in r):
            return
        pl0 = models[0]["experts"]["per_layer"]
        p = P.plot_matrix_grid(
            fig_dir / "output_similarity.png",
            rows,
            row_names,
            [f"layer {pl0[j]['layer_index']}" for j in _plot_layers(len(pl0))]
            + [""] * (max(len(r) for r in rows) - len(_plot_layers(len(pl0)))),
            title="Expert output similarity on real tokens (angular, 1 - arccos(cos)/π)",
            vmin=0.0,
            vmax=1.0,
            cmap="magma",
            colorbar_label="angular similarity",
        )
        add(
            p,
            "Expert output similarity",
            "Mean off-diagonal angular similarity of expert outputs (0.5 = orthogonal): "
            + _both(models, lambda m: m["experts"]["summary"]["output_angular_sim"])
            + "; cosine: "
            + _both(models, lambda m: m["experts"]["summary"]["output_cosine_sim"])
            + ".",
        )

    def ranks() -> None:
        rows, row_names = [], []
        for m in models:
            pl = [x for x in m["experts"]["per_layer"] if "skipped" not in x["dynamic"]]
            if not pl:
                continue
            shares = [
                np.asarray(x["dynamic"]["rank_counts"], dtype=float) / x["dynamic"]["num_tokens"]
                for x in pl
            ]
            rows.append([shares[j] for j in _plot_layers(len(pl))] + [np.mean(shares, axis=0)])
            row_names.append(m["name"])
        if not rows:
            return
        pl0 = models[0]["experts"]["per_layer"]
        cols = [f"layer {pl0[j]['layer_index']}" for j in _plot_layers(len(pl0))]
        width = max(len(r) for r in rows)
        cols = cols[: width - 1] + [""] * (width - 1 - len(cols)) + ["mean of layers"]
        p = P.plot_matrix_grid(
            fig_dir / "rank_counts.png",
            rows,
            row_names,
            cols,
            title="Output-norm rank (rows) vs router-score rank (columns), rank 1 = top-left; "
            "share of tokens",
            vmin=0.0,
            cmap="magma",
            colorbar_label="share of tokens",
        )
        add(
            p,
            "Output-norm rank vs router-score rank",
            "Share of (token, expert) pairs whose output-norm rank equals their score rank "
            f"(chance 1/E = {_fmt(1 / e0)}): "
            + _both(models, lambda m: m["experts"]["summary"]["rank_agreement"])
            + "; top-scored expert has the largest norm: "
            + _both(models, lambda m: m["experts"]["summary"]["top1_score_is_top1_norm"])
            + "; a bright diagonal means the router prefers high-norm experts.",
        )

    def expert_curves() -> None:
        def panels(ex: dict) -> dict:
            pl = ex["per_layer"]

            def dyn(key: str) -> list:
                return [None if "skipped" in m["dynamic"] else m["dynamic"][key] for m in pl]

            return {
                "weight cosine (flattened)": {
                    t: [m["weight_similarity_offdiag_mean"][t] for m in pl] for t in MATRIX_TYPES
                },
                "neuron-averaged cosine": {
                    t: [m["neuron_avg_similarity_offdiag_mean"][t] for m in pl]
                    for t in MATRIX_TYPES
                },
                "router-vs-expert R²": {
                    t: [m.get("router_regression", {}).get(t, {}).get("r2") for m in pl]
                    for t in MATRIX_TYPES
                },
                "neuron matching: flat cosine after": {
                    t: [
                        m["neuron_matching"][t]["flat_cosine_after_mean"]
                        if "neuron_matching" in m
                        else None
                        for m in pl
                    ]
                    for t in MATRIX_TYPES
                },
                "neuron matching: Kendall τ": {
                    t: [
                        m["neuron_matching"][t]["kendall_tau_mean"]
                        if "neuron_matching" in m
                        else None
                        for m in pl
                    ]
                    for t in MATRIX_TYPES
                },
                "diversity score (lower = diverse)": {
                    "score / 3": [m["diversity_score_normalized"] for m in pl]
                },
                "output similarity": {
                    "angular": dyn("output_angular_offdiag_mean"),
                    "cosine": dyn("output_cosine_offdiag_mean"),
                },
                "activation ratio |a| > 1e-3": {"ratio": dyn("activation_ratio")},
            }

        p = P.plot_layer_curves(
            fig_dir / "expert_summary.png",
            panels(es[0]),
            second=panels(es[1]) if two else None,
            names=pair,
            title="Expert analyses per layer",
        )
        add(
            p,
            "Expert similarity, matching, R², diversity and activations per layer",
            "Router-vs-expert R² (act/up/down): "
            + "; ".join(
                f"{m['name']} "
                + "/".join(_fmt(m["experts"]["summary"][f"router_r2_{t}"], 2) for t in MATRIX_TYPES)
                for m in models
            )
            + " (Closer-Look: act highest); diversity score: "
            + _both(models, lambda m: m["experts"]["summary"]["diversity_score"])
            + "; activation ratio: "
            + _both(models, lambda m: m["experts"]["summary"]["activation_ratio"])
            + ".",
        )

    def pca_figs() -> None:
        rows, row_names, neuron_rows = [], [], []
        for m in models:
            pl = m["experts"]["per_layer"]
            sel = _plot_layers(len(pl))
            rows.append(
                [
                    (pl[j]["pca_experts"]["act"].coords, np.arange(pl[j]["num_experts"]))
                    if "pca_experts" in pl[j]
                    else None
                    for j in sel
                ]
            )
            neuron_rows.append(
                [
                    (pl[j]["pca_neurons_act"].coords, pl[j]["pca_neurons_act"].labels)
                    if "pca_neurons_act" in pl[j]
                    else None
                    for j in sel
                ]
            )
            row_names.append(m["name"])
        pl0 = models[0]["experts"]["per_layer"]
        cols = [f"layer {pl0[j]['layer_index']}" for j in _plot_layers(len(pl0))]
        width = max(len(r) for r in rows)
        cols += [""] * (width - len(cols))
        if any(x is not None for r in rows for x in r):
            p = P.plot_scatter_grid(
                fig_dir / "pca_experts.png",
                rows,
                row_names,
                cols,
                title="PCA of experts (flattened act matrices, standardised)",
                annotate=True,
            )
            ev = _both(
                models,
                lambda m: float(
                    np.mean(
                        [
                            x["pca_experts"]["act"].explained_variance_ratio[:2].sum()
                            for x in m["experts"]["per_layer"]
                        ]
                    )
                ),
            )
            add(
                p,
                "PCA of experts",
                "Variance explained by the first two components (act, mean over layers): "
                + ev
                + "; clusters mark experts with shared structure.",
            )
        if any(x is not None for r in neuron_rows for x in r):
            p = P.plot_scatter_grid(
                fig_dir / "pca_neurons.png",
                neuron_rows,
                row_names,
                cols,
                title="PCA of neurons (act rows, sampled per expert, coloured by expert)",
            )
            add(
                p,
                "PCA of neurons",
                "Each point is one neuron; intermixed colours mean neurons are not expert-"
                "specific (as in experts trained from scratch), separated colours mean "
                "expert-specific neuron directions.",
            )

    def grads() -> None:
        def panels(m: dict) -> dict | None:
            g = m.get("router_gradients", {})
            if "lm" not in g:
                return None
            return {
                "‖∇ router‖ per layer": {
                    "LM loss": g["lm"]["per_layer"],
                    "balance loss": g["balance"]["per_layer"] if g.get("balance") else [],
                }
            }

        first = panels(models[0])
        second = panels(models[1]) if two else None
        if first is None and second is None:
            return
        p = P.plot_layer_curves(
            fig_dir / "router_grads.png",
            first or {},
            second=second,
            names=pair,
            title="Router gradient norms on one batch",
            log_panels=["‖∇ router‖ per layer"],
        )

        def total(which: str) -> Callable[[dict], Any]:
            return lambda m: (m["router_gradients"].get(which) or {}).get("total")

        def cell(m: dict) -> Any:
            return (m["router_gradients"].get("lm") or {}).get("shared_cell")

        add(
            p,
            "Router gradient norms (LM vs balance loss)",
            "Total router gradient norm from the LM loss: "
            + _both(models, total("lm"))
            + "; from the (unscaled) balance loss: "
            + _both(models, total("balance"))
            + "; of which the shared recurrent cell (LM): "
            + _both(models, cell)
            + ".",
        )

    steps = [
        load,
        entropy,
        balance,
        mi(
            "mi_binned",
            "Cross-layer MI: binned router profiles (RMoE estimator)",
            "Mean off-diagonal MI of the per-token binned softmax profiles (biased upward with "
            "only E samples per token; compare models on the same tokens): ",
        ),
        mi(
            "mi_index",
            "Cross-layer MI: chosen-expert indices",
            "Mean off-diagonal MI between layers' top-1 expert choices over tokens (0 = "
            "independent; diagonal = choice entropy): ",
        ),
        weight_grid(
            "weight_similarity",
            "Expert weight similarity (cosine of flattened matrices)",
            "Mean off-diagonal cosine, act matrices: "
            + _both(models, lambda m: m["experts"]["summary"]["weight_cos_act"])
            + " (≈ 0 for experts trained from scratch, high for upcycled ones).",
        ),
        weight_grid(
            "neuron_avg_similarity",
            "Neuron-averaged expert similarity (SE = shared expert)",
            "Mean off-diagonal cosine of neuron-averaged act vectors: "
            + _both(models, lambda m: m["experts"]["summary"]["neuron_avg_cos_act"])
            + "; matching neurons raises flat act cosine by "
            + _both(models, lambda m: m["experts"]["summary"]["matching_gain_act"], 2)
            + " (Kendall τ "
            + _both(models, lambda m: m["experts"]["summary"]["matching_tau_act"], 2)
            + ").",
        ),
        output_grid,
        ranks,
        expert_curves,
        pca_figs,
        grads,
    ]
    for step in progress(steps, total=len(steps), desc="figures"):
        t0 = time.perf_counter()
        step()
        timing[f"figure: {step.__name__}"] = time.perf_counter() - t0
    return figs


# --------------------------------------------------------------------------------------------
# the whole analysis
# --------------------------------------------------------------------------------------------


def _key_numbers(model: dict) -> dict[str, Any]:
    rs, es = model["routing"]["summary"], model["experts"]["summary"]
    g = model.get("router_gradients", {})
    return {
        "lm_loss": model["lm_loss"],
        "entropy_normalized": rs["mean_entropy_normalized"],
        "inner_balance": rs["inner_balance_mean"],
        "outer_balance": rs["outer_balance_mean"],
        "load_cv": rs["load_cv_mean"],
        "mi_binned_offdiag": rs.get("mi_binned_offdiag_mean"),
        "mi_index_offdiag": rs.get("mi_index_offdiag_mean"),
        "weight_cos_act": es["weight_cos_act"],
        "router_r2_act": es["router_r2_act"],
        "diversity_score": es["diversity_score"],
        "output_angular_sim": es.get("output_angular_sim"),
        "rank_agreement": es.get("rank_agreement"),
        "activation_ratio": es.get("activation_ratio"),
        "router_grad_lm": (g.get("lm") or {}).get("total"),
        "router_grad_balance": (g.get("balance") or {}).get("total"),
    }


def analyze(
    paths: Sequence[str | Path],
    data: str = "python-stdlib",
    tokens: int = 65536,
    out_dir: str | Path = "analysis",
    seq_len: int = 256,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    output_tokens: int = 4096,
    match_pairs: str = "nearest",
    dtype: str | torch.dtype | None = None,
    grad_batch_size: int = 8,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    seed: int = 0,
) -> dict:
    """Analyse one or two MoE checkpoints and write ``metrics.json``, figures and ``report.html``.

    Args:
        paths: one or two model directories (or rmoe run directories, see
            :func:`resolve_model_dir`).
        data: corpus spec for :func:`rmoe.data.get_corpus` (the valid split is used).
        tokens: tokens to analyse (N, split into windows of ``seq_len``).
        out_dir: output folder (created).
        seq_len: window length T (clamped to the model's ``max_position_embeddings``).
        batch_size: windows per forward pass.
        device: "cpu", "cuda", ... (default: CUDA when available, else CPU).
        output_tokens: tokens (the first ones) on which every expert is run for the output
            similarity, rank and activation analyses (0 = skip them).
        match_pairs: expert pairs for neuron matching ("nearest", "all", "adjacent"; see
            :func:`rmoe.analysis.experts.select_pairs`), or "none" to skip it (e.g. for
            Mixtral's F = 14336, where one assignment takes minutes).
        dtype: weights dtype ("float32", "bfloat16", "float16" or a torch dtype; default
            float32 on CPU and bfloat16 on CUDA). Routing math is float32 either way.
        grad_batch_size: windows in the router-gradient batch (0 = skip).
        cache_dir: token cache folder (default: the data pipeline's).
        progress: a ``tqdm``-like callable for progress bars (default: none).
        seed: seed of the neuron sampling for the neuron PCA.

    Returns:
        The metrics dict as written to ``metrics.json`` plus ``"outputs"``: paths of
        ``report.html``, ``metrics.json`` and every figure, and ``"key_numbers"`` per model.

    Raises:
        FileNotFoundError: a path does not exist or holds no model.
        ValueError: more than two paths, an unsupported model family, bad arguments.
    """
    t_start = time.perf_counter()
    paths = [str(p) for p in paths]
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"give one or two model paths; got {len(paths)}")
    if tokens < 1 or seq_len < 1 or batch_size < 1 or output_tokens < 0 or grad_batch_size < 0:
        raise ValueError(
            "tokens, seq_len and batch_size must be >= 1 and output_tokens, grad_batch_size >= 0; "
            f"got tokens={tokens}, seq_len={seq_len}, batch_size={batch_size}, "
            f"output_tokens={output_tokens}, grad_batch_size={grad_batch_size}"
        )
    for p in paths:  # fail fast, before loading anything
        resolve_model_dir(p)
    progress = progress or _no_progress
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _resolve_dtype(dtype, dev)
    if match_pairs not in ("nearest", "all", "adjacent", "none"):
        raise ValueError(
            f"match_pairs must be 'nearest', 'all', 'adjacent' or 'none'; got {match_pairs!r}"
        )
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = _model_names(paths)

    models: list[dict] = []
    captures: list[list[LayerCapture]] = []
    windows_all: list[np.ndarray] = []
    timing: dict[str, float] = {}
    for name, path in zip(names, paths):
        t0 = time.perf_counter()
        model, tokenizer, info = load_for_analysis(path, dev, torch_dtype)
        adapter = get_adapter(model)
        loaded = _Loaded(name, path, Path(info["model_dir"]), model, adapter, tokenizer, info)
        max_pos = int(getattr(model.config, "max_position_embeddings", seq_len) or seq_len)
        windows, data_info = _token_windows(
            tokenizer, data, tokens, min(seq_len, max_pos), cache_dir
        )
        timing[f"{name}: load"] = time.perf_counter() - t0
        logger.info("%s: %s, %d windows of %d tokens", name, adapter.family, *windows.shape)

        collected = _collect(loaded, windows, batch_size, output_tokens, dev, progress)
        timing[f"{name}: forward"] = collected.seconds

        t0 = time.perf_counter()
        spec = adapter.spec
        routing = _routing_metrics(collected.layers, spec.num_experts)
        timing[f"{name}: routing metrics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        per_layer = [
            _expert_layer_metrics(adapter, i, lc, match_pairs, True, rng)
            for i, lc in progress(
                list(enumerate(collected.layers)),
                total=len(collected.layers),
                desc=f"{name}: experts",
            )
        ]
        timing[f"{name}: expert metrics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        grads: dict[str, Any]
        if grad_batch_size:
            grads = _router_gradients(loaded, windows[:grad_batch_size], dev)
        else:
            grads = {"skipped": "grad_batch_size = 0"}
        timing[f"{name}: router gradients"] = time.perf_counter() - t0

        models.append(
            {
                "name": name,
                "path": path,
                **info,
                "adapter": adapter.describe(),
                "data": data_info,
                "lm_loss": collected.lm_loss,
                "bits_per_byte": collected.lm_loss / math.log(2) / data_info["bytes_per_token"],
                "routing": routing,
                "experts": {"per_layer": per_layer, "summary": _expert_summary(per_layer)},
                "router_gradients": grads,
            }
        )
        captures.append(collected.layers)
        windows_all.append(windows)
        del loaded, model

    comparison: dict[str, Any] | None = None
    agreement = None
    if len(models) == 2:
        same_tokens = windows_all[0].shape == windows_all[1].shape and np.array_equal(
            windows_all[0], windows_all[1]
        )
        same_layers = len(captures[0]) == len(captures[1]) and all(
            a.probs.shape[1] == b.probs.shape[1] for a, b in zip(*captures)
        )
        comparison = {"same_tokens": bool(same_tokens), "same_layer_shapes": bool(same_layers)}
        if same_tokens and same_layers:
            agreement = _agreement(captures[0], captures[1])
            comparison["agreement"] = agreement
            comparison["top1_agreement_mean"] = _nanmean(a["top1_agreement"] for a in agreement)
            comparison["jaccard_mean"] = _nanmean(a["mean_jaccard"] for a in agreement)
        else:
            comparison["note"] = (
                "routing agreement needs the same tokens (same tokenizer) and the same number of "
                "MoE layers and experts; not computed"
            )

    t0 = time.perf_counter()
    figures = _write_figures(out, models, captures, agreement, progress, timing)
    timing["figures"] = time.perf_counter() - t0

    key_numbers = {m["name"]: _key_numbers(m) for m in models}
    metrics: dict[str, Any] = {
        "settings": {
            "paths": paths,
            "data": data,
            "tokens": tokens,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "device": str(dev),
            "output_tokens": output_tokens,
            "match_pairs": match_pairs,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "grad_batch_size": grad_batch_size,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "key_numbers": key_numbers,
        "models": {m["name"]: m for m in models},
        "comparison": comparison,
    }
    timing["total_before_report"] = time.perf_counter() - t_start
    metrics["timing_seconds"] = timing
    title = "rmoe analysis: " + " vs ".join(names)
    t0 = time.perf_counter()
    report = write_report(out, metrics, figures, title=title)
    timing["report"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    logger.info("analysis written to %s in %.1f s", report, timing["total"])
    metrics["outputs"] = {
        "report": str(report),
        "metrics_json": str(out / "metrics.json"),
        "figures": [str(f[0]) for f in figures],
    }
    return metrics
