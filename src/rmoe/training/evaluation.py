"""Evaluate and sample from a run directory or a saved model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from ..data import build_tokenizer, get_corpus, get_split_tokens
from .trainer import evaluate_split, find_model_dir, resolve_device


def load_model_and_tokenizer(path: str | Path, device: str = "auto", tokenizer: str | None = None):
    """(model in eval mode on device, tokenizer, run config dict or None) for a run or model dir.

    `tokenizer` overrides the saved tokenizer (a tokenizer.json file or directory)."""
    from transformers import AutoModelForCausalLM

    import rmoe  # noqa: F401  (registers the Auto classes)

    model_dir = find_model_dir(path)
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(dev).eval()
    except (OSError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"could not load a model from {model_dir}: {first}") from exc
    if tokenizer is not None:
        tok = build_tokenizer(tokenizer)
    else:
        tok_dir = model_dir if (model_dir / "tokenizer.json").is_file() else Path(path)
        if not (tok_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {model_dir} or {path}; save the tokenizer next to the model"
            )
        tok = build_tokenizer(str(tok_dir))
    run_cfg = None
    for cand in (Path(path) / "config.yaml", model_dir / "config.yaml"):
        if cand.is_file():
            run_cfg = yaml.safe_load(cand.read_text())
            break
    return model, tok, run_cfg


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
    model, tokenizer, run_cfg = load_model_and_tokenizer(path, device, tokenizer)
    data_cfg = (run_cfg or {}).get("data", {})
    corpus_spec = data or data_cfg.get("corpus", "python-stdlib")
    field = text_field or data_cfg.get("text_field", "text")
    seq_len = seq_len or data_cfg.get("seq_len", 256)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocabulary ({model.config.vocab_size}) differs from the tokenizer's "
            f"({tokenizer.vocab_size}); evaluate with the tokenizer the model was trained with"
        )
    corpus = get_corpus(corpus_spec, text_field=field)
    tokens = get_split_tokens(corpus, tokenizer, split, cache_dir=data_cfg.get("cache_dir"))
    dev = next(model.parameters()).device
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
    model, tokenizer, _ = load_model_and_tokenizer(path, device)
    dev = next(model.parameters()).device
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
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
