"""Supervised fine-tuning on prompt -> answer pairs, with the loss on the answer tokens only.

One library function, :func:`finetune`, used by ``rmoe finetune`` and by the continual-learning
harness (:mod:`rmoe.continual.harness`)::

    from rmoe.data.examples import load_examples
    from rmoe.loading import load_model
    from rmoe.training.sft import SFTConfig, finetune

    model, tok, _ = load_model("runs/tiny-rmoe")
    train = load_examples("train.jsonl", prompt_field="question", answer_field="answer")
    cfg = SFTConfig(steps=200, lr=1e-3, migu_ratio=0.7)
    result = finetune(model, tok, train, eval_examples=train[:100], cfg=cfg,
                      masker=masker_factory(cfg))  # rmoe.continual.masking: MIGU from cfg
    print(result.final_eval["exact_match"])

The parts live elsewhere: examples, their encoding and collation in :mod:`rmoe.data.examples`
(``[EOS] prompt answer [EOS]``, labels ``-100`` on the prompt and padding); evaluation (exact
match, answer loss) in :mod:`rmoe.training.sft_eval`; router freezing and GW-MoE switching in
:mod:`rmoe.training.surgery`; the optimizer, schedule and update in :mod:`rmoe.training.optim`
and :mod:`rmoe.training.step`.

Gradient masking. The loop knows no masking method: the caller passes a factory
``masker(model, optimizer) -> SFTMasker`` (for MIGU / its random control:
:func:`rmoe.continual.masking.masker_factory`). Each step runs forward and backward inside
``masker.token_mask(batch["attention_mask"])`` (so MIGU's statistic skips padding), then
:func:`rmoe.training.step.apply_update` calls ``masker.apply_()`` before clipping and the
optimizer step. ``finetune`` refuses a config that asks for masking (``migu_ratio`` /
``random_mask_ratio``) without a masker.

Router step state (aux-loss-free expert biases, the "global" balance loss's counts) is closed
once per optimizer step by :func:`rmoe.training.step.attach_router_step`'s pre-hook, removed at
the end of the call.

Options (:class:`SFTConfig`): ``freeze_router`` (the routers and the shared recurrent cell get no
update, as GW-MoE's fine-tuning scripts do; the expert biases stay as they are too); ``gw_threshold`` / ``gw_max_tokens_per_seq`` /
``gw_random`` (GW-MoE broadcasting during training only, or the same-count random control; the
model's GW policy is restored afterwards); ``migu_ratio`` / ``random_mask_ratio`` (MIGU gradient
masking of every linear layer and expert weight, or its random-row control, see
:mod:`rmoe.continual.migu`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..data.examples import Example, collate, encode_example
from ..formatting import fmt_number
from ..runtime import autocast_dtype, resolve_device
from .optim import adamw, warmup_constant
from .sft_eval import NORMALIZATIONS, evaluate_examples
from .step import GradientMasker, apply_update, attach_router_step
from .surgery import freeze_router, gw_training

log = logging.getLogger(__name__)

__all__ = [
    "Flag",
    "MaskerFactory",
    "SFTConfig",
    "SFTMasker",
    "SFTResult",
    "evaluate_config",
    "finetune",
    "setting",
]


# ----------------------------------------------------------------------------------------------
# Configuration and result
# ----------------------------------------------------------------------------------------------
OPTIM, ROUTING, MASKING, EVAL, MACHINE = (
    "optimisation",
    "routing",
    "masking",
    "evaluation",
    "machine",
)
"""The groups of :class:`Flag` (``rmoe finetune --help`` shows one section per group)."""
MIGU_NORMS = ("l1", "raw")
SFT_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Flag:
    """How a run setting appears on the command line: the flag is ``--field-name``, its type and
    default are the field's (``bool`` = a switch, ``list[str]`` = comma-separated), the rest is
    here. ``rmoe finetune`` shows every field with a Flag, by ``group``; ``rmoe continual run``
    picks some (see :mod:`rmoe.cli.finetune`).

    Attributes:
        group: the ``--help`` section (:data:`OPTIM`, :data:`ROUTING`, ...).
        help: the ``--help`` line (argparse ``%`` escapes apply).
        choices: the accepted values.
        metavar: the placeholder shown in ``--help`` (default: the flag name in capitals).
    """

    group: str
    help: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


def setting(default: Any, flag: Flag | None = None) -> Any:
    """A dataclass field with ``default``, shown on the command line as ``flag`` says."""
    return field(default=default, metadata={"flag": flag} if flag is not None else {})


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
        freeze_router: no updates to the routers and the shared recurrent cell (nor to the
            routers' expert biases).
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

    steps: int = setting(0, Flag(OPTIM, "optimizer steps (0 = --epochs passes)"))
    epochs: float = setting(1.0, Flag(OPTIM, "passes over the data if --steps 0"))
    batch_size: int = setting(16, Flag(OPTIM))
    lr: float = setting(1e-3, Flag(OPTIM, "AdamW learning rate (constant)"))
    weight_decay: float = setting(0.0, Flag(OPTIM))
    warmup_steps: int = setting(0, Flag(OPTIM))
    grad_clip: float = setting(1.0, Flag(OPTIM, "0 = off"))
    max_len: int = setting(256, Flag(OPTIM, "tokens per example (prompt cut left)"))
    seed: int = setting(0, Flag(OPTIM))
    freeze_router: bool = setting(False, Flag(ROUTING, "no updates to routers and the shared cell"))
    gw_threshold: float | None = setting(
        None,
        Flag(
            ROUTING,
            "broadcast tokens whose normalised router entropy exceeds this to all experts "
            "(training only)",
        ),
    )
    gw_max_tokens_per_seq: int | None = setting(None, Flag(ROUTING, "GW cap per sequence"))
    gw_random: bool = setting(
        False, Flag(ROUTING, "control: broadcast as many tokens as GW would, chosen at random")
    )
    migu_ratio: float | None = setting(
        None, Flag(MASKING, "mask this share of each layer's rows (0.7 = update top 30%%)")
    )
    migu_norm: str = setting("l1", Flag(MASKING, "l1 = paper, raw = code", MIGU_NORMS))
    random_mask_ratio: float | None = setting(
        None, Flag(MASKING, "control: mask this share of rows at random")
    )
    freeze_masked_rows: bool = setting(
        False, Flag(MASKING, "keep masked rows still through weight decay and Adam momentum")
    )
    mask_targets: list[str] | None = setting(
        None,
        Flag(
            MASKING,
            "weights the mask covers: glob patterns on module / expert-parameter names, e.g. "
            "'*.experts.*,*.attn.*' (default: every nn.Linear and expert weight)",
            metavar="GLOB[,GLOB...]",
        ),
    )
    eval_every: int = setting(0, Flag(EVAL, "evaluate every N steps (0 = end)"))
    eval_batch_size: int = setting(64, Flag(EVAL))
    max_new_tokens: int = setting(0, Flag(EVAL, "0 = longest answer + 4"))
    normalize: str = setting("squad", Flag(EVAL, choices=NORMALIZATIONS))
    generate: bool = True
    device: str = setting("auto", Flag(MACHINE))
    dtype: str = setting("float32", Flag(MACHINE, choices=SFT_DTYPES))
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
                self.dtype in SFT_DTYPES,
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
# Gradient masking, as the loop sees it
# ----------------------------------------------------------------------------------------------
class SFTMasker(GradientMasker, Protocol):
    """A gradient masker for fine-tuning (:class:`rmoe.continual.MIGU` and ``RandomMask`` are).

    Per step the loop calls, in this order: ``token_mask(mask)`` around forward and backward,
    then ``apply_()`` (through :func:`rmoe.training.step.apply_update`); ``remove()`` once at
    the end.
    """

    def token_mask(self, mask: torch.Tensor | None) -> AbstractContextManager[Any]:
        """Count only the tokens where ``mask`` ``[B, T]`` is non-zero inside the block."""

    def remove(self) -> None:
        """Remove the hooks the masker installed."""


MaskerFactory = Callable[[nn.Module, torch.optim.Optimizer], SFTMasker | None]
"""``factory(model, optimizer) -> masker``: called once, after the optimizer is built (MIGU's
``freeze_masked_rows`` hooks the optimizer's step)."""


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


def _check_masker(cfg: SFTConfig, masker: MaskerFactory | None) -> None:
    if cfg.method != "plain" and masker is None:
        raise ValueError(
            f"the config asks for {cfg.method} gradient masking but finetune got no masker; "
            "pass masker=rmoe.continual.masking.masker_factory(cfg)"
        )


@dataclass
class _Loop:
    """What every step of one :func:`finetune` call shares."""

    model: nn.Module
    cfg: SFTConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]
    masker: SFTMasker | None
    amp: torch.dtype | None
    device: torch.device

    def step(self, batch: dict[str, torch.Tensor], step: int) -> tuple[dict[str, Any], Any]:
        """One optimizer step on ``batch``; returns ``(record, model output)``."""
        self.optimizer.zero_grad(set_to_none=True)
        scope = (
            nullcontext()
            if self.masker is None
            else self.masker.token_mask(batch["attention_mask"])
        )
        with scope:
            with torch.autocast(self.device.type, self.amp) if self.amp else nullcontext():
                out = self.model(**batch)
            loss = out.loss
            if not torch.isfinite(loss):
                raise ValueError(f"fine-tuning loss is {loss.item()} at step {step}; lower --lr")
            loss.backward()
        apply_update(self.optimizer, self.scheduler, self.params, self.cfg.grad_clip, self.masker)
        lm = getattr(out, "lm_loss", None)
        rec = {
            "loss": float(loss.detach()),
            "answer_loss": float((lm if lm is not None else loss).detach()),
        }
        return rec, out


