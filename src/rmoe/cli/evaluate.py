"""`rmoe eval`: loss, bits per byte and perplexity of a run or saved model; with `--tasks`,
downstream tasks through lm-evaluation-harness (`rmoe.integrations.lm_eval`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLE = """examples:
  rmoe eval runs/tiny-rmoe
  rmoe eval runs/tiny-rmoe --split test --max-batches 0
  rmoe eval runs/tiny-rmoe --data text:./my_corpus --seq-len 512

downstream tasks (pip install 'rmoe[eval]'; offline):
  rmoe eval runs/tiny-rmoe --tasks rmoe_pydoc_mc --limit 100
  rmoe eval runs/tiny-rmoe --tasks rmoe_pydoc            # both built-in tasks
  rmoe eval runs/big --tasks arc_easy,sciq --include-path ./my_tasks --num-fewshot 0
    (./my_tasks: task YAMLs pointing lm_eval's tasks at local data files; see
     `python -c "import rmoe.integrations.lm_eval as m; help(m)"`)
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="evaluate a run or saved model (loss, bits/byte, perplexity; or --tasks)",
        description=(
            "Evaluate on a split of the run's corpus (or --data); prints JSON. With --tasks, "
            "run lm-evaluation-harness tasks instead: prints a table (task, metric, value, "
            "stderr) and writes JSON to RUN/lm_eval/ (or --out)."
        ),
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
    t = p.add_argument_group("downstream tasks (lm-evaluation-harness)")
    t.add_argument(
        "--tasks",
        help="comma-separated lm_eval task, group or tag names, e.g. rmoe_pydoc_mc,arc_easy",
    )
    t.add_argument(
        "--include-path",
        action="append",
        default=None,
        metavar="DIR",
        help="folder of local task YAMLs (repeatable)",
    )
    t.add_argument("--limit", type=float, default=None, help="items per task (a fraction when < 1)")
    t.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    if args.tasks:
        return _run_tasks(args)
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


def _run_tasks(args: argparse.Namespace) -> int:
    """`--tasks`: run lm_eval tasks, print the table, write the JSON."""
    from rmoe.integrations.lm_eval import (
        evaluate_tasks,
        format_table,
        output_name,
        require_lm_eval,
    )

    require_lm_eval()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise ValueError(f"--limit must be a whole number of items or a fraction < 1: {limit}")
        limit = int(limit)
    res = evaluate_tasks(
        args.path,
        tasks,
        include_path=args.include_path,
        limit=limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        tokenizer=args.tokenizer,
        max_length=args.seq_len,
    )
    run_dir = Path(args.path)
    run_dir = run_dir.parent if run_dir.is_file() else run_dir
    out = Path(args.out) if args.out else run_dir / "lm_eval" / output_name(tasks, limit)
    body = {"model": str(args.path), **res.to_dict()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=1, allow_nan=False) + "\n")
    print(format_table(res.scores))
    print(f"\nwritten: {out}")
    return 0
