"""Supervised examples: prompt -> answer pairs read from jsonl, encoded and collated for training.

Sequence layout. One example is ``[EOS] prompt answer [EOS]`` (EOS doubles as BOS, as in
pre-training). The labels are ``IGNORE_INDEX`` (-100) on ``[EOS] prompt`` and on padding, so the
loss is the mean cross-entropy over the answer tokens and the closing EOS. Batches are
right-padded with the tokenizer's pad id; the attention mask marks real tokens. Too-long
examples keep the answer and the end of the prompt (the prompt is cut from the left).

::

    from rmoe.data.examples import collate, encode_example, load_examples

    examples = load_examples("train.jsonl", prompt_field="question", answer_field="answer")
    batch = collate([encode_example(tok, ex, 256) for ex in examples[:16]], tok.pad_id)
    # batch["input_ids"], batch["attention_mask"], batch["labels"]: int64 [B, T]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "collate",
    "encode_example",
    "load_examples",
    "read_rows",
]

IGNORE_INDEX = -100
"""The label of tokens that carry no loss (context and padding), as ``F.cross_entropy`` expects."""


@dataclass(frozen=True)
class Example:
    """One supervised example: the model reads ``prompt`` and must produce ``answer``."""

    prompt: str
    answer: str


def _json_rows(p: Path, text: str) -> list[Any]:
    """The rows of a ``.json`` file: a list, or the one list inside ``{"data": [...]}``."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON ({err.msg})") from None
    if isinstance(rows, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in rows.values() if isinstance(v, list)]
        rows = lists[0] if len(lists) == 1 else rows
    if not isinstance(rows, list):
        raise ValueError(f"{p}: expected a JSON list of objects (or use .jsonl)")
    return rows


def _jsonl_rows(p: Path, text: str) -> list[Any]:
    """The rows of a ``.jsonl`` file, one JSON value per non-blank line."""
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{p}:{n} is not valid JSON ({err.msg}); each line of a .jsonl file must be "
                "one JSON object"
            ) from None
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` file (one JSON object per line) or a ``.json`` list of objects."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    rows = _json_rows(p, text) if p.suffix == ".json" else _jsonl_rows(p, text)
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{p}: row {n} is a {type(row).__name__}, expected a JSON object")
    return rows


def load_examples(
    path: str | Path,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    limit: int | None = None,
) -> list[Example]:
    """Prompt/answer examples from a ``.jsonl`` (or ``.json`` list) file.

    Non-string values are converted with ``str`` (a numeric label becomes ``"3"``).

    Raises:
        ValueError: a row lacks a field (the message lists the fields it has).
    """
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no examples")
    out = []
    for n, row in enumerate(rows[:limit] if limit else rows, start=1):
        for name in (prompt_field, answer_field):
            if name not in row:
                raise ValueError(
                    f"{path}: row {n} has no field {name!r}; its fields are {sorted(row)}; "
                    f"pass --prompt-field/--answer-field"
                )
        out.append(Example(str(row[prompt_field]), str(row[answer_field])))
    return out


def encode_example(tokenizer: Any, example: Example, max_len: int) -> tuple[list[int], int]:
    """Token ids ``[EOS] prompt answer [EOS]`` and the number of leading non-answer tokens.

    Returns:
        ``(ids, n_context)``: ``ids[:n_context]`` is ``[EOS] + prompt`` (no loss),
        ``ids[n_context:]`` is ``answer + [EOS]`` (the loss).
    """
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (BOS, one answer token, EOS), got {max_len}")
    prompt = list(tokenizer.encode(example.prompt))
    answer = list(tokenizer.encode(example.answer)) + [tokenizer.eos_id]
    answer = answer[: max_len - 1]
    room = max_len - 1 - len(answer)
    prompt = prompt[len(prompt) - room :] if room > 0 else []
    ids = [tokenizer.eos_id, *prompt, *answer]
    return ids, 1 + len(prompt)


def collate(
    encoded: Sequence[tuple[list[int], int]], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``.

    ``labels`` is ``IGNORE_INDEX`` on the context (BOS + prompt) and on padding.
    """
    t = max(len(ids) for ids, _ in encoded)
    b = len(encoded)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_ctx) in enumerate(encoded):
        row = torch.tensor(ids, dtype=torch.long)
        input_ids[i, : len(ids)] = row
        attention[i, : len(ids)] = 1
        labels[i, n_ctx : len(ids)] = row[n_ctx:]
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "labels": labels.to(device),
    }
