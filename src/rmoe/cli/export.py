"""`rmoe export`: write a linear-router run as a native transformers checkpoint."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  rmoe export runs/tiny-smoe --to mixtral --out exports/tiny-mixtral
  rmoe export runs/tiny-smoe --to qwen2_moe --out exports/tiny-qwen2 --dtype bfloat16 --force

then, in Python (no trust_remote_code):
  from transformers import AutoTokenizer, MixtralForCausalLM
  model = MixtralForCausalLM.from_pretrained("exports/tiny-mixtral")
  tokenizer = AutoTokenizer.from_pretrained("exports/tiny-mixtral")

Only models with a linear router (router_type linear, random or shared) can be exported: no
native transformers architecture has RMoE's cross-layer recurrent router. Options a target
cannot represent (router bias, sigmoid scores, expert bias, router_scale, dense layers or shared
experts for Mixtral, no q/k norm for Qwen3-MoE / OLMoE, ...) are refused with the field named.
`rmoe import` reads such checkpoints back (the same tables, read the other way).
"""


TARGETS = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
"""`rmoe.integrations.families.FAMILIES` (spelled here so `rmoe --help` does not import torch)."""
DTYPE_NAMES = ("bfloat16", "float16", "float32")
"""`rmoe.runtime.DTYPES` (same reason; a test checks both lists)."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="write a linear-router run as a Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE checkpoint",
        description="Write a run or saved model as a native transformers checkpoint\n"
        "(config.json, model.safetensors, generation_config.json and the run's tokenizer)\n"
        "that the target's own classes load, with the same logits.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="run directory or saved model directory")
    p.add_argument("--to", required=True, choices=TARGETS, help="target architecture")
    p.add_argument("--out", required=True, help="destination folder (written atomically)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="weight dtype (default: as saved)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p


def run(args: argparse.Namespace) -> int:
    from rmoe.integrations.export import export_run

    res = export_run(args.path, args.to, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote a {res.family} checkpoint to {res.out_dir}: {', '.join(res.files)}")
    for note in res.notes:
        print(f"  note: {note}")
    print("load it with:")
    print(f"  {res.load_snippet}")
    return 0
