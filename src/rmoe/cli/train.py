"""`rmoe train`: train a model from a preset or YAML config."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXAMPLE = """examples:
  rmoe train tiny --out runs/tiny-rmoe
  rmoe train tiny --out runs/tiny-smoe --set model.router_type=linear
  rmoe train enwik8-medium --out runs/e8 --set data.corpus=enwik8:/data/enwik8
  rmoe train runs/tiny-rmoe/config.yaml --out runs/tiny-rmoe --resume
  torchrun --nproc_per_node 8 -m rmoe.cli.main train enwik8-medium --out runs/e8-ddp
  rmoe train tiny --out runs/cpt --init-from runs/tiny-rmoe --set data.corpus=pydoc-topics

continual pre-training strategies (with --init-from; data.corpus is the new domain):
  rmoe train tiny --out runs/cpt-sub --init-from runs/tiny-rmoe --set data.corpus=pydoc-topics \\
      --subset-tokens 100000 --epochs 4
  rmoe train tiny --out runs/cpt-rel --init-from runs/tiny-rmoe --set data.corpus=pydoc-topics \\
      --select relevance --select-top 0.25 --select-reference builtin:docstrings --epochs 4
  rmoe train tiny --out runs/cpt-mix --init-from runs/tiny-rmoe --set data.corpus=pydoc-topics \\
      --replay python-stdlib --replay-ratio 0.25
The chosen data is written to RUN/cpt_data (a text corpus; RUN/cpt_manifest.json says what is
in it); the old domain is added to data.extra_eval; evaluation is log-spaced (dense at the start)
unless configured; at the end RUN/gap.{json,md,png} report the stability gap (also:
rmoe continual gap RUN).

Config keys are section.key (model.*, data.*, optim.*, train.*); see `rmoe train --list-keys`.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a model (preset or YAML config)",
        description="Train an rmoe model. Presets: tiny, enwik8-small, enwik8-medium, llama-0.9b.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", nargs="?", default="tiny", help="preset name or YAML file (default: tiny)"
    )
    p.add_argument("--out", required=False, help="run directory (required unless --list-keys)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    p.add_argument(
        "--init-from",
        help="start from the weights of this run or saved model (continual pre-training)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = p.add_argument_group(
        "continual pre-training strategies (rmoe.continual.cpt; use with --init-from)"
    )
    c.add_argument(
        "--subset-tokens", type=int, help="train on a subset of about N tokens of the new domain"
    )
    c.add_argument(
        "--epochs",
        type=float,
        help="passes over the chosen data: sets train.max_steps (subset x epochs = budget)",
    )
    c.add_argument(
        "--select",
        choices=["random", "relevance", "perplexity"],
        help="how the subset is chosen: random, relevance to --select-reference, or lowest "
        "perplexity under the starting model",
    )
    c.add_argument("--select-top", type=float, help="share of the new domain's tokens to keep")
    c.add_argument(
        "--select-scorer",
        choices=["tfidf", "ngram"],
        default="tfidf",
        help="relevance scorer: TF-IDF cosine or character-trigram Moore-Lewis (default tfidf)",
    )
    c.add_argument(
        "--select-reference",
        help="reference sample of the target domain: corpus spec, text file or builtin:docstrings",
    )
    c.add_argument(
        "--chunk-chars",
        type=int,
        default=0,
        help="cut documents into pieces of at most N characters before selecting (0 = whole)",
    )
    c.add_argument(
        "--replay", metavar="CORPUS", help="mix this corpus (the original domain) back in"
    )
    c.add_argument("--replay-ratio", type=float, default=0.0, help="share of replayed tokens")
    c.add_argument(
        "--old-corpus",
        help="original domain to evaluate (default: the --init-from run's corpus)",
    )
    c.add_argument("--no-gap-report", action="store_true", help="do not write RUN/gap.* at the end")
    p.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    return p


