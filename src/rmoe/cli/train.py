"""`rmoe train`: train a model from a preset or YAML config."""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXAMPLE = """examples:
  rmoe train tiny --out runs/tiny-rmoe
  rmoe train tiny --out runs/tiny-smoe --set model.router_type=linear
  rmoe train enwik8-medium --out runs/e8 --set data.corpus=enwik8:/data/enwik8
  rmoe train runs/tiny-rmoe/config.yaml --out runs/tiny-rmoe --resume
  torchrun --nproc_per_node 8 -m rmoe.cli.main train enwik8-medium --out runs/e8-ddp
  rmoe train tiny --out runs/cpt --init-from runs/tiny-rmoe --set data.corpus=pydoc-topics

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
    p.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    return p


def run(args: argparse.Namespace) -> int:
    from rmoe.training import load_config, train, valid_keys

    if args.list_keys:
        print("\n".join(valid_keys()))
        return 0
    if not args.out:
        raise ValueError("--out DIR is required (the run directory)")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cfg = load_config(args.config, args.set)
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
    msg = f"{result.status} at step {result.step}; {result.tokens_per_s:,.0f} tokens/s"
    if ev:
        msg += f"; valid loss {ev['loss']:.4f}, bits/byte {ev['bpb']:.4f}, ppl {ev['ppl']:.3f}"
    print(msg)
    print(f"run directory: {result.run_dir}")
    return 0 if result.status != "interrupted" else 130
