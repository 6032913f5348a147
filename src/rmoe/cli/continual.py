"""`rmoe continual`: continual-learning task sequences, stability-gap reports, the CPT demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rmoe.cli.finetune import add_setting, settings_from_args
from rmoe.continual.harness import ContinualConfig
from rmoe.training.sft import SFTConfig

EXAMPLE = """examples:
  # the built-in task sequence (naming -> literal -> statement -> topic), three methods
  rmoe continual run --model runs/cpt-demo/base --out runs/cl --methods plain,migu,random-mask
  # the standard CL benchmark (order 1) from the MIGU / O-LoRA CL_Benchmark directories
  rmoe continual run --model runs/base --out runs/cl-std --methods plain,migu,random-mask,replay \\
      --task dbpedia=CL_Benchmark/TC/dbpedia --task amazon=CL_Benchmark/TC/amazon \\
      --task yahoo=CL_Benchmark/TC/yahoo --task agnews=CL_Benchmark/TC/agnews
  # tasks from the Hugging Face Hub or local jsonl
  rmoe continual run --model runs/base --out runs/cl-hf \\
      --task dbpedia=hf:fancyzhx/dbpedia_14#text=content,train=1000,eval=500 \\
      --task agnews=hf:fancyzhx/ag_news#train=1000,eval=500 --task mine=data/mine.jsonl
  rmoe continual tasks --out data/cl-tasks          # write the built-in tasks as jsonl
  rmoe continual gap runs/cpt                       # stability-gap metrics + PNG of a run
  rmoe continual gap runs/cpt-full runs/cpt-subset --out runs/gap-compare
  rmoe continual cpt-demo --out runs/cpt-demo       # pre-train on code, continue on prose