def evaluate_config(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: SFTConfig,
    *,
    generate: bool | None = None,
    keep_predictions: int = 0,
) -> dict[str, Any]:
    """:func:`rmoe.training.sft_eval.evaluate_examples` with ``cfg``'s evaluation settings
    (batch size, decoding budget, normalisation, length; ``generate`` defaults to
    ``cfg.generate``)."""
    return evaluate_examples(
        model,
        tokenizer,
        examples,
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.max_new_tokens,
        normalize=cfg.normalize,
        max_len=cfg.max_len,
        generate=cfg.generate if generate is None else generate,
        keep_predictions=keep_predictions,
    )


def _evaluate(
    result: SFTResult,
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example] | None,
    cfg: SFTConfig,
    step: int,
) -> None:
    """Evaluate ``examples`` (if any) and record the result at ``step`` in ``result``."""
    if not examples:
        return
    res = evaluate_config(model, tokenizer, examples, cfg, keep_predictions=20)
    result.evals.append({"step": step, **{k: v for k, v in res.items() if k != "predictions"}})
    result.final_eval = {"step": step, **res}
    log.info(
        "step %d: exact match %s, answer loss %.4f",
        step,
        fmt_number(res["exact_match"], ".3f"),
        res["answer_loss"],
    )


def _record(result: SFTResult, rec: dict[str, Any], out: Any, step: int) -> None:
    """Append one step's losses (and GW token count) to ``result``."""
    result.losses.append(rec["loss"])
    result.answer_losses.append(rec["answer_loss"])
    if result.gw_tokens is not None:
        rec["gw_tokens"] = int(getattr(out, "gw_tokens", 0) or 0)
        result.gw_tokens.append(rec["gw_tokens"])
    result.steps = step


