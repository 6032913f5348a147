"""`rmoe finetune`: supervised fine-tuning of a run or saved model on prompt -> answer jsonl."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from rmoe.training.sft import EVAL, MACHINE, MASKING, OPTIM, ROUTING, SFTConfig

EXAMPLE = """examples:
  rmoe finetune runs/tiny-rmoe --data train.jsonl --eval-data test.jsonl --out runs/ft
  rmoe finetune runs/tiny-rmoe --data qa.jsonl --prompt-field question --answer-field answer \\
      --steps 300 --lr 5e-4 --freeze-router --gw-threshold 0.8 --gw-max-tokens-per-seq 8 --out runs/ft-gw
  rmoe finetune runs/tiny-rmoe --data qa.jsonl --freeze-router --gw-threshold 0.8 --gw-random --out runs/ft-gw-ctl
  rmoe finetune runs/tiny-rmoe --data task2.jsonl --migu-ratio 0.7 --out runs/ft-migu
  rmoe finetune runs/tiny-rmoe --data task2.jsonl --random-mask-ratio 0.7 --out runs/ft-rand

Data: one JSON object per line (or a .json list); the loss is on the answer tokens only.
Without --eval-data, --holdout F of the rows (default 0.1) is held out for evaluation.
The output directory holds the fine-tuned model and tokenizer (Hugging Face format, loadable by
`rmoe eval`, `rmoe generate` and AutoModelForCausalLM) and finetune.json (config, loss curve,
exact match and answer loss before and after).
"""


def parse_globs(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` for ``--mask-targets`` (argparse type)."""
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError(
            "expected comma-separated glob patterns such as '*.experts.*,*.attn.*'"
        )
    return patterns


