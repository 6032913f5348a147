"""`rmoe finetune`: supervised fine-tuning of a run or saved model on prompt -> answer jsonl."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = --epochs passes)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data if --steps 0")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 = off")
    g.add_argument("--max-len", type=int, default=256, help="tokens per example (prompt cut left)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("MoE routing (GW-MoE, arXiv 2406.12375)")
    g.add_argument(
        "--freeze-router", action="store_true", help="no updates to routers and the shared cell"
    )
    g.add_argument(
        "--gw-threshold",
        type=float,
        help="broadcast tokens whose normalised router entropy exceeds this to all experts "
        "(training only)",
    )
    g.add_argument("--gw-max-tokens-per-seq", type=int, help="GW cap per sequence")
    g.add_argument(
        "--gw-random",
        action="store_true",
        help="control: broadcast as many tokens as GW would, chosen at random",
    )
    g = p.add_argument_group("gradient masking (MIGU, arXiv 2406.17245)")
    g.add_argument(
        "--migu-ratio",
        type=float,
        help="mask this share of each layer's rows (0.7 = update top 30%%)",
    )
    g.add_argument(
        "--migu-norm", choices=["l1", "raw"], default="l1", help="l1 = paper, raw = code"
    )
    g.add_argument(
        "--random-mask-ratio", type=float, help="control: mask this share of rows at random"
    )
    g.add_argument(
        "--freeze-masked-rows",
        action="store_true",
        help="keep masked rows still through weight decay and Adam momentum",
    )
    g.add_argument(
        "--mask-targets",
        type=parse_globs,
        default=None,
        metavar="GLOB[,GLOB...]",
        help="weights the mask covers: glob patterns on module / expert-parameter names, e.g. "
        "'*.experts.*,*.attn.*' (default: every nn.Linear and expert weight)",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0 = end)")
    g.add_argument("--eval-batch-size", type=int, default=64)
    g.add_argument("--max-new-tokens", type=int, default=0, help="0 = longest answer + 4")
    g.add_argument("--normalize", choices=["squad", "strip", "none"], default="squad")
    g.add_argument(
        "--eval-limit", type=int, default=0, help="evaluate at most N examples (0 = all)"
    )
    g.add_argument(
        "--no-eval-before", action="store_true", help="skip the evaluation before training"
    )
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
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
    from rmoe.training.sft import SFTConfig, finetune
    from rmoe.training.sft_eval import evaluate_examples

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SFTConfig(
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        max_len=args.max_len,
        seed=args.seed,
        freeze_router=args.freeze_router,
        gw_threshold=args.gw_threshold,
        gw_max_tokens_per_seq=args.gw_max_tokens_per_seq,
        gw_random=args.gw_random,
        migu_ratio=args.migu_ratio,
        migu_norm=args.migu_norm,
        random_mask_ratio=args.random_mask_ratio,
        freeze_masked_rows=args.freeze_masked_rows,
        mask_targets=args.mask_targets,
        eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens,
        normalize=args.normalize,
        device=args.device,
        dtype=args.dtype,
    )
    cfg.validate()
    if (args.gw_random or args.gw_max_tokens_per_seq) and args.gw_threshold is None:
        raise ValueError("--gw-random / --gw-max-tokens-per-seq need --gw-threshold")
    train = load_examples(args.data, args.prompt_field, args.answer_field)
    if args.eval_data:
        evals = load_examples(args.eval_data, args.prompt_field, args.answer_field)
    else:
        train, evals = _split(train, args.holdout, args.seed)
    if args.eval_limit:
        evals = evals[: args.eval_limit]
    model, tokenizer, _ = load_model(args.model, device=args.device)
    before = None
    if not args.no_eval_before:
        before = evaluate_examples(
            model,
            tokenizer,
            evals,
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
            normalize=cfg.normalize,
            max_len=cfg.max_len,
        )
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
