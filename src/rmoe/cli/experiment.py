"""`rmoe experiment`: train a grid of router arms at matched budgets and compare them."""

from __future__ import annotations

import argparse
import shlex
import sys

EXAMPLE = """examples:
  rmoe experiment --list                                   # shipped specs
  rmoe experiment cpu-mechanism --out runs/exp/cpu-mechanism --workers 2
  rmoe experiment gpu-10min --quick --out /tmp/gpu-smoke   # seconds on a CPU: checks the spec
  rmoe experiment gpu-10min --out runs/exp/gpu-10min --workers 6
  rmoe experiment my-spec.yaml --only rmoe --only smoe     # some arms; rerun later for the rest
  rmoe experiment cpu-mechanism --dry-run                  # the plan: runs, steps, FLOPs

A rerun with the same --out skips finished runs, resumes interrupted ones from their last
checkpoint, and rewrites summary.md, results.json and the plots.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "experiment",
        help="compare routers: train a grid of arms at matched budgets, report with CIs",
        description=(
            "Run an experiment spec: a base config and a grid of arms (router variant x depth x "
            "seed) trained with identical data order and non-router initial weights per seed, "
            "budgets matched by tokens or FLOPs (optionally wall-clock), as parallel resumable "
            "subprocesses. Writes OUT/summary.md, OUT/results.json and PNG plots (loss curves, "
            "bits/byte vs depth, routing statistics), with paired bootstrap intervals against "
            "the reference arm."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec",
        nargs="?",
        help="shipped spec name (cpu-mechanism, gpu-10min, paper-enwik8-medium, paper-depth) "
        "or a YAML file",
    )
    p.add_argument("--out", help="experiment folder (default: runs/experiments/SPEC_NAME)")
    p.add_argument(
        "--workers", type=int, default=None, help="runs trained at once (default: the spec's)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per run (default: the spec's, else cores / workers)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="ARM",
        help="run only this arm (repeatable or comma-separated)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="shrink the spec to a tiny model and a few steps (seconds on a CPU) to check it",
    )
    p.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="folder of small per-run results to commit (default: the spec's `results:`); "
        "runs found there with the same config count as done, finished runs are copied there",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--list", action="store_true", help="list the shipped specs and exit")
    return p


def run(args: argparse.Namespace) -> int:
    import logging

    from rmoe.experiments import (
        format_plan,
        load_spec,
        plan_runs,
        quick_spec,
        run_experiment,
        spec_names,
    )
    from rmoe.experiments.spec import spec_text

    if args.list:
        for name in spec_names():
            first = next(
                (ln[1:].strip() for ln in spec_text(name).splitlines() if ln.startswith("#")), ""
            )
            print(f"{name:22s} {first}")
        return 0
    if not args.spec:
        raise ValueError("give a spec name or YAML file (see `rmoe experiment --list`)")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    spec = load_spec(args.spec)
    if args.quick:
        spec = quick_spec(spec)
    only = [a.strip() for item in args.only for a in item.split(",") if a.strip()]
    out = args.out or f"runs/experiments/{spec.name}"
    runs = plan_runs(spec, only or None)
    print(f"experiment {spec.name}: {len(runs)} runs -> {out}")
    for line in format_plan(runs):
        print(f"  {line}")
    if args.dry_run:
        return 0

    def on_done(o) -> None:
        msg = f"  [{o.action}] {o.run_id} ({o.seconds:.0f} s)"
        if o.action == "failed":
            msg += f" exit {o.returncode}: {o.message}"
        print(msg, flush=True)

    command = (
        "rmoe experiment " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 2 and sys.argv[1] == "experiment"
        else f"rmoe experiment {args.spec}"
    )
    res = run_experiment(
        spec,
        out,
        args.workers,
        only or None,
        args.threads,
        command=command,
        on_done=on_done,
        results_dir=args.results,
    )
    print(f"summary: {res.out_dir / 'summary.md'}")
    print(f"results: {res.out_dir / 'results.json'}")
    if res.failed:
        print(
            f"{len(res.failed)} run(s) failed; see runs/*/train.log; rerun to retry",
            file=sys.stderr,
        )
        return 1
    return 0
