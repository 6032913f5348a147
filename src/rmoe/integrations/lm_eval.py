"""lm-evaluation-harness for rmoe models: the ``rmoe`` LM, built-in offline tasks, the runner.

Install with ``pip install 'rmoe[eval]'``. Importing this module never needs lm_eval: the
functions and the class that do raise a :class:`ValueError` naming that command.

The ``rmoe`` model (:class:`RMoELM`, registered with lm_eval's ``register_model`` when this
module is imported) wraps an rmoe model and its :class:`rmoe.data.Tokenizer`. It is built from
``pretrained=PATH`` (any path :func:`rmoe.loading.load_model` reads: a run directory, a saved
model, a checkpoint) or from an already loaded model. Other model arguments: ``device``,
``dtype``, ``tokenizer`` (a tokenizer spec overriding the saved one), ``batch_size``,
``max_length`` (default: the run's ``data.seq_len``, else ``max_position_embeddings``),
``max_gen_toks`` and ``add_bos_token`` (default true: the end-of-text token, which also begins
every training document, is put before each context, as ``rmoe generate`` does).

Three ways to run tasks:

* ``rmoe eval RUN --tasks rmoe_pydoc_mc --limit 100`` (prints a table, writes JSON);
* ``python -m rmoe.lm_eval --model rmoe --model_args pretrained=RUN --tasks rmoe_pydoc``
  (lm_eval's own command line with rmoe registered; ``--model hf`` works too);
* :func:`evaluate_tasks` from Python.

Built-in tasks (offline; generated from ``pydoc_data.topics``, which every Python has, into
:func:`builtin_task_dir`; deterministic for a given Python version):

* ``rmoe_pydoc_mc`` — the first 32 words of a documentation paragraph; choose its true next 10
  words among 4 (the distractors are the same words of paragraphs from other topics).
  Metrics acc and acc_norm (log-likelihood normalised by the choice's length in bytes).
* ``rmoe_pydoc_cloze`` — LAMBADA-style: a paragraph's end without its last word; predict the
  word. Metrics acc (the word is the greedy continuation) and perplexity.
* the tag ``rmoe_pydoc`` runs both.

Running the paper's tasks (ARC-e, HellaSwag, PIQA, SciQ, LAMBADA) without the hub. lm_eval's
task YAMLs name hub datasets (``dataset_path: allenai/ai2_arc``). Either

1. fill the datasets cache once on a machine online (``lm_eval ... --tasks arc_easy`` or
   ``datasets.load_dataset("allenai/ai2_arc", "ARC-Easy")``), copy
   ``~/.cache/huggingface/datasets`` and run with ``HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1``; or
2. keep local files of the datasets and a folder of task YAMLs that point at them, passed as
   ``--include-path DIR`` (``--include_path`` for ``python -m rmoe.lm_eval``). Export each
   split once, e.g. ``load_dataset("allenai/ai2_arc", "ARC-Easy")["test"].to_json(
   "arc_easy/test.jsonl")``, so the fields are those the standard YAML reads, then write
   ``DIR/arc_easy_local.yaml``::

       include: /path/to/site-packages/lm_eval/tasks/arc/arc_easy.yaml   # the standard task
       task: arc_easy_local          # or keep `arc_easy`: a task in DIR overrides the standard one
       dataset_path: json            # datasets' local loader (also: parquet, csv, arrow)
       dataset_name: null            # the standard YAML names a hub config (ARC-Easy)
       dataset_kwargs:
         data_files:                 # absolute paths; one entry per split the YAML uses
           train: /data/arc_easy/train.jsonl
           validation: /data/arc_easy/validation.jsonl
           test: /data/arc_easy/test.jsonl

   ``include`` keeps everything else of the standard task (prompt, choices, metrics, and
   functions such as HellaSwag's ``process_docs``, which resolve next to the included file);
   :func:`standard_task_yaml` gives the path to put there. The splits: ARC-e and SciQ use
   train/validation/test, HellaSwag and PIQA train/validation (they report on validation),
   LAMBADA (``lambada_openai``) test only.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import math
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'rmoe[eval]'"
"""How to install the optional lm-evaluation-harness dependency."""
MIN_LM_EVAL = "0.4.8"
"""The oldest lm_eval release this module is written for."""
MODEL_NAME = "rmoe"
"""The name of :class:`RMoELM` in lm_eval's model registry (``--model rmoe``)."""
BUILTIN_TASKS = ("rmoe_pydoc_mc", "rmoe_pydoc_cloze")
"""The built-in offline tasks (their YAMLs are in ``rmoe/configs/tasks``)."""
BUILTIN_TAG = "rmoe_pydoc"
"""The tag naming every built-in task."""
TASKS_DIR_ENV = "RMOE_LM_EVAL_DIR"
"""Environment variable: where the built-in tasks' data is generated (default
``~/.cache/rmoe/lm_eval``)."""
DATA_VERSION = 1
"""Bumped whenever the generated items change."""
DEFAULT_BATCH_SIZE = 8