def run(args: argparse.Namespace) -> int:
    from rmoe.training import load_config, train, valid_keys

    if args.list_keys:
        print("\n".join(valid_keys()))
        return 0
    if not args.out:
        raise ValueError("--out DIR is required (the run directory)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(
            f"--out {args.out} is a file, not a folder; pass the path of a new or empty folder "
            "(or of a run to continue with --resume)"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from rmoe.runtime import lone_launch_warning

    if (warning := lone_launch_warning()) is not None:
        print(f"rmoe train: {warning}", file=sys.stderr)
    cfg = load_config(args.config, args.set)
    _warn_rope_extrapolation(cfg)
    cpt = _cpt_options(args)
    if cpt is not None:
        from rmoe.continual.cpt import prepare_continual_pretraining

        if args.init_from is None and not args.resume:
            raise ValueError(
                "continual pre-training options need --init-from RUN (the model to continue)"
            )
        cfg, manifest = prepare_continual_pretraining(
            cfg, args.out, args.init_from, cpt, resume=args.resume
        )
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"continual pre-training data: {manifest['selected_tokens']:,} of "
                f"{manifest['pool_tokens']:,} new-domain tokens, {manifest['replay_tokens']:,} "
                f"replay tokens; {cfg.train.max_steps} steps "
                f"({manifest['epochs_over_derived_data']:.2f} epochs) -> {cfg.data.corpus}",
                file=sys.stderr,
            )
    result = train(
        cfg,
        args.out,
        resume=args.resume,
        init_from=args.init_from,
        progress=not args.no_progress,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if result.status != "interrupted" else 130
    ev = result.final_eval
    msg = f"{result.status} at step {result.step}"
    if result.status != "already_finished":
        msg += f"; {result.tokens_per_s:,.0f} tokens/s"
    if ev:
        msg += f"; valid loss {ev['loss']:.4f}, bits/byte {ev['bpb']:.4f}, ppl {ev['ppl']:.3f}"
    print(msg)
    print(f"run directory: {result.run_dir}")
    print(_how_it_ended(args, cfg, result), file=sys.stderr)
    if (cpt is not None or args.init_from) and not args.no_gap_report:
        from rmoe.continual.gap import write_gap_report

        try:
            paths = write_gap_report(result.run_dir)
            print(f"stability gap: {paths['markdown']} ({paths['png'].name})")
        except ValueError as exc:  # no evaluation curve to measure
            print(f"stability gap: not written ({exc})", file=sys.stderr)
    return 0 if result.status != "interrupted" else 130


def _cpt_options(args: argparse.Namespace):
    """The continual pre-training options given on the command line, or None."""
    from rmoe.continual.cpt import CPTOptions

    opts = CPTOptions(
        subset_tokens=args.subset_tokens,
        epochs=args.epochs,
        select=args.select,
        select_top=args.select_top,
        scorer=args.select_scorer,
        reference=args.select_reference,
        chunk_chars=args.chunk_chars,
        replay=args.replay,
        replay_ratio=args.replay_ratio,
        old_corpus=args.old_corpus,
    )
    return opts if opts.active() or args.old_corpus else None


def _how_it_ended(args: argparse.Namespace, cfg, result) -> str:
    """A plain-words line: whether the run reached its end and how to continue it."""
    total = cfg.train.max_steps
    again = f"rmoe train {args.config or 'CONFIG'} --out {args.out} --resume"
    if result.status == "time_limit":
        return (
            f"stopped early: train.time_limit_s={cfg.train.time_limit_s:g} s reached at step "
            f"{result.step} of {result.end_step or total}; the last checkpoint is saved. "
            f"Continue with: {again}"
        )
    if result.status == "interrupted":
        return f"stopped early at step {result.step} of {total}; continue with: {again}"
    if result.status == "already_finished":
        return (
            f"already finished at step {result.step} (max_steps {total}); nothing was trained "
            f"or written. To train further raise it: --set train.max_steps=N with N > {result.step}"
        )
    if result.step < total:
        return (
            f"finished inside train.time_budget_s={cfg.train.time_budget_s:g} s: step "
            f"{result.step} of max_steps {total} (the learning-rate schedule decayed to step "
            f"{result.step}); for more steps give a larger budget (--set train.time_budget_s=S)"
        )
    return f"finished: all {total} steps"


def _warn_rope_extrapolation(cfg) -> None:
    """A warning when data.seq_len exceeds model.max_position_embeddings under RoPE scaling
    (without scaling the config's validation refuses it)."""
    model = cfg.model_config(vocab_size=cfg.model.get("vocab_size", 258))
    if cfg.data.seq_len > model.max_position_embeddings and model.rope_scaling:
        print(
            f"rmoe train: warning: data.seq_len={cfg.data.seq_len} is longer than "
            f"model.max_position_embeddings={model.max_position_embeddings}; relying on "
            f"rope_scaling={model.rope_scaling} to extrapolate",
            file=sys.stderr,
        )
