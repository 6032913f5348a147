"""Supervised fine-tuning on prompt -> answer pairs, with the loss on the answer tokens only.

One library function, :func:`finetune`, used by ``rmoe finetune`` and by the continual-learning
harness (:mod:`rmoe.continual.harness`)::

    from rmoe.training.sft import SFTConfig, finetune, load_examples
    from rmoe.training.evaluation import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer("runs/tiny-rmoe")
    train = load_examples("train.jsonl", prompt_field="question", answer_field="answer")
    result = finetune(model, tok, train, eval_examples=train[:100],
                      cfg=SFTConfig(steps=200, lr=1e-3, migu_ratio=0.7))
    print(result.final_eval["exact_match"])

Sequence layout. One example is ``[EOS] prompt answer [EOS]`` (EOS doubles as BOS, as in
pre-training). The labels are ``-100`` on ``[EOS] prompt`` and on padding, so the loss is the mean
cross-entropy over the answer tokens and the closing EOS. Batches are right-padded with the
tokenizer's pad id; the attention mask marks real tokens (the MoE balance loss, GW-MoE's token
choice and MIGU's statistics all skip padding). Too-long examples keep the answer and the end of
the prompt (the prompt is cut from the left).

Evaluation. ``exact_match``: greedy decoding from ``[EOS] prompt`` (batched, left-padded, KV
cache) until EOS or ``max_new_tokens``; prediction and reference are compared after
normalisation (``"squad"``: lower case, punctuation, articles and extra whitespace removed, as in
the MIGU code's ``compute_metrics``; ``"strip"``: surrounding whitespace only; ``"none"``).
``answer_loss``: the teacher-forced mean cross-entropy (nats per token) over answer tokens + EOS.
``tf_exact_match``: the fraction of examples whose every answer token (and the EOS) is the argmax
under teacher forcing -- equal to unnormalised greedy exact match, at the cost of one forward.

Options (:class:`SFTConfig`): ``freeze_router`` (the routers and the shared recurrent cell get no
update, as GW-MoE's fine-tuning scripts do); ``gw_threshold`` / ``gw_max_tokens_per_seq`` /
``gw_random`` (GW-MoE broadcasting during training only, or the same-count random control; the
model's config is restored afterwards); ``migu_ratio`` / ``random_mask_ratio`` (MIGU gradient
masking of every linear layer and expert weight, or its random-row control, see
:mod:`rmoe.continual.migu`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "Example",
    "SFTConfig",
    "SFTResult",
    "collate",
    "encode_example",
    "evaluate_examples",
    "finetune",
    "freeze_router",
    "greedy_answers",
    "gw_training",
    "load_examples",
    "normalize_answer",
    "read_rows",
]

IGNORE_INDEX = -100
NORMALIZATIONS = ("squad", "strip", "none")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One supervised example: the model reads ``prompt`` and must produce ``answer``."""

    prompt: str
    answer: str


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` file (one JSON object per line) or a ``.json`` list of objects."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{p} is not valid JSON ({err.msg})") from None
        if isinstance(rows, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in rows.values() if isinstance(v, list)]
            rows = lists[0] if len(lists) == 1 else rows
        if not isinstance(rows, list):
            raise ValueError(f"{p}: expected a JSON list of objects (or use .jsonl)")
    else:
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

    ``labels`` is ``-100`` on the context (BOS + prompt) and on padding.
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


# ----------------------------------------------------------------------------------------------
# Configuration and result
# ----------------------------------------------------------------------------------------------
@dataclass
class SFTConfig:
    """Fine-tuning options.

    Attributes:
        steps: optimizer steps; 0 = ``ceil(epochs * len(train) / batch_size)``.
        epochs: passes over the training examples when ``steps`` is 0.
        batch_size: examples per step.
        lr: AdamW learning rate (constant after ``warmup_steps``).
        weight_decay: decoupled weight decay on matrices (0: the MIGU code's setting).
        warmup_steps: linear warm-up steps.
        grad_clip: global gradient-norm clip (0 = off); applied to the masked gradients.
        max_len: tokens per example (BOS + prompt + answer + EOS); prompts are cut from the left.
        seed: example order, random masks and GW's random control.
        freeze_router: no updates to the routers and the shared recurrent cell.
        gw_threshold: GW-MoE normalised-entropy threshold for training (None = the model's).
        gw_max_tokens_per_seq: GW-MoE cap per sequence (None = the model's).
        gw_random: broadcast as many random tokens as GW would (the control).
        migu_ratio: MIGU masking ratio (0.7 = update the top 30% rows); None = off.
        migu_norm: ``"l1"`` (paper) or ``"raw"`` (released code) magnitude statistic.
        random_mask_ratio: random-row control at this ratio; None = off.
        freeze_masked_rows: keep masked rows bit-exactly still (see ``MIGU``).
        mask_targets: which weights MIGU / the random mask cover: glob patterns on module names
            (``nn.Linear``) and parameter names (expert weights), e.g.
            ``["*.experts.*", "*.mlp.*"]``; None = every trainable ``nn.Linear`` and expert weight.
        eval_every: evaluate every this many steps (0 = only at the end).
        eval_batch_size: examples per evaluation batch.
        max_new_tokens: greedy decoding budget; 0 = longest reference answer + 4 tokens.
        normalize: answer normalisation for exact match (``squad``, ``strip``, ``none``).
        generate: compute greedy exact match (False: teacher-forced metrics only).
        device: ``auto``, ``cpu``, ``cuda``...; the model is moved there.
        dtype: ``float32`` or ``bfloat16`` (autocast on CUDA).
        log_every: steps between log lines / loss records.
    """

    steps: int = 0
    epochs: float = 1.0
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    max_len: int = 256
    seed: int = 0
    freeze_router: bool = False
    gw_threshold: float | None = None
    gw_max_tokens_per_seq: int | None = None
    gw_random: bool = False
    migu_ratio: float | None = None
    migu_norm: str = "l1"
    random_mask_ratio: float | None = None
    freeze_masked_rows: bool = False
    mask_targets: list[str] | None = None
    eval_every: int = 0
    eval_batch_size: int = 64
    max_new_tokens: int = 0
    normalize: str = "squad"
    generate: bool = True
    device: str = "auto"
    dtype: str = "float32"
    log_every: int = 10

    def validate(self) -> None:
        """Raise ValueError on out-of-range values."""
        checks = [
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.max_len >= 3, f"max_len must be >= 3, got {self.max_len}"),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (
                self.normalize in NORMALIZATIONS,
                f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}",
            ),
            (
                self.dtype in ("float32", "bfloat16"),
                f"dtype must be float32 or bfloat16, got {self.dtype!r}",
            ),
            (
                self.migu_ratio is None or self.random_mask_ratio is None,
                "choose one of migu_ratio (MIGU) and random_mask_ratio (its control), not both",
            ),
            (
                self.gw_threshold is None or 0.0 <= self.gw_threshold <= 1.0,
                f"gw_threshold is on normalised entropy and must be in [0, 1], got "
                f"{self.gw_threshold}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for name in ("migu_ratio", "random_mask_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (the masked fraction), got {value}")

    @property
    def method(self) -> str:
        """``migu``, ``random-mask`` or ``plain``: which gradient masking runs."""
        if self.migu_ratio is not None:
            return "migu"
        if self.random_mask_ratio is not None:
            return "random-mask"
        return "plain"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SFTResult:
    """What :func:`finetune` did.

    Attributes:
        steps: optimizer steps taken.
        losses: training loss (answer-token CE + router losses) per step.
        answer_losses: answer-token cross-entropy per step.
        gw_tokens: tokens broadcast by GW-MoE per step (summed over MoE layers), or None.
        evals: ``{"step": s, **metrics}`` for every evaluation.
        final_eval: the last evaluation (empty without evaluation examples).
        trainable_parameters: parameters that received updates.
        frozen: names of the parameters frozen by ``freeze_router``.
        seconds: wall time of training and evaluation.
        config: the :class:`SFTConfig` as a dict.
    """

    steps: int
    losses: list[float] = field(default_factory=list)
    answer_losses: list[float] = field(default_factory=list)
    gw_tokens: list[int] | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    final_eval: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0
    frozen: list[str] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Model surgery: router freezing and GW settings
# ----------------------------------------------------------------------------------------------
def router_parameter_names(model: nn.Module) -> list[str]:
    """Names of the routing parameters: every ``*.moe.router.*`` and the shared router cell.

    For models that are not rmoe models, every parameter whose name contains ``router`` or
    ends in ``.gate.weight`` (Mixtral/OLMoE/Qwen-MoE gates) -- GW-MoE's own rule is ``router``.
    """
    names = []
    for name, _ in model.named_parameters():
        if ".moe.router." in name or ".router_cell." in name or "router" in name:
            names.append(name)
        elif name.endswith(".gate.weight") or ".gate.wg." in name:
            names.append(name)
    return names


def freeze_router(model: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on the routers (and the shared recurrent cell).

    Returns:
        The frozen parameter names.

    Raises:
        ValueError: the model has no router parameters.
    """
    names = set(router_parameter_names(model))
    if not names:
        raise ValueError(
            "--freeze-router: the model has no router parameters (no '*.moe.router.*', "
            "'router_cell' or '*.gate.weight' names); it is not an MoE model"
        )
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
    return sorted(names)


@contextmanager
def gw_training(
    model: nn.Module,
    threshold: float | None,
    max_tokens_per_seq: int | None = None,
    random: bool = False,
) -> Iterator[None]:
    """Set the model config's GW-MoE fields for the duration of the block, then restore them.

    ``threshold=None`` leaves the config as it is (``max_tokens_per_seq`` and ``random`` then
    apply only if the model already has a threshold).

    Raises:
        ValueError: GW options on a model whose config has no GW fields.
    """
    cfg = getattr(model, "config", None)
    wants = threshold is not None or max_tokens_per_seq is not None or random
    if not wants:
        yield
        return
    if cfg is None or not hasattr(cfg, "gw_entropy_threshold"):
        raise ValueError(
            "GW-MoE options (--gw-threshold, --gw-max-tokens-per-seq, --gw-random) need an rmoe "
            "model (its config has gw_entropy_threshold); this model has none"
        )
    saved = (cfg.gw_entropy_threshold, cfg.gw_max_tokens_per_seq, cfg.gw_selection)
    if threshold is not None:
        cfg.gw_entropy_threshold = float(threshold)
    if max_tokens_per_seq is not None:
        cfg.gw_max_tokens_per_seq = int(max_tokens_per_seq)
    if random:
        cfg.gw_selection = "random"
    if cfg.gw_entropy_threshold is None:
        cfg.gw_entropy_threshold, cfg.gw_max_tokens_per_seq, cfg.gw_selection = saved
        raise ValueError("--gw-random / --gw-max-tokens-per-seq need --gw-threshold")
    try:
        yield
    finally:
        cfg.gw_entropy_threshold, cfg.gw_max_tokens_per_seq, cfg.gw_selection = saved


def build_masker(model: nn.Module, cfg: SFTConfig, optimizer: torch.optim.Optimizer | None = None):
    """The MIGU / RandomMask object for ``cfg`` (or None), covering linear and expert weights
    (rmoe's experts through their built-in probes)."""
    from rmoe.continual.migu import MIGU, RandomMask

    if cfg.migu_ratio is not None:
        masker = MIGU(
            model,
            ratio=cfg.migu_ratio,
            targets=cfg.mask_targets,
            norm=cfg.migu_norm,
            freeze_masked_rows=cfg.freeze_masked_rows,
            optimizer=optimizer if cfg.freeze_masked_rows else None,
        )
    elif cfg.random_mask_ratio is not None:
        masker = RandomMask(
            model,
            ratio=cfg.random_mask_ratio,
            targets=cfg.mask_targets,
            seed=cfg.seed,
            freeze_masked_rows=cfg.freeze_masked_rows,
            optimizer=optimizer if cfg.freeze_masked_rows else None,
        )
    else:
        return None
    return masker


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
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


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    device = _device_of(model)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    keep = max(1, max_len - max_new_tokens - 1)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = [
                [tokenizer.eos_id, *list(tokenizer.encode(p))[-keep:]]
                for p in prompts[i : i + batch_size]
            ]
            t = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), t), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), t), dtype=torch.long)
            for r, c in enumerate(chunk):
                ids[r, t - len(c) :] = torch.tensor(c)
                mask[r, t - len(c) :] = 1
            gen = model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_id,
            )
            for row in gen[:, t:].tolist():
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
    device = _device_of(model)
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


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of example indices: a fresh permutation per epoch, batches wrap epochs."""
    g = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending += torch.randperm(n, generator=g).tolist()
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def finetune(
    model: nn.Module,
    tokenizer: Any,
    train_examples: Sequence[Example],
    eval_examples: Sequence[Example] | None = None,
    cfg: SFTConfig | None = None,
    *,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> SFTResult:
    """Fine-tune ``model`` in place on prompt -> answer examples (loss on answers only).

    Args:
        model: a causal LM taking ``input_ids``, ``attention_mask``, ``labels`` and returning
            ``.loss`` and ``.logits`` (rmoe models add router losses to ``.loss`` in training).
        tokenizer: an :class:`rmoe.data.Tokenizer` (``encode``, ``decode``, ``eos_id``,
            ``pad_id``).
        train_examples: the training set.
        eval_examples: evaluated every ``cfg.eval_every`` steps and at the end, if given.
        cfg: options (default :class:`SFTConfig`).
        on_step: called as ``on_step(step, record)`` after each optimizer step.

    Returns:
        :class:`SFTResult`. A fresh AdamW is used (nothing carries over between calls).
    """
    cfg = cfg or SFTConfig()
    cfg.validate()
    if not train_examples:
        raise ValueError("fine-tuning needs at least one training example")
    device = _resolve_device(cfg.device)
    model.to(device)
    steps = cfg.steps or math.ceil(cfg.epochs * len(train_examples) / cfg.batch_size)
    t0 = time.perf_counter()

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    frozen = freeze_router(model) if cfg.freeze_router else []
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.999),
    )
    warm = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if warm and s < warm else 1.0
    )
    masker = build_masker(model, cfg, optimizer)
    amp = torch.bfloat16 if cfg.dtype == "bfloat16" else None
    encoded = [encode_example(tokenizer, ex, cfg.max_len) for ex in train_examples]
    order = _batches(len(encoded), cfg.batch_size, cfg.seed)
    result = SFTResult(
        steps=0,
        gw_tokens=[] if cfg.gw_threshold is not None else None,
        frozen=frozen,
        trainable_parameters=sum(p.numel() for p in params),
        config=cfg.to_dict(),
    )

    def run_eval(step: int) -> None:
        if not eval_examples:
            return
        res = evaluate_examples(
            model,
            tokenizer,
            eval_examples,
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
            normalize=cfg.normalize,
            max_len=cfg.max_len,
            generate=cfg.generate,
            keep_predictions=20,
        )
        result.evals.append({"step": step, **{k: v for k, v in res.items() if k != "predictions"}})
        result.final_eval = {"step": step, **res}
        log.info(
            "step %d: exact match %s, answer loss %.4f",
            step,
            "n/a" if res["exact_match"] is None else f"{res['exact_match']:.3f}",
            res["answer_loss"],
        )

    torch_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # GW's random control draws from the global generator
    model.train()
    try:
        with gw_training(model, cfg.gw_threshold, cfg.gw_max_tokens_per_seq, cfg.gw_random):
            for step in range(1, steps + 1):
                batch = collate([encoded[i] for i in next(order)], tokenizer.pad_id, device)
                optimizer.zero_grad(set_to_none=True)
                if masker is not None:
                    masker.set_token_mask(batch["attention_mask"])
                ctx = torch.autocast(device.type, amp) if amp else _null()
                with ctx:
                    out = model(**batch)
                loss = out.loss
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"fine-tuning loss is {loss.item()} at step {step}; lower --lr"
                    )
                loss.backward()
                if masker is not None:
                    masker.apply_()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                lm = getattr(out, "lm_loss", None)
                rec = {
                    "loss": float(loss.detach()),
                    "answer_loss": float((lm if lm is not None else loss).detach()),
                }
                result.losses.append(rec["loss"])
                result.answer_losses.append(rec["answer_loss"])
                if result.gw_tokens is not None:
                    rec["gw_tokens"] = int(getattr(out, "gw_tokens", 0) or 0)
                    result.gw_tokens.append(rec["gw_tokens"])
                result.steps = step
                if on_step is not None:
                    on_step(step, rec)
                if step % cfg.log_every == 0:
                    log.info("step %d/%d: loss %.4f", step, steps, rec["loss"])
                if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                    run_eval(step)
    finally:
        if masker is not None:
            masker.remove()
        torch.random.set_rng_state(torch_state)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
    run_eval(result.steps)
    result.seconds = time.perf_counter() - t0
    return result


@contextmanager
def _null() -> Iterator[None]:
    yield
