"""Evaluate and sample from a run directory or a saved model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import get_corpus, get_split_tokens
from ..evaluation import evaluate_split
from ..loading import context_limit, load_model
from ..runtime import model_device


def evaluate_path(
    path: str | Path,
    split: str = "valid",
    data: str | None = None,
    text_field: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int = 100,
    device: str = "auto",
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Loss, bits per byte and perplexity of a run/model on a corpus split."""
    model, tokenizer, run_cfg = load_model(path, device, tokenizer=tokenizer)
    data_cfg = (run_cfg or {}).get("data", {})
    corpus_spec = data or data_cfg.get("corpus", "python-stdlib")
    field = text_field or data_cfg.get("text_field", "text")
    seq_len = seq_len or data_cfg.get("seq_len", 256)
    limit = context_limit(model.config)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"--seq-len {seq_len} is longer than the model's max_position_embeddings={limit}; "
            f"pass --seq-len {limit} or less"
        )
    if model.config.vocab_size < tokenizer.vocab_size:  # a padded embedding (larger) is fine
        raise ValueError(
            f"the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size}); evaluate with the tokenizer the model was trained with"
        )
    corpus = get_corpus(corpus_spec, text_field=field)
    tokens = get_split_tokens(corpus, tokenizer, split, cache_dir=data_cfg.get("cache_dir"))
    dev = model_device(model)
    res = evaluate_split(model, tokens, seq_len, batch_size, max_batches or None, dev)
    return {
        "path": str(path),
        "corpus": corpus_spec,
        "split": split,
        "seq_len": seq_len,
        "bits_per": "byte" if not tokenizer.is_bytes else "byte (= character for ASCII)",
        **res,
    }


def generate_text(
    path: str | Path,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    device: str = "auto",
) -> str:
    """Prompt + continuation sampled with the KV cache (temperature 0 = greedy)."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    model, tokenizer, _ = load_model(path, device)
    dev = model_device(model)
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    limit = context_limit(model.config)
    if limit is not None and len(ids) + max_new_tokens > limit:
        room = limit - len(ids)
        raise ValueError(
            f"the prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} is longer "
            f"than the model's max_position_embeddings={limit}; "
            + (f"pass --max-new-tokens {room} or less" if room > 0 else "shorten the prompt")
        )
    x = torch.tensor([ids], device=dev)
    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
    )
    if temperature == 0:
        kw["do_sample"] = False
    else:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
    return tokenizer.decode(out[0, 1:].tolist(), skip_special_tokens=True)
