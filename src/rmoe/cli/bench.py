"""`rmoe bench`: run the benchmark suites in the repository's `benchmarks/` folder.

The suites are not part of the installed package; they live next to `src/` in a source
checkout. The folder is looked up in the current directory and its parents, then relative to
this package's source tree (an editable install); `--bench-dir` names it explicitly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

SUITES = ("layer", "step", "flops", "migu", "profile", "finegrained")

EXAMPLE = """examples:
  rmoe bench layer --quick
  rmoe bench all --out /tmp/bench
  rmoe bench step --device cuda --dtype bfloat16
  rmoe bench migu --threads 1
  rmoe bench profile --quick
  rmoe bench finegrained
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="speed benchmarks: MoE layer vs transformers' Mixtral, training step, FLOP/s, MIGU, step profile, fine-grained experts",
        description=(
            "Run benchmark suites from the repository's benchmarks/ folder. Each writes "
            "<suite>.json and <suite>.md (machine, command, median and spread) under --out. "
            "Suites: layer (MoE layer fwd+bwd tokens/s vs MixtralSparseMoeBlock), step (training "
            "step tokens/s: SMoE, RMoE, MixtralForCausalLM eager and compiled at the tiny and step "
            "shapes with verdicts; activation memory with and without checkpointing), flops (expert FLOP/s "
            "vs the dense-matmul ceiling), migu (training-step cost of MIGU masking and the random-mask "
            "control, on linear layers and expert weights), profile (where a training step's time goes by "
            "op category and phase, the step's fraction of the dense-matmul ceiling, AdamW "
            "for-loop/foreach/fused), finegrained (layer and step throughput for E = 8..256 at "
            "fixed active compute, vs Mixtral's eager and grouped_mm experts). `all` runs every "
            "suite in that order, printing progress."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", nargs="?", default="all", choices=[*SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke run)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/out)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default by device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bench-dir", default=None, help="the repository's benchmarks/ folder")
    return p


def find_benchmarks(explicit: str | None = None) -> Path:
    """The repository's `benchmarks/` folder (a package with layer.py, step.py, flops.py)."""
    if explicit:
        candidates = [Path(explicit)]
    else:
        cwd = Path.cwd().resolve()
        candidates = [d / "benchmarks" for d in (cwd, *cwd.parents)]
        candidates.append(Path(__file__).resolve().parents[3] / "benchmarks")
    for c in candidates:
        if (c / "__init__.py").is_file() and (c / "layer.py").is_file():
            return c.resolve()
    looked = ", ".join(str(c) for c in candidates[:3]) + (", ..." if len(candidates) > 3 else "")
    raise FileNotFoundError(
        "benchmarks/ folder not found (looked in " + looked + "); the suites ship with the "
        "source repository, not the installed package: run from a checkout of rmoe or pass "
        "--bench-dir PATH/TO/benchmarks"
    )


def run(args: argparse.Namespace) -> int:
    bench_dir = find_benchmarks(args.bench_dir)
    root = str(bench_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    argv: list[str] = []
    if args.quick:
        argv.append("--quick")
    for flag in ("out", "device", "dtype", "threads"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag}", str(value)]
    suites = SUITES if args.suite == "all" else (args.suite,)
    status = 0
    start = time.monotonic()
    for i, suite in enumerate(suites, 1):
        if len(suites) > 1:
            elapsed = time.monotonic() - start
            print(f"== rmoe bench: suite {i}/{len(suites)}: {suite} ({elapsed:.0f} s)", flush=True)
        module = importlib.import_module(f"benchmarks.{suite}")
        if os.path.dirname(os.path.abspath(module.__file__ or "")) != str(bench_dir):
            raise FileNotFoundError(
                f"imported benchmarks.{suite} from {module.__file__}, not from {bench_dir}; "
                "another 'benchmarks' package shadows the repository's"
            )
        status = max(status, int(module.main(argv) or 0))
    if len(suites) > 1:
        print(
            f"== rmoe bench: {len(suites)} suites in {time.monotonic() - start:.0f} s", flush=True
        )
    return status