# ----------------------------------------------------------------------------------------------
# Flags generated from the run settings (rmoe.training.sft.Flag on each dataclass field)
# ----------------------------------------------------------------------------------------------
def _value_type(hint: Any) -> Any:
    """The argparse ``type`` of a field annotation: ``X | None`` -> X; ``list[str]`` -> globs."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return parse_globs
    return hint


def add_setting(parser: Any, cls: type, name: str, flag: str | None = None, **overrides) -> None:
    """Add the flag of the dataclass field ``cls.name`` to ``parser`` (a parser or group).

    The flag is ``--name-with-dashes`` (or ``flag``); type and default come from the field, help,
    choices and metavar from its :class:`rmoe.training.sft.Flag`; ``overrides`` replace any
    argparse keyword (a different default or help for one command). The value lands in
    ``args.<cls name>.<field>``, read back by :func:`settings_from_args`.
    """
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    meta = field.metadata.get("flag") if field is not None else None
    if meta is None:
        raise ValueError(f"{cls.__name__}.{name} is not a command-line setting (no Flag)")
    option = flag or "--" + name.replace("_", "-")
    hint = typing.get_type_hints(cls)[name]
    kw: dict[str, Any] = {"dest": f"{cls.__name__}.{name}", "default": field.default}
    if hint is bool:
        kw["action"] = "store_true"
    else:
        kw["type"] = _value_type(hint)
        if meta.choices:
            kw["choices"] = list(meta.choices)
        else:
            kw["metavar"] = meta.metavar or option.lstrip("-").replace("-", "_").upper()
    kw["help"] = meta.help
    kw.update(overrides)
    parser.add_argument(option, **kw)


def add_settings(parser: Any, cls: type, group: str) -> None:
    """Add the flags of every field of ``cls`` whose Flag is in ``group``, in field order."""
    for field in dataclasses.fields(cls):
        meta = field.metadata.get("flag")
        if meta is not None and meta.group == group:
            add_setting(parser, cls, field.name)


def settings_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """``{field: value}`` of the ``cls`` settings parsed by the flags :func:`add_setting` added."""
    prefix = f"{cls.__name__}."
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


GROUP_TITLES = {
    OPTIM: "optimisation",
    ROUTING: "MoE routing (GW-MoE, arXiv 2406.12375)",
    MASKING: "gradient masking (MIGU, arXiv 2406.17245)",
    EVAL: "evaluation",
    MACHINE: "machine",
}
"""``rmoe finetune --help`` sections, in order, one per :class:`rmoe.training.sft.Flag` group."""


def _add_command_flags(g: Any, group: str) -> None:
    """The flags of ``rmoe finetune`` in section ``group`` that are not fine-tuning settings."""
    if group == EVAL:
        g.add_argument(
            "--eval-limit", type=int, default=0, help="evaluate at most N examples (0 = all)"
        )
        g.add_argument(
            "--no-eval-before", action="store_true", help="skip the evaluation before training"
        )
    elif group == MACHINE:
        g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="supervised fine-tuning on prompt -> answer data (GW-MoE, MIGU options)",
        description=(
            "Fine-tune a run or saved model on prompt/answer pairs with the loss on the answer "
            "tokens only; evaluate by exact match of greedy answers and by answer loss."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="RUN_OR_MODEL", help="run directory or saved model directory")
    p.add_argument("--data", required=True, help="training data (.jsonl or .json list)")
    p.add_argument("--eval-data", help="evaluation data (default: a held-out share of --data)")
    p.add_argument("--holdout", type=float, default=0.1, help="held-out share without --eval-data")
    p.add_argument(
        "--prompt-field", default="prompt", help="field with the prompt (default prompt)"
    )
    p.add_argument(
        "--answer-field", default="answer", help="field with the answer (default answer)"
    )
    p.add_argument(
        "--out", required=True, help="output directory (model, tokenizer, finetune.json)"
    )
    for key, title in GROUP_TITLES.items():
        g = p.add_argument_group(title)
        add_settings(g, SFTConfig, key)
        _add_command_flags(g, key)
    return p


def _split(examples, holdout: float, seed: int):
    import random

    if not 0 < holdout < 1:
        raise ValueError(
            f"--holdout must be in (0, 1) when --eval-data is not given, got {holdout}"
        )
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(holdout * len(examples))))
    held = set(idx[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    if not train:
        raise ValueError("--holdout leaves no training examples; add data or pass --eval-data")
    return train, evals


def run(args: argparse.Namespace) -> int:
    import torch

    from rmoe.continual.masking import masker_factory
    from rmoe.data.examples import load_examples
    from rmoe.loading import load_model
    from rmoe.training.sft import evaluate_config, finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SFTConfig(**settings_from_args(args, SFTConfig))
    cfg.validate()
    if (cfg.gw_random or cfg.gw_max_tokens_per_seq) and cfg.gw_threshold is None:
        raise ValueError("--gw-random / --gw-max-tokens-per-seq need --gw-threshold")
    train = load_examples(args.data, args.prompt_field, args.answer_field)
    if args.eval_data:
        evals = load_examples(args.eval_data, args.prompt_field, args.answer_field)
    else:
        train, evals = _split(train, args.holdout, cfg.seed)
    if args.eval_limit:
        evals = evals[: args.eval_limit]
    model, tokenizer, _ = load_model(args.model, device=cfg.device)
    before = None
    if not args.no_eval_before:
        before = evaluate_config(model, tokenizer, evals, cfg, generate=True)
        print(
            f"before: exact match {before['exact_match']:.3f}, answer loss "
            f"{before['answer_loss']:.4f} ({len(evals)} examples)"
        )
    result = finetune(model, tokenizer, train, evals, cfg, masker=masker_factory(cfg))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save(out)
    payload = {
        "model": str(args.model),
        "data": str(args.data),
        "eval_data": str(args.eval_data) if args.eval_data else f"holdout {args.holdout}",
        "train_examples": len(train),
        "eval_examples": len(evals),
        "before": before,
        **result.to_dict(),
    }
    (out / "finetune.json").write_text(json.dumps(payload, indent=2) + "\n")
    ev = result.final_eval
    notes = []
    if cfg.method != "plain":
        notes.append(f"{cfg.method} gradient masking")
    if cfg.freeze_router:
        notes.append("router frozen")
    if result.gw_tokens:
        mean = sum(result.gw_tokens) / len(result.gw_tokens)
        kind = "random tokens (control)" if cfg.gw_random else "uncertain tokens"
        notes.append(f"GW broadcast {mean:.1f} {kind}/step")
    print(
        f"after {result.steps} steps{' (' + '; '.join(notes) + ')' if notes else ''}: "
        f"exact match {ev['exact_match']:.3f}, answer loss {ev['answer_loss']:.4f}"
    )
    print(f"model: {out}  metrics: {out / 'finetune.json'}")
    return 0
