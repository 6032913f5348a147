"""Evaluation of prompt -> answer examples: greedy exact match, answer loss, teacher-forced match.

``exact_match``: greedy decoding from ``[EOS] prompt`` (batched, left-padded, KV cache) until EOS
or ``max_new_tokens``; prediction and reference are compared after normalisation (``"squad"``:
lower case, punctuation, articles and extra whitespace removed, as in the MIGU code's
``compute_metrics``; ``"strip"``: surrounding whitespace only; ``"none"``). ``answer_loss``: the
teacher-forced mean cross-entropy (nats per token) over answer tokens + EOS. ``tf_exact_match``:
the fraction of examples whose every answer token (and the EOS) is the argmax under teacher
forcing -- equal to unnormalised greedy exact match, at the cost of one forward.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.examples import IGNORE_INDEX, Example, collate, encode_example
from ..runtime import model_device

__all__ = [
    "NORMALIZATIONS",
    "evaluate_examples",
    "greedy_answers",
    "normalize_answer",
    "teacher_forced_metrics",
]

NORMALIZATIONS = ("squad", "strip", "none")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str, mode: str = "squad") -> str:
    """Normalise an answer for exact match (``squad``: lower, no punctuation/articles/extra
    whitespace; ``strip``: surrounding whitespace; ``none``: unchanged)."""
    if mode == "none":
        return text
    if mode == "strip":
        return text.strip()
    if mode != "squad":
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _left_padded(
    tokenizer: Any, prompts: Sequence[str], keep: int, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[EOS] prompt`` (the last ``keep`` prompt tokens) left-padded: ids and mask ``[B, T]``."""
    chunk = [[tokenizer.eos_id, *list(tokenizer.encode(p))[-keep:]] for p in prompts]
    t = max(len(c) for c in chunk)
    ids = torch.full((len(chunk), t), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), t), dtype=torch.long)
    for r, c in enumerate(chunk):
        ids[r, t - len(c) :] = torch.tensor(c)
        mask[r, t - len(c) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 16,
    batch_size: int = 64,
    max_len: int = 256,
) -> list[str]:
    """Greedy continuations of ``[EOS] prompt`` until EOS (batched, left-padded, KV cache).

    Prompts longer than ``max_len - max_new_tokens`` tokens are cut from the left.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    keep = max(1, max_len - max_new_tokens - 1)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = _left_padded(tokenizer, prompts[i : i + batch_size], keep, pad)
            gen = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_id,
            )
            for row in gen[:, ids.shape[1] :].tolist():
                if tokenizer.eos_id in row:
                    row = row[: row.index(tokenizer.eos_id)]
                out.append(tokenizer.decode([x for x in row if x != pad]))
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def teacher_forced_metrics(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int, max_len: int
) -> tuple[float, float, list[bool]]:
    """``(answer_loss, tf_exact_match, per-example all-argmax-correct)`` in one forward each."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    correct: list[bool] = []
    try:
        for i in range(0, len(examples), batch_size):
            enc = [encode_example(tokenizer, ex, max_len) for ex in examples[i : i + batch_size]]
            batch = collate(enc, tokenizer.pad_id, device)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            logits = logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            valid = labels != IGNORE_INDEX
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view_as(labels)
            total += float(ce[valid].sum())
            count += int(valid.sum())
            hit = (logits.argmax(-1) == labels) | ~valid
            correct += hit.all(dim=1).tolist()
    finally:
        model.train(was_training)
    return total / max(count, 1), sum(correct) / max(len(correct), 1), correct


def evaluate_examples(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 0,
    normalize: str = "squad",
    max_len: int = 256,
    generate: bool = True,
    keep_predictions: int = 0,
) -> dict[str, Any]:
    """Exact match of greedy answers, teacher-forced answer loss and tf exact match.

    Returns:
        ``{"n", "exact_match" (None when ``generate`` is False), "tf_exact_match",
        "answer_loss", "predictions": [first keep_predictions {prompt, answer, prediction}]}``.
    """
    if not examples:
        raise ValueError("evaluation needs at least one example")
    loss, tf_em, _ = teacher_forced_metrics(model, tokenizer, examples, batch_size, max_len)
    result: dict[str, Any] = {
        "n": len(examples),
        "exact_match": None,
        "tf_exact_match": tf_em,
        "answer_loss": loss,
    }
    if generate:
        budget = max_new_tokens or (max(len(tokenizer.encode(ex.answer)) for ex in examples) + 4)
        preds = greedy_answers(
            model, tokenizer, [ex.prompt for ex in examples], budget, batch_size, max_len
        )
        hits = [
            normalize_answer(p, normalize) == normalize_answer(ex.answer, normalize)
            for p, ex in zip(preds, examples)
        ]
        result["exact_match"] = sum(hits) / len(hits)
        result["predictions"] = [
            {"prompt": ex.prompt, "answer": ex.answer, "prediction": p}
            for ex, p in list(zip(examples, preds))[:keep_predictions]
        ]
    return result
