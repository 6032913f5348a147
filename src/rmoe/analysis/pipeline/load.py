"""Loading for the analysis: a model through :func:`rmoe.loading.load_model`, its adapter,
display names, and the token windows that are analysed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rmoe.analysis.adapters import MoEAdapter, get_adapter
from rmoe.analysis.pipeline.records import ModelSource, TokenData
from rmoe.loading import Loaded, load_model

__all__ = ["Subject", "load_for_analysis", "load_subject", "model_names", "token_windows"]

logger = logging.getLogger(__name__)


@dataclass
class Subject:
    """A model ready for analysis: its display name, the path given, what was loaded and the
    model's adapter."""

    name: str
    path: str
    loaded: Loaded
    adapter: MoEAdapter
    source: ModelSource

    @property
    def model(self) -> nn.Module:
        """The model, in eval mode on the analysis device."""
        return self.loaded.model


def _source(loaded: Loaded) -> ModelSource:
    return ModelSource(
        model_dir=str(loaded.model_dir),
        tokenizer_dir=None if loaded.tokenizer_dir is None else str(loaded.tokenizer_dir),
        tokenizer_fallback=loaded.tokenizer_fallback,
        tokenizer=repr(loaded.tokenizer),
        tokenizer_note=loaded.notes[0] if loaded.tokenizer_fallback else None,
    )


def load_subject(name: str, path: str, device: torch.device, dtype: torch.dtype) -> Subject:
    """Load ``path`` (a model or run directory; byte tokenizer when none is saved) and pick its
    adapter.

    Raises:
        FileNotFoundError: no model at ``path``.
        ValueError: an unreadable model or an unsupported MoE family.
    """
    loaded = load_model(path, device, dtype, missing_tokenizer="bytes")
    return Subject(name, path, loaded, get_adapter(loaded.model), _source(loaded))


def load_for_analysis(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any, dict]:
    """Load a model directory and its tokenizer (see :func:`rmoe.loading.load_model`).

    Returns:
        (model in eval mode on ``device``, tokenizer, info dict with ``model_dir``,
        ``tokenizer_dir`` and ``tokenizer_fallback`` — True when no tokenizer.json was found and
        the byte tokenizer is used).
    """
    loaded = load_model(path, device, dtype, missing_tokenizer="bytes")
    return loaded.model, loaded.tokenizer, _source(loaded).to_dict()


def model_names(paths: Sequence[str]) -> list[str]:
    """Display names: each path's folder name, prefixed "A: ", "B: " when they clash."""
    names = [Path(p).expanduser().resolve().name or "model" for p in paths]
    if len(set(names)) < len(names):
        names = [f"{chr(65 + i)}: {n}" for i, n in enumerate(names)]
    return names


def token_windows(
    tokenizer: Any,
    data: str,
    tokens: int,
    seq_len: int,
    cache_dir: str | Path | None,
) -> tuple[np.ndarray, TokenData]:
    """[W, T + 1] int64 windows (inputs + next token) covering ``tokens`` valid-split tokens.

    ``T`` is ``seq_len`` clamped to the tokens asked for and to the split's size; ``W`` is as
    many windows as fit (at least one).
    """
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
    note = None
    if n_windows * seq_len < tokens:
        note = (
            f"the valid split holds {n_avail} tokens; analysed {n_windows * seq_len} instead of "
            f"{tokens}"
        )
    info = TokenData(
        data=data,
        split="valid",
        split_tokens=n_avail,
        tokens_requested=tokens,
        tokens_used=int(n_windows * seq_len),
        seq_len=int(seq_len),
        windows=int(n_windows),
        bytes_per_token=float(split.bytes_per_token),
        note=note,
    )
    return windows, info
