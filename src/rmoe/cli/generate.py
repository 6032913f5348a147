"""`rmoe generate`: sample text from a run or saved model."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  rmoe generate runs/tiny-rmoe --prompt "def main(" --max-new-tokens 200
  rmoe generate runs/tiny-rmoe --prompt "import " --temperature 0 --out sample.txt
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="sample text from a run or saved model",
        description="Generate a continuation of --prompt (KV-cached). Temperature 0 = greedy.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="run directory or saved model directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the sample (prompt + continuation) to this file")
    return p


def run(args: argparse.Namespace) -> int:
    from rmoe.training.evaluation import generate_text

    text = generate_text(
        args.path,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
    )
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0