"""

RUN_EXAMPLE = """Task specs: [NAME=]SOURCE[#key=value,...] with SOURCE builtin:NAME, a .jsonl/.json file,
a directory with train.jsonl and test.jsonl, or hf:NAME[:CONFIG]; options prompt=, answer=
(prompt/answer rows), text=, label= (classification rows, posed as generating the label name
with the task name in the prompt), train=N, eval=N, holdout=F, max_chars=N.
Without --task: the built-in sequence builtin:naming, builtin:literal, builtin:statement,
builtin:topic (from the Python standard library and pydoc; see rmoe.continual.tasks).

Outputs: OUT/<method>/accuracy_matrix.{json,md,png}, answer_loss_matrix.json, result.json,
predictions.json; OUT/summary.{json,md} with AA, BWT, forgetting and FWT per method.

example:
  rmoe continual run --model runs/cpt-demo/base --out runs/cl --methods plain,migu,random-mask
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "continual",
        help="continual learning: task sequences (MIGU, replay), stability gap, CPT demo",
        description=(
            "Continual learning on rmoe models: train a sequence of tasks with plain "
            "fine-tuning, MIGU, random masking or replay and report the accuracy matrix, AA, "
            "BWT and forgetting; measure the stability gap of continual pre-training runs."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = p.add_subparsers(dest="continual_command", metavar="SUBCOMMAND")
    for add in (_add_run, _add_tasks, _add_gap, _add_cpt_demo):
        add(cmds)
    return p


def _add_run(cmds: argparse._SubParsersAction) -> None:
    """``rmoe continual run``: a task sequence with each method."""
    r = cmds.add_parser(
        "run",
        help="train a task sequence with one or more methods",
        description="Train tasks one after another; evaluate every task after every stage.",
        epilog=RUN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--model", required=True, help="run directory or saved model to start from")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="SPEC",
        help="a task, in training order (repeatable; default: the built-in sequence)",
    )
    r.add_argument(
        "--methods",
        default="plain,migu,random-mask",
        help="comma-separated: plain, migu, random-mask, replay, or combinations like "
        "migu+replay (default plain,migu,random-mask)",
    )
    # run settings: each flag is a field of SFTConfig or ContinualConfig (rmoe.cli.finetune)
    add_setting(
        r, SFTConfig, "steps", "--steps-per-task", default=150, help="optimizer steps per stage"
    )
    add_setting(r, SFTConfig, "batch_size", default=32)
    add_setting(r, SFTConfig, "lr", help=None)
    add_setting(r, SFTConfig, "weight_decay")
    add_setting(r, SFTConfig, "max_len", default=128, help="tokens per example")
    add_setting(r, ContinualConfig, "migu_ratio")
    add_setting(r, ContinualConfig, "migu_norm")
    add_setting(r, ContinualConfig, "mask_first_task")
    add_setting(
        r,
        SFTConfig,
        "mask_targets",
        help="weights migu / random-mask cover: glob patterns on module / expert-parameter "
        "names, e.g. '*.experts.*' (default: every nn.Linear and expert weight)",
    )
    add_setting(r, ContinualConfig, "replay_size")
    r.add_argument("--train-per-task", type=int, default=1000, help="training examples per task")
    r.add_argument("--eval-per-task", type=int, default=200, help="evaluation examples per task")
    add_setting(r, ContinualConfig, "metric")
    add_setting(r, SFTConfig, "normalize")
    add_setting(r, SFTConfig, "seed")
    add_setting(r, SFTConfig, "device")
    r.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")


def _add_tasks(cmds: argparse._SubParsersAction) -> None:
    """``rmoe continual tasks``: write the built-in tasks."""
    t = cmds.add_parser(
        "tasks",
        help="write the built-in tasks as jsonl",
        description="Write each built-in task as DIR/<name>/{train,test}.jsonl (prompt, answer).",
        epilog="example:\n  rmoe continual tasks --out data/cl-tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--out", required=True)
    t.add_argument("--train-per-task", type=int, default=1000)
    t.add_argument("--eval-per-task", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)


def _add_gap(cmds: argparse._SubParsersAction) -> None:
    """``rmoe continual gap``: stability-gap reports of runs."""
    g = cmds.add_parser(
        "gap",
        help="stability-gap metrics and PNG from runs' metrics.jsonl",
        description=(
            "Read the evaluation curves of one or more training runs (continual pre-training "
            "with --init-from and a dense evaluation schedule) and report, per evaluated corpus, "
            "the dip depth, worst step, steps to recover, gap area, mean loss and final value."
        ),
        epilog="examples:\n  rmoe continual gap runs/cpt\n"
        "  rmoe continual gap runs/cpt-a runs/cpt-b --names a,b --out runs/gap",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("runs", nargs="+", metavar="RUN_DIR")
    g.add_argument("--out", help="output directory (default: the run itself, for one run)")
    g.add_argument("--names", help="comma-separated labels of the runs")
    g.add_argument("--tolerance", type=float, default=0.0, help="recovered within this of start")


def _add_cpt_demo(cmds: argparse._SubParsersAction) -> None:
    """``rmoe continual cpt-demo``: the continual pre-training demo."""
    d = cmds.add_parser(
        "cpt-demo",
        help="continual pre-training demo: code -> prose, each strategy, same token budget",
        description=(
            "Pre-train a small RMoE on python-stdlib, continue on pydoc-topics with each "
            "strategy (full, subset, relevance, replay, combined) at the same token budget, and "
            "compare their stability gaps on both domains."
        ),
        epilog="examples:\n  rmoe continual cpt-demo --out runs/cpt-demo\n"
        "  rmoe continual cpt-demo --out runs/cpt-demo-s1 --base runs/cpt-demo/base --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--out", required=True)
    d.add_argument(
        "--base", help="continue from this finished base run instead of pre-training OUT/base"
    )
    d.add_argument("--pretrain-steps", type=int, default=600)
    d.add_argument("--steps", type=int, default=150, help="steps per continual arm (the budget)")
    d.add_argument("--lr", type=float, default=3e-3)
    d.add_argument("--epochs", type=int, default=4, help="epochs of the subset arms")
    d.add_argument("--replay-ratio", type=float, default=0.25)
    d.add_argument("--arms", default="full,subset,relevance,replay,combined")
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")


def _run_sequence(args: argparse.Namespace) -> int:
    import torch

    from rmoe.continual.harness import compare_methods, parse_method
    from rmoe.continual.tasks import DEMO_SEQUENCE, load_task
    from rmoe.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        parse_method(m)
    sft = SFTConfig(**settings_from_args(args, SFTConfig))
    specs = args.task or [f"builtin:{n}" for n in DEMO_SEQUENCE]
    tasks = [load_task(s, sft.seed, args.train_per_task, args.eval_per_task) for s in specs]
    for task in tasks:
        print(f"task {task.name}: {len(task.train)} train, {len(task.eval)} eval ({task.source})")
    cfg = ContinualConfig(sft=sft, **settings_from_args(args, ContinualConfig))
    cfg.validate()

    def load():
        model, tok, _ = load_model(args.model, device=sft.device)
        return model, tok

    def report(method: str, stage: int, info: dict) -> None:
        accs = ", ".join(f"{k}={v:.2f}" for k, v in info["accuracy"].items())
        print(f"[{method}] after {info['task']} ({info['seconds']:.0f}s): {accs}", flush=True)

    results = compare_methods(load, tasks, methods, cfg, args.out, on_stage=report)
    print()
    print((Path(args.out) / "summary.md").read_text())
    print(f"results: {args.out}/summary.md, {args.out}/<method>/accuracy_matrix.png")
    return 0 if results else 1


def _write_tasks(args: argparse.Namespace) -> int:
    from rmoe.continual.tasks import BUILTIN_TASKS, builtin_task, write_task

    for name in BUILTIN_TASKS:
        task = builtin_task(name, args.train_per_task, args.eval_per_task, args.seed)
        d = write_task(task, Path(args.out) / name)
        print(f"{name}: {len(task.train)} train, {len(task.eval)} test -> {d}")
    return 0


def _gap(args: argparse.Namespace) -> int:
    from rmoe.continual.gap import compare_gap_reports, write_gap_report

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    if len(args.runs) == 1 and names is None:
        paths = write_gap_report(args.runs[0], args.out, args.tolerance)
    else:
        paths = compare_gap_reports(args.runs, args.out or ".", names, args.tolerance)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cpt_demo(args: argparse.Namespace) -> int:
    from rmoe.continual.demo import CPTDemoSettings, run_cpt_demo

    settings = CPTDemoSettings(
        pretrain_steps=args.pretrain_steps,
        steps=args.steps,
        lr=args.lr,
        epochs=args.epochs,
        replay_ratio=args.replay_ratio,
        threads=args.threads,
        seed=args.seed,
    )
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]

    def report(arm: str, manifest: dict) -> None:
        print(
            f"arm {arm}: {manifest['selected_tokens']:,} new-domain tokens, "
            f"{manifest['replay_tokens']:,} replay tokens, "
            f"{manifest['epochs_over_derived_data']:.2f} epochs",
            flush=True,
        )

    paths = run_cpt_demo(
        args.out, settings, arms, progress=not args.no_progress, on_arm=report, base=args.base
    )
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    handlers = {
        "run": _run_sequence,
        "tasks": _write_tasks,
        "gap": _gap,
        "cpt-demo": _cpt_demo,
    }
    command = getattr(args, "continual_command", None)
    if command not in handlers:
        print("usage: rmoe continual {run,tasks,gap,cpt-demo} ... (see rmoe continual --help)")
        return 1
    return handlers[command](args)