# how items are cut from the documentation paragraphs
_MIN_WORDS = 30  # prose paragraphs at least this long are used
_MC_CONTEXT_WORDS = 32
_MC_ENDING_WORDS = 10
_MC_CHOICES = 4
_CLOZE_CONTEXT_WORDS = 48
_FEWSHOT_ITEMS = 32  # items of each task kept as the few-shot (train) split
_SEED = 1234

try:  # the base class when lm_eval is installed; a plain class otherwise (see require_lm_eval)
    from lm_eval.api.model import LM as _LMBase
except ImportError:  # pragma: no cover - exercised by the test that hides lm_eval
    _LMBase = object  # type: ignore[assignment,misc]


def require_lm_eval() -> Any:
    """The imported ``lm_eval`` package.

    Raises:
        ValueError: lm_eval is not installed, or is older than :data:`MIN_LM_EVAL`; the message
            is one line naming ``pip install 'rmoe[eval]'``.
    """
    try:
        import lm_eval
    except ImportError:
        raise ValueError(
            f"lm-evaluation-harness is not installed; install it with: {INSTALL_HINT}"
        ) from None
    version = str(getattr(lm_eval, "__version__", "0"))
    if _version_tuple(version) < _version_tuple(MIN_LM_EVAL):
        raise ValueError(
            f"lm-evaluation-harness {version} is older than {MIN_LM_EVAL}; upgrade with: "
            f"{INSTALL_HINT}"
        )
    return lm_eval


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


# ----------------------------------------------------------------------------------------------
# built-in tasks: data from pydoc_data.topics
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# the lm_eval model
# ----------------------------------------------------------------------------------------------
_MODEL_ARGS = (
    "pretrained",
    "model",
    "tokenizer",
    "device",
    "dtype",
    "batch_size",
    "max_batch_size",
    "max_length",
    "max_gen_toks",
    "add_bos_token",
)


