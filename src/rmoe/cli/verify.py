"""`rmoe verify`: check a run's checkpoints and run-level model against their manifests."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  rmoe verify runs/tiny-rmoe
  rmoe verify runs/tiny-rmoe/checkpoints/step-0000100
  rmoe verify exports/imported-model        # no manifest: safetensors headers only

output (one line per item):
  ok       checkpoints/step-0000080  (6 files, manifest verified)
  damaged  checkpoints/step-0000100  model.safetensors: contents changed (SHA-256 differs ...)
  ok       run-level model           (5 files, manifest verified)

Every checkpoint (RUN/checkpoints/step-N/) and the run-level model (RUN/) hold a manifest.json
with the size and SHA-256 of each file; `rmoe verify` recomputes them. A folder without a
manifest (an older run, a model imported from transformers) is checked for truncated or
damaged safetensors headers only. `rmoe train --resume` skips damaged checkpoints by itself;
eval, generate, analyze, finetune and train --init-from refuse a damaged model with one line.

exit status: 0 all intact, 1 something is damaged, 2 bad input (no such run or model).
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "verify",
        help="check a run's checkpoints and model against their manifests (sizes, SHA-256)",
        description="Check every checkpoint of a run and its run-level model (or one saved\n"
        "model directory) against their manifest.json; one line per item.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="RUN", help="run directory, checkpoint or saved model directory")
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rmoe.training.integrity import verify_run

    root = Path(args.path)
    verdicts = verify_run(root)
    names = []
    for v in verdicts:
        name = "run-level model" if v.path == root and len(verdicts) > 1 else str(v.path)
        if v.path.parent.name == "checkpoints" and v.path.parent.parent == root:
            name = f"checkpoints/{v.path.name}"
        names.append(name)
    width = max(len(n) for n in names)
    for name, v in zip(names, verdicts):
        if v.ok:
            print(f"ok       {name:<{width}}  {v.describe()[3:]}")
        else:
            print(f"damaged  {name:<{width}}  {'; '.join(v.problems)}")
    bad = sum(not v.ok for v in verdicts)
    if bad:
        print(f"{bad} of {len(verdicts)} damaged")
    return 1 if bad else 0
