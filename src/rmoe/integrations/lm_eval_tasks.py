"""Built-in offline lm-evaluation-harness tasks: items generated from ``pydoc_data.topics``.

Every Python ships ``pydoc_data.topics`` (the interpreter's ``help()`` topics), so these tasks
need no download. :func:`builtin_task_dir` writes their JSONL data and their YAMLs (the shipped
``rmoe/configs/tasks/*.yaml`` with absolute ``data_files``) into a cache folder; the items are
deterministic for a given Python version and :data:`DATA_VERSION`.

* ``rmoe_pydoc_mc`` (:func:`multiple_choice_docs`) — the first 32 words of a documentation
  paragraph; choose its true next 10 words among 4.
* ``rmoe_pydoc_cloze`` (:func:`cloze_docs`) — a paragraph's end without its last word; predict
  the word.
* the tag ``rmoe_pydoc`` runs both.

Needs neither lm_eval nor torch; :mod:`rmoe.integrations.lm_eval` re-exports every public name.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

BUILTIN_TASKS = ("rmoe_pydoc_mc", "rmoe_pydoc_cloze")
"""The built-in offline tasks (their YAMLs are in ``rmoe/configs/tasks``)."""
BUILTIN_TAG = "rmoe_pydoc"
"""The tag naming every built-in task."""
TASKS_DIR_ENV = "RMOE_LM_EVAL_DIR"
"""Environment variable: where the built-in tasks' data is generated (default
``~/.cache/rmoe/lm_eval``)."""
DATA_VERSION = 1
"""Bumped whenever the generated items change."""

# how items are cut from the documentation paragraphs
_MIN_WORDS = 30  # prose paragraphs at least this long are used
_MC_CONTEXT_WORDS = 32
_MC_ENDING_WORDS = 10
_MC_CHOICES = 4
_CLOZE_CONTEXT_WORDS = 48
_FEWSHOT_ITEMS = 32  # items of each task kept as the few-shot (train) split
_SEED = 1234


def pydoc_paragraphs() -> list[tuple[str, str]]:
    """``(topic, paragraph)`` for every prose paragraph of ``pydoc_data.topics`` with at least
    30 words, whitespace collapsed, in topic order. Code (indented blocks), grammar rules
    (``::=``) and interpreter sessions (``>>>``) are left out."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[topic]):
            if block[:1].isspace() or "::=" in block or ">>>" in block:
                continue
            words = block.split()
            if len(words) >= _MIN_WORDS:
                out.append((topic, " ".join(words)))
    return out


def multiple_choice_docs(seed: int = _SEED) -> dict[str, list[dict[str, Any]]]:
    """The items of ``rmoe_pydoc_mc`` as ``{"train": [...], "test": [...]}``.

    Each item is ``{"id", "topic", "context", "choices" (4 strings), "label"}``: ``context`` is
    the first 32 words of a paragraph, ``choices[label]`` its next 10 words, the other choices
    the same words of paragraphs from three other topics. Deterministic for a given ``seed``
    and Python version; the first 32 items (shuffled order) form the few-shot split.
    """
    rng = random.Random(seed)
    spans = []
    for topic, text in pydoc_paragraphs():
        words = text.split()
        k = min(_MC_CONTEXT_WORDS, len(words) - _MC_ENDING_WORDS)
        spans.append((topic, " ".join(words[:k]), " ".join(words[k : k + _MC_ENDING_WORDS])))
    docs = []
    for i, (topic, context, ending) in enumerate(spans):
        pool = sorted({e for t, _, e in spans if t != topic and e != ending})
        distractors = rng.sample(pool, _MC_CHOICES - 1)
        label = rng.randrange(_MC_CHOICES)
        choices = distractors[:label] + [ending] + distractors[label:]
        docs.append(
            {"id": i, "topic": topic, "context": context, "choices": choices, "label": label}
        )
    return _split(docs, rng)


def cloze_docs(seed: int = _SEED) -> dict[str, list[dict[str, Any]]]:
    """The items of ``rmoe_pydoc_cloze`` as ``{"train": [...], "test": [...]}``.

    Each item is ``{"id", "topic", "context", "target"}``: a paragraph whose last word is a
    plain word of three letters or more (trailing punctuation dropped) gives ``target`` = that
    word and ``context`` = up to 48 words before it, starting at a sentence when one starts in
    the first half of that span.
    """
    rng = random.Random(seed)
    docs = []
    for topic, text in pydoc_paragraphs():
        words = text.split()
        m = re.fullmatch(r"([A-Za-z][a-z]{2,})[.,;:!?]*", words[-1])
        if not m:
            continue
        before = words[:-1][-_CLOZE_CONTEXT_WORDS:]
        if len(before) == _CLOZE_CONTEXT_WORDS:  # cut mid-paragraph: start at a sentence
            starts = [i for i in range(1, len(before) // 2) if before[i - 1].endswith(".")]
            before = before[starts[0] :] if starts else before
        docs.append(
            {"id": len(docs), "topic": topic, "context": " ".join(before), "target": m.group(1)}
        )
    return _split(docs, rng)


def _split(docs: list[dict[str, Any]], rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    order = list(range(len(docs)))
    rng.shuffle(order)
    shot = set(order[:_FEWSHOT_ITEMS])
    return {
        "train": [docs[i] for i in sorted(shot)],
        "test": [d for i, d in enumerate(docs) if i not in shot],
    }


_GENERATORS = {"rmoe_pydoc_mc": multiple_choice_docs, "rmoe_pydoc_cloze": cloze_docs}


def builtin_task_dir(root: str | Path | None = None) -> Path:
    """The folder holding the built-in tasks' YAMLs and JSONL data, generated when missing.

    ``root`` (default ``$RMOE_LM_EVAL_DIR``, else ``~/.cache/rmoe/lm_eval``) gets a subfolder
    per data version and Python version. Each shipped YAML (``rmoe/configs/tasks``) is copied
    there with its ``data_files`` made absolute. Files are rewritten only when their content
    changes (atomically), so parallel callers are safe and datasets' cache stays valid.
    """
    import yaml

    base = Path(root or os.environ.get(TASKS_DIR_ENV) or "~/.cache/rmoe/lm_eval").expanduser()
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    out = base / f"builtin-v{DATA_VERSION}-{py}"
    out.mkdir(parents=True, exist_ok=True)
    shipped = resources.files("rmoe") / "configs" / "tasks"
    for name, make in _GENERATORS.items():
        config = yaml.safe_load((shipped / f"{name}.yaml").read_text())
        files = config["dataset_kwargs"]["data_files"]
        for split, docs in make().items():
            text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
            _write_if_changed(out / files[split], text)
            files[split] = str((out / files[split]).resolve())
        _write_if_changed(out / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    return out


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