def finetune(
    model: nn.Module,
    tokenizer: Any,
    train_examples: Sequence[Example],
    eval_examples: Sequence[Example] | None = None,
    cfg: SFTConfig | None = None,
    *,
    masker: MaskerFactory | None = None,
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
        masker: builds the gradient masker from ``(model, optimizer)`` (see :class:`SFTMasker`);
            required when ``cfg`` asks for masking.
        on_step: called as ``on_step(step, record)`` after each optimizer step.

    Returns:
        :class:`SFTResult`. A fresh AdamW is used (nothing carries over between calls).
    """
    cfg = cfg or SFTConfig()
    cfg.validate()
    _check_masker(cfg, masker)
    if not train_examples:
        raise ValueError("fine-tuning needs at least one training example")
    device = resolve_device(cfg.device)
    model.to(device)
    steps = cfg.steps or math.ceil(cfg.epochs * len(train_examples) / cfg.batch_size)
    t0 = time.perf_counter()

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    frozen = freeze_router(model) if cfg.freeze_router else []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(cfg.warmup_steps))
    router_hook = attach_router_step(model, optimizer, update_bias=not cfg.freeze_router)
    loop = _Loop(
        model,
        cfg,
        optimizer,
        scheduler,
        params,
        masker(model, optimizer) if masker is not None else None,
        autocast_dtype(cfg.dtype, device),
        device,
    )
    encoded = [encode_example(tokenizer, ex, cfg.max_len) for ex in train_examples]
    order = _batches(len(encoded), cfg.batch_size, cfg.seed)
    result = SFTResult(
        steps=0,
        gw_tokens=[] if cfg.gw_threshold is not None else None,
        frozen=frozen,
        trainable_parameters=sum(p.numel() for p in params),
        config=cfg.to_dict(),
    )

    torch_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # GW's random control draws from the global generator
    model.train()
    try:
        with gw_training(model, cfg.gw_threshold, cfg.gw_max_tokens_per_seq, cfg.gw_random):
            for step in range(1, steps + 1):
                batch = collate([encoded[i] for i in next(order)], tokenizer.pad_id, device)
                rec, out = loop.step(batch, step)
                _record(result, rec, out, step)
                if on_step is not None:
                    on_step(step, rec)
                if step % cfg.log_every == 0:
                    log.info("step %d/%d: loss %.4f", step, steps, rec["loss"])
                if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                    _evaluate(result, model, tokenizer, eval_examples, cfg, step)
    finally:
        router_hook.remove()
        if loop.masker is not None:
            loop.masker.remove()
        torch.random.set_rng_state(torch_state)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
    _evaluate(result, model, tokenizer, eval_examples, cfg, result.steps)
    result.seconds = time.perf_counter() - t0
    return result