class RMoELM(_LMBase):
    """lm_eval's ``LM`` for an rmoe model and its :class:`rmoe.data.Tokenizer` (``--model rmoe``).

    Args:
        pretrained: a path :func:`rmoe.loading.load_model` reads, or a :class:`rmoe.loading.
            Loaded`; or None when ``model`` is given.
        model: an already loaded causal LM (its logits are ``[B, T, V]``); needs ``tokenizer``.
        tokenizer: with ``model``, a :class:`rmoe.data.Tokenizer` or a tokenizer spec; with a
            path, an optional spec overriding the saved tokenizer (e.g. ``bytes``).
        device: ``auto``, ``cpu``, ``cuda:0``... (a CUDA device without CUDA falls back to
            the CPU with a warning: lm_eval's command line defaults to ``cuda:0``).
        dtype: weight dtype when loading (None = as saved).
        batch_size: sequences per forward pass (``auto`` is taken as 8).
        max_batch_size: accepted for lm_eval's interface; unused.
        max_length: longest window the model is given (default: the run's ``data.seq_len``,
            else the model's ``max_position_embeddings``).
        max_gen_toks: default new-token limit of ``generate_until``.
        add_bos_token: begin every context with the end-of-text token (rmoe's document
            separator); contexts that are empty always get it.

    Raises:
        ValueError: lm_eval missing, an unknown argument, or neither ``pretrained`` nor ``model``.
    """

    def __init__(
        self,
        pretrained: Any = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        device: str | None = "auto",
        dtype: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        **unknown: Any,
    ) -> None:
        require_lm_eval()
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown rmoe model argument(s) {sorted(unknown)}; valid: {list(_MODEL_ARGS)}"
            )
        self.model, self.tokenizer, run_config = _resolve_model(
            pretrained, model, tokenizer, device, dtype
        )
        self.model.eval()
        self._device = next(self.model.parameters()).device
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or _default_max_length(self.model, run_config))
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = bool(add_bos_token)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any, **kwargs: Any) -> RMoELM:
        """Wrap an already loaded model and its tokenizer (see the class for ``kwargs``)."""
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    @property
    def tokenizer_name(self) -> str:
        """A name for lm_eval's request cache: the tokenizer's kind and size."""
        return f"rmoe-{'bytes' if self.tokenizer.is_bytes else 'bpe'}-{self.tokenizer.vocab_size}"

    # ------------------------------------------------------------------ tokenisation
    def _prefix(self, context: str) -> list[int]:
        return [self.tokenizer.eos_id] if self.add_bos_token or not context else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of ``(context, continuation)`` as lm_eval's models split them.

        Spaces at the end of the context move to the continuation; the continuation's ids are
        those of ``context + continuation`` after the context's own ids, so a tokenizer that
        merges across the boundary scores the continuation as the model would see it. The
        context ids start with the end-of-text token (see ``add_bos_token``).
        """
        n_space = len(context) - len(context.rstrip())
        if n_space:
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return self._prefix(context) + ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_sequences(self, items: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Log-probability of the last ``m`` tokens of each ``seq`` given the tokens before.

        Args:
            items: ``(seq, m)`` pairs; ``seq`` has at most ``max_length + 1`` ids and
                ``0 <= m < len(seq)``.

        Returns:
            ``(sum of log p, every scored token is the argmax)`` per item, in order. Items are
            batched longest first and right-padded; the attention mask keeps padding out of
            attention and routing.
        """
        out: list[tuple[float, bool]] = [(0.0, True)] * len(items)
        todo = sorted(
            (i for i, (_, m) in enumerate(items) if m > 0), key=lambda i: -len(items[i][0])
        )
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start : start + self.batch_size]
            inputs = [items[i][0][:-1] for i in rows]
            logits = self._logits(inputs)  # [b, T, V]
            for r, i in enumerate(rows):
                seq, m = items[i]
                n = len(seq) - 1
                target = torch.tensor(seq[-m:], device=logits.device)
                lp = logits[r, n - m : n].float().log_softmax(-1)  # [m, V]
                total = float(lp.gather(-1, target[:, None]).sum())
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
        return out

    def _logits(self, inputs: list[list[int]]) -> torch.Tensor:
        """The model's logits ``[b, T, V]`` for ``inputs`` right-padded to ``T`` ids."""
        width = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for r, x in enumerate(inputs):
            ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[r, : len(x)] = 1
        out = self.model(
            input_ids=ids.to(self._device), attention_mask=mask.to(self._device), use_cache=False
        )
        return out.logits

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), is_greedy)`` of each request's ``(context,
        continuation)``; contexts are left-truncated to the last ``max_length`` tokens."""
        items, cut = [], 0
        for req in requests:
            ctx, cont = self.encode_pair(*req.args[:2])
            seq = (ctx + cont)[-(self.max_length + 1) :]
            cut += len(cont) >= len(seq)
            items.append((seq, min(len(cont), len(seq) - 1)))
        if cut:
            log.warning(
                "%d of %d continuations are longer than max_length=%d: only their last "
                "tokens are scored",
                cut,
                len(requests),
                self.max_length,
            )
        results = self.score_sequences(items)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], int]]:
        """The ``(seq, m)`` windows scoring every id of ``ids`` once, each with the longest
        context that fits ``max_length``: targets ``[a, b)`` of ``[eos] + ids`` (stride
        ``max_length``) read the ``max_length`` inputs before ``b``."""
        stream = [self.tokenizer.eos_id] + list(ids)
        windows, a = [], 0
        while a < len(ids):
            b = min(a + self.max_length, len(ids))
            start = max(0, b - self.max_length)
            windows.append((stream[start : b + 1], b - a))
            a = b
        return windows

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each request's whole string (perplexity tasks), conditioned on the
        end-of-text token, in windows of ``max_length`` (see :meth:`rolling_windows`)."""
        windows, owner = [], []
        for k, req in enumerate(requests):
            w = self.rolling_windows(self.tokenizer.encode(req.args[0]))
            windows += w
            owner += [k] * len(w)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self.score_sequences(windows)):
            totals[k] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each request's ``(context, gen_kwargs)``, cut before the first
        stop string (``gen_kwargs["until"]``), at most ``max_gen_toks`` new tokens. Requests
        with the same settings are batched (left-padded)."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            until, max_new = self._generation_settings(requests[members[0]].args[1])
            members.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                rows = members[start : start + self.batch_size]
                texts = self.greedy_generate([requests[i].args[0] for i in rows], until, max_new)
                for i, text in zip(rows, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [t or "" for t in out]

    def _generation_settings(self, kwargs: dict[str, Any] | None) -> tuple[list[str], int]:
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
            log.warning("rmoe's lm_eval model decodes greedily; sampling settings are ignored")
        return until, max_new

    @torch.no_grad()
    def greedy_generate(self, contexts: list[str], until: list[str], max_new: int) -> list[str]:
        """Greedy (KV-cached) continuations of ``contexts``, each cut before its first stop
        string; contexts are left-truncated so context + new tokens fit ``max_length``."""
        tok = self.tokenizer
        keep = max(1, self.max_length - max_new)
        ids = [(self._prefix(c) + tok.encode(c))[-keep:] for c in contexts]
        width = max(len(x) for x in ids)
        x = torch.full((len(ids), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for r, row in enumerate(ids):
            x[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[r, width - len(row) :] = 1
        stop = _StopOnStrings(until, tok, width)
        gen = self.model.generate(
            x.to(self._device),
            attention_mask=mask.to(self._device),
            max_new_tokens=max(1, max_new),
            do_sample=False,
            eos_token_id=tok.eos_id,
            pad_token_id=tok.pad_id,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        return [
            _cut(tok.decode(row[width:].tolist(), skip_special_tokens=True), until) for row in gen
        ]


class _StopOnStrings(StoppingCriteria):
    """Stops a row of ``generate`` once its new text holds one of ``stops``."""

    def __init__(self, stops: list[str], tokenizer: Any, prompt_len: int) -> None:
        self.stops, self.tokenizer, self.prompt_len = stops, tokenizer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        """``input_ids`` [B, prompt + new] -> [B] bool: the row's new text has a stop string."""
        done = [
            bool(self.stops)
            and any(
                s
                in self.tokenizer.decode(row[self.prompt_len :].tolist(), skip_special_tokens=True)
                for s in self.stops
            )
            for row in input_ids
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut(text: str, until: list[str]) -> str:
    """``text`` before the first occurrence of any stop string."""
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


def _resolve_model(
    pretrained: Any, model: Any, tokenizer: Any, device: str | None, dtype: str | None
) -> tuple[torch.nn.Module, Any, dict[str, Any] | None]:
    """(model, rmoe Tokenizer, run config) from the constructor's arguments."""
    from ..data import build_tokenizer
    from ..loading import Loaded, load_model

    if model is None and isinstance(pretrained, torch.nn.Module):
        model, pretrained = pretrained, None
    if model is not None:
        if tokenizer is None:
            raise ValueError("an rmoe LM built from a model object needs its tokenizer")
        tok = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        return model, tok, None
    if isinstance(pretrained, Loaded):
        return pretrained.model, pretrained.tokenizer, pretrained.run_config
    if not isinstance(pretrained, (str, Path)) or not str(pretrained):
        raise ValueError(
            "the rmoe lm_eval model needs pretrained=PATH (a run or saved model directory) or "
            "an already loaded model"
        )
    loaded = load_model(
        pretrained, device=_device(device), dtype=dtype, tokenizer=tokenizer or None
    )
    return loaded.model, loaded.tokenizer, loaded.run_config


def _device(name: str | None) -> str:
    """``name``, or ``auto`` when it is None or a CUDA device on a machine without CUDA."""
    if not name:
        return "auto"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s asked for but CUDA is not available; using the CPU", name)
        return "cpu"
    return str(name)


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        log.info("batch_size=%s: rmoe's lm_eval model uses %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {value!r}")
    return size


def _default_max_length(model: torch.nn.Module, run_config: dict[str, Any] | None) -> int:
    seq_len = ((run_config or {}).get("data") or {}).get("seq_len")
    if seq_len:
        return int(seq_len)
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


# ----------------------------------------------------------------------------------------------
# tasks and the runner
# ----------------------------------------------------------------------------------------------
def include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """The built-in task folder followed by the user's task folders (checked to exist)."""
    given = [] if include_path is None else include_path
    given = [given] if isinstance(given, (str, Path)) else list(given)
    paths = [builtin_task_dir()]
    for p in given:
        path = Path(p).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"task include path {str(p)!r} is not a directory; give a folder of lm_eval "
                "task YAMLs"
            )
        paths.append(path.resolve())
    return paths


def task_manager(
    include_path: str | Path | Sequence[str | Path] | None = None,
    tasks: Sequence[str] | None = None,
) -> Any:
    """An lm_eval ``TaskManager`` that knows the built-in tasks and ``include_path``'s tasks.

    lm_eval's own tasks (about 15 000 YAMLs, more than 10 s to index) are indexed only when
    ``tasks`` is None or names something the built-in and included folders do not have.

    Raises:
        ValueError: lm_eval missing, or a task name found nowhere (with the nearest names).
        FileNotFoundError: an include path that is not a directory.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths(include_path)]
    wanted = [t for t in tasks or [] if not t.endswith((".yaml", ".yml"))]
    if tasks is not None:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in wanted):
            return local
    manager = TaskManager(include_path=paths)
    for name in wanted:
        if name not in manager.all_tasks:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f" (nearest: {', '.join(near)})" if near else ""
            raise ValueError(
                f"unknown lm_eval task {name!r}{hint}; built-in: {', '.join(BUILTIN_TASKS)} "
                f"(tag {BUILTIN_TAG}); local task YAMLs: --include-path DIR"
            )
    return manager


def standard_task_yaml(task: str) -> Path:
    """The YAML file of one of lm_eval's own tasks (e.g. ``arc_easy``): what a local task
    YAML's ``include:`` names to reuse it with local data (see the module docstring)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    # an Entry object (lm_eval >= 0.4.10) or a dict (older releases); -1 = a Python task
    path = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
    if path is None or path == -1:
        raise ValueError(f"lm_eval has no task YAML named {task!r}")
    return Path(path)


@dataclass
class TaskScore:
    """One metric of one task (or group).

    Attributes:
        task: the task's name.
        metric: the metric (``acc``, ``acc_norm``, ``perplexity``...), with ``,filter`` when
            the task's filter is not ``none``.
        value: the metric's value.
        stderr: its standard error (None when lm_eval gives none).
        samples: items evaluated (None when unknown, e.g. for a group).
    """

    task: str
    metric: str
    value: float
    stderr: float | None = None
    samples: int | None = None


@dataclass
class TaskResults:
    """What :func:`evaluate_tasks` returns.

    Attributes:
        scores: one row per (task, metric), tasks in lm_eval's order.
        results: lm_eval's result dict (``results``, ``configs``, ``versions``, ``n-shot``,
            ``n-samples``, ``config``...), without per-sample logs.
        settings: the run's settings (tasks, limit, num_fewshot, batch size, max length).
    """

    scores: list[TaskScore]
    results: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def by_task(self) -> dict[str, dict[str, float | None]]:
        """``{task: {metric: value, metric + "_stderr": stderr}}``."""
        out: dict[str, dict[str, float | None]] = {}
        for s in self.scores:
            out.setdefault(s.task, {})[s.metric] = s.value
            out[s.task][f"{s.metric}_stderr"] = s.stderr
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, scores by task, the table rows and lm_eval's results."""
        return {
            "settings": self.settings,
            "scores": self.by_task(),
            "table": [asdict(s) for s in self.scores],
            "lm_eval": _jsonable(self.results),
        }


def evaluate_tasks(
    model: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    tokenizer: str | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
) -> TaskResults:
    """Run lm_eval tasks on an rmoe model (``lm_eval.simple_evaluate`` with :class:`RMoELM`).

    Args:
        model: a run or model path, a :class:`rmoe.loading.Loaded`, or an :class:`RMoELM`.
        tasks: task, group or tag names (built-in, from ``include_path``, or lm_eval's).
        include_path: folder(s) of local task YAMLs.
        limit: items per task (a fraction when < 1; None = all).
        num_fewshot: few-shot examples (None = each task's default, 0 for the built-in ones).
        batch_size, device, tokenizer, max_length: see :class:`RMoELM` (ignored for an RMoELM).
        bootstrap_iters: resamples for the standard errors of non-mean metrics (perplexity);
            0 = no standard errors at all.

    Raises:
        ValueError: lm_eval missing, no or unknown tasks, bad limit.
        FileNotFoundError: no model at the path, or an include path that is not a folder.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate

    tasks = [t for t in tasks if t]
    if not tasks:
        raise ValueError(f"no tasks given; e.g. {BUILTIN_TASKS[0]}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 (a count, or a fraction below 1), got {limit}")
    manager = task_manager(include_path, tasks)
    lm = model if isinstance(model, RMoELM) else RMoELM(
        pretrained=model, device=device, batch_size=batch_size, tokenizer=tokenizer,
        max_length=max_length,
    )  # fmt: skip
    with _quiet():
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
    results = dict(results or {})
    results.pop("samples", None)
    settings = {
        "tasks": list(tasks),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": lm.batch_size,
        "max_length": lm.max_length,
        "add_bos_token": lm.add_bos_token,
        "lm_eval": require_lm_eval().__version__,
    }
    return TaskResults(parse_scores(results), results, settings)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm_eval prints (bootstrap notices) and forks a process pool for bootstrapped standard
    errors: send its prints to the debug log and keep the bootstrap in this process."""
    buffer = io.StringIO()
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old
        if buffer.getvalue().strip():
            log.debug("lm_eval printed: %s", buffer.getvalue().strip())


def parse_scores(results: dict[str, Any]) -> list[TaskScore]:
    """The ``(task, metric, value, stderr)`` rows of lm_eval's ``results["results"]``."""
    counts = results.get("n-samples") or {}
    rows = []
    for task, metrics in (results.get("results") or {}).items():
        n = (counts.get(task) or {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in _NOT_METRICS or metric.endswith("_stderr") or not _is_number(value):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt in ("", "none") else key
            rows.append(
                TaskScore(
                    task, name, float(value), float(stderr) if _is_number(stderr) else None, n
                )
            )
    return rows


_NOT_METRICS = ("alias", "sample_len", "sample_count")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(scores: Sequence[TaskScore]) -> str:
    """The scores as an aligned text table: task, metric, value, stderr (and n)."""
    head = ("task", "metric", "value", "stderr", "n")
    rows = [
        (
            s.task,
            s.metric,
            _number(s.value),
            "–" if s.stderr is None else _number(s.stderr),
            "" if s.samples is None else str(s.samples),
        )
        for s in scores
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in [head, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def _jsonable(obj: Any) -> Any:
    """``obj`` with everything strict JSON cannot hold made plain: numpy values as numbers,
    NaN and infinities as None, functions and other objects as their ``str``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


def output_name(tasks: Sequence[str], limit: int | float | None = None) -> str:
    """A file name for the results of ``tasks`` (``arc_easy+sciq.json``; ``...-limit8.json``
    with a limit)."""
    name = "+".join(
        re.sub(r"[^A-Za-z0-9_.-]", "_", Path(t).stem if t.endswith(".yaml") else t) for t in tasks
    )
    if len(name) > 120:
        name = name[:100] + f"+{len(tasks)}tasks"
    return name + (f"-limit{limit:g}" if limit is not None else "") + ".json"


def run_lm_eval_cli(argv: Sequence[str]) -> int:
    """lm_eval's command line (``lm_eval run ...`` / ``lm_eval ls tasks`` / legacy flags) with
    the ``rmoe`` model registered and the built-in tasks added to every ``TaskManager`` it
    builds (before ``--include_path``, which stays the user's). Returns the exit status."""
    require_lm_eval()
    import lm_eval.tasks as lm_tasks

    builtin = str(builtin_task_dir())
    original = lm_tasks.TaskManager

    class TaskManagerWithBuiltins(original):  # type: ignore[misc,valid-type]
        """lm_eval's TaskManager with rmoe's built-in task folder first on the include path."""

        def __init__(self, *args: Any, include_path: Any = None, **kwargs: Any) -> None:
            extra = [] if include_path is None else include_path
            extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
            super().__init__(*args, include_path=[builtin, *extra], **kwargs)

    from lm_eval import __main__ as lm_main

    saved_argv = sys.argv
    lm_tasks.TaskManager = TaskManagerWithBuiltins
    try:
        if getattr(lm_main, "TaskManager", None) is original:  # older lm_eval binds it at import
            lm_main.TaskManager = TaskManagerWithBuiltins
        sys.argv = ["lm-eval", *argv]
        lm_main.cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        lm_tasks.TaskManager = original
        if getattr(lm_main, "TaskManager", None) is TaskManagerWithBuiltins:
            lm_main.TaskManager = original
    return 0


def _register() -> None:
    """Register :class:`RMoELM` as lm_eval's ``rmoe`` model (when lm_eval is installed)."""
    if _LMBase is object:
        return
    import lm_eval.models  # noqa: F401  (lm_eval fills its registry only while it is empty)
    from lm_eval.api.registry import register_model

    try:
        register_model(MODEL_NAME)(RMoELM)
    except ValueError as exc:  # this module imported twice (a reload): keep the first class
        log.debug("lm_eval model %r already registered: %s", MODEL_NAME, exc)


_register()
