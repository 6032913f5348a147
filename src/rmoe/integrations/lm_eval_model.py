"""The ``rmoe`` lm-evaluation-harness model (:class:`RMoELM`) and the lm_eval requirement.

:class:`RMoELM` is registered with lm_eval's ``register_model`` as ``rmoe`` when this module is
imported (when lm_eval is installed). Importing it never needs lm_eval: :func:`require_lm_eval`,
which the class calls, raises a :class:`ValueError` naming ``pip install 'rmoe[eval]'``.
:mod:`rmoe.integrations.lm_eval` re-exports every public name and documents the model
arguments.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
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
DEFAULT_BATCH_SIZE = 8

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
