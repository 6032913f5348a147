"""The whole analysis of one or two MoE checkpoints: ``metrics.json``, PNG figures, ``report.html``.

:func:`analyze` loads each model with :func:`rmoe.loading.load_model` (the byte tokenizer when
none is saved), takes ``tokens`` tokens from the valid split of a corpus through the data
pipeline, runs the model with a :class:`~rmoe.analysis.adapters.RoutingCapture`, and computes

* routing: load per layer, router-entropy distribution, inner/outer balance, both cross-layer
  mutual-information maps, and (two paths, same tokens) routing agreement;
* experts: flattened and neuron-averaged weight similarity, neuron matching, router-vs-expert
  R², PCA of experts and neurons, RMoE's diversity score, and on the first ``output_tokens``
  tokens every expert's output: output similarity, norm-rank vs score-rank counts and the
  activation ratio;
* router gradient norms from the LM loss and from the balance loss, separately, on one batch.

With two paths every figure shows both models side by side (or overlaid). Progress goes through
the ``progress`` callable (e.g. ``tqdm``) and ``logging``; nothing is printed.

The stages live in :mod:`rmoe.analysis.pipeline` (load -> capture -> metrics -> figures) and
:mod:`rmoe.analysis.report`; this module composes them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rmoe.analysis.adapters import LayerCapture
from rmoe.analysis.pipeline import metrics as M
from rmoe.analysis.pipeline.capture import ProgressFn, collect, no_progress
from rmoe.analysis.pipeline.figures import FigureResult, write_figures
from rmoe.analysis.pipeline.load import load_for_analysis, load_subject, model_names, token_windows
from rmoe.analysis.pipeline.records import Analysis, ModelRecord, Settings, Skipped
from rmoe.analysis.report import write_report
from rmoe.loading import context_limit, find_model_dir, find_tokenizer
from rmoe.runtime import resolve_device, resolve_dtype

__all__ = [
    "ProgressFn",
    "analyze",
    "find_tokenizer",
    "load_for_analysis",
    "resolve_model_dir",
]

logger = logging.getLogger(__name__)

resolve_model_dir = find_model_dir
"""The directory holding ``config.json`` for a model path or a run
(:func:`rmoe.loading.find_model_dir`; the name this module always had)."""

_MATCH_PAIRS = ("nearest", "all", "adjacent", "none")


def _check_counts(
    paths: Sequence[str], tokens: int, seq_len: int, batch_size: int, output: int, grads: int
) -> None:
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"give one or two model paths; got {len(paths)}")
    if tokens < 1 or seq_len < 1 or batch_size < 1 or output < 0 or grads < 0:
        raise ValueError(
            "tokens, seq_len and batch_size must be >= 1 and output_tokens, grad_batch_size >= 0; "
            f"got tokens={tokens}, seq_len={seq_len}, batch_size={batch_size}, "
            f"output_tokens={output}, grad_batch_size={grads}"
        )


def _analyse_model(
    name: str,
    path: str,
    settings: Settings,
    dtype: torch.dtype,
    cache_dir: str | Path | None,
    rng: np.random.Generator,
    progress: ProgressFn,
    timing: dict[str, float],
) -> tuple[ModelRecord, list[LayerCapture], np.ndarray]:
    """Load one model and run every stage on it; returns its record, its capture and the
    token windows [W, T + 1] it saw. Seconds per stage go into ``timing``."""
    dev = torch.device(settings.device)
    t0 = time.perf_counter()
    subject = load_subject(name, path, dev, dtype)
    seq_len = settings.seq_len
    max_pos = context_limit(subject.model.config) or seq_len
    if seq_len > max_pos:
        logger.warning(
            "%s: --seq-len %d is longer than its max_position_embeddings=%d; analysing windows "
            "of %d tokens", name, seq_len, max_pos, max_pos,
        )  # fmt: skip
    windows, data_info = token_windows(
        subject.loaded.tokenizer, settings.data, settings.tokens, min(seq_len, max_pos), cache_dir
    )
    timing[f"{name}: load"] = time.perf_counter() - t0
    adapter = subject.adapter
    logger.info("%s: %s, %d windows of %d tokens", name, adapter.family, *windows.shape)

    collected = collect(
        subject, windows, settings.batch_size, settings.output_tokens, dev, progress
    )
    timing[f"{name}: forward"] = collected.seconds
    t0 = time.perf_counter()
    routing = M.routing(collected.layers, adapter.spec.num_experts)
    timing[f"{name}: routing metrics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    experts = M.model_experts(subject, collected.layers, settings.match_pairs, rng, progress)
    timing[f"{name}: expert metrics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if settings.grad_batch_size:
        grads = M.router_gradients(subject, windows[: settings.grad_batch_size], dev)
    else:
        grads = Skipped("grad_batch_size = 0")
    timing[f"{name}: router gradients"] = time.perf_counter() - t0
    record = ModelRecord(
        name=name,
        path=path,
        source=subject.source,
        adapter=adapter.describe(),
        data=data_info,
        lm_loss=collected.lm_loss,
        bits_per_byte=collected.lm_loss / math.log(2) / data_info.bytes_per_token,
        routing=routing,
        experts=experts,
        router_gradients=grads,
    )
    return record, collected.layers, windows


def _report(
    out: Path, analysis: Analysis, figures: list[FigureResult], t_start: float
) -> dict[str, Any]:
    """Write metrics.json and report.html; the metrics dict with the paths under ``outputs``."""
    timing = analysis.timing
    metrics = analysis.to_dict()
    timing["total_before_report"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    title = "rmoe analysis: " + " vs ".join(m.name for m in analysis.models)
    report = write_report(out, metrics, figures, title=title)
    timing["report"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    logger.info("analysis written to %s in %.1f s", report, timing["total"])
    metrics["outputs"] = {
        "report": str(report),
        "metrics_json": str(out / "metrics.json"),
        "figures": [str(f.path) for f in figures],
    }
    return metrics


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
        device: "cpu", "cuda", ... (default: ``auto``, see :func:`rmoe.runtime.resolve_device`).
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
    _check_counts(paths, tokens, seq_len, batch_size, output_tokens, grad_batch_size)
    for p in paths:  # fail fast, before loading anything
        find_model_dir(p)
    progress = progress or no_progress
    dev = resolve_device(device or "auto")
    torch_dtype = resolve_dtype(dtype, dev)
    if match_pairs not in _MATCH_PAIRS:
        raise ValueError(
            f"match_pairs must be 'nearest', 'all', 'adjacent' or 'none'; got {match_pairs!r}"
        )
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = model_names(paths)
    settings = Settings(
        paths=paths,
        data=data,
        tokens=tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        device=str(dev),
        output_tokens=output_tokens,
        match_pairs=match_pairs,
        dtype=str(torch_dtype).removeprefix("torch."),
        grad_batch_size=grad_batch_size,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    timing: dict[str, float] = {}
    runs = [
        _analyse_model(n, p, settings, torch_dtype, cache_dir, rng, progress, timing)
        for n, p in zip(names, paths)
    ]
    models = [r[0] for r in runs]
    comparison = M.compare([r[2] for r in runs], [r[1] for r in runs]) if len(runs) == 2 else None

    t0 = time.perf_counter()
    figures = write_figures(out, models, comparison, progress, timing)
    timing["figures"] = time.perf_counter() - t0
    return _report(out, Analysis(settings, models, comparison, timing), figures, t_start)
