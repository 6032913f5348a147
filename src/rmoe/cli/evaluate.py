"""`rmoe eval`: loss, bits per byte and perplexity of a run or saved model."""

from __future__ import annotations

import argparse
import json

EXAMPLE = """examples:
  rmoe eval runs/tiny-rmoe
  rmoe eval runs/tiny-rmoe --split test --max-batches 0
  rmoe eval runs/tiny-rmoe --data text:./my_corpus --seq-len 512
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="evaluate a run or saved model (loss, bits/byte, perplexity)",
        description="Evaluate on a split of the run's corpus (or --data). Prints JSON.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="run directory or saved model directory")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--data", help="corpus spec (default: the run's corpus, else python-stdlib)")
    p.add_argument("--text-field", default=None, help="text field for jsonl/parquet/hf corpora")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=100, help="0 = the whole split")
    p.add_argument("--tokenizer", help="tokenizer.json or directory (default: the saved one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the JSON result here")
    return p


def run(args: argparse.Namespace) -> int:
    from rmoe.training.evaluation import evaluate_path

    res = evaluate_path(
        args.path,
        split=args.split,
        data=args.data,
        text_field=args.text_field,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=args.device,
        tokenizer=args.tokenizer,
    )
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0
