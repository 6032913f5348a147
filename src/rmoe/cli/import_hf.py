"""`rmoe import`: a transformers MoE checkpoint as an rmoe model, or a recurrent router
retrofitted onto a linear-router model."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  rmoe import ~/ckpt/Mixtral-tiny --out models/mixtral-rmoe
  rmoe import ~/ckpt/Qwen3-MoE-tiny --out models/qwen3-rmoe --dtype bfloat16
  rmoe import ~/ckpt/OLMoE-tiny --router recurrent --router-dim 64 --out models/olmoe-rmoe-rec
  rmoe import runs/tiny-smoe --router recurrent --out models/tiny-retrofit   (an rmoe run)

then train or fine-tune it:
  rmoe train models/mixtral-rmoe/train.yaml --init-from models/mixtral-rmoe --out runs/cont \\
      --set data.corpus=python-stdlib --set train.max_steps=200
  rmoe finetune models/mixtral-rmoe --data qa.jsonl --out runs/ft

What it guarantees: the rmoe model computes the checkpoint's function (float32 logits equal
to float rounding, same greedy tokens). With --router recurrent the recurrent router is added
so that the logits at the start are still the checkpoint's; training then moves them apart.
The source is a folder with config.json, safetensors weights (sharded too; pickle files are
refused) and the tokenizer, of model_type mixtral, olmoe, qwen2_moe or qwen3_moe; or an rmoe
run / model directory with a linear router (with --router recurrent). What rmoe cannot represent
(another activation, a sliding window shorter than the context, clip_qkv, an unsupported RoPE
type, a quantized checkpoint, a tensor without a place in rmoe, ...) is refused with the field
named. Dense checkpoints (Llama, Mistral, Qwen2, Qwen3) are turned into MoE models by
`rmoe upcycle`.

The output folder holds config.json + model.safetensors (rmoe.loading.load_model and
AutoModelForCausalLM after `import rmoe` read it), the tokenizer, and train.yaml: a training
config whose model section is this model, for `rmoe train ... --init-from`.
"""

DTYPE_NAMES = ("bfloat16", "float16", "float32")
"""`rmoe.runtime.DTYPES` (spelled here so `rmoe --help` does not import torch)."""
ROUTERS = ("linear", "recurrent")
"""`rmoe.integrations.importing.ROUTERS` (same reason; a test checks both lists)."""


def parse_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value parsed as a YAML scalar) for ``--set`` (argparse type)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().removeprefix("model.")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        return key, value


def add_router_flags(
    p: argparse.ArgumentParser, routers: tuple[str, ...] | None, help: str
) -> None:
    """--router (one of `routers`, None = any rmoe router type; default linear), the recurrent
    router's main settings and --set (shared with `rmoe upcycle`)."""
    g = p.add_argument_group("router")
    g.add_argument("--router", choices=routers, default="linear", metavar="TYPE", help=help)
    g.add_argument("--router-dim", type=int, metavar="P", help="recurrent router state width")
    g.add_argument("--router-cell", help="recurrent cell: gru, rnn or lstm")
    g.add_argument("--router-scorer", help="per-layer scorer on the state: linear, cosine, xmoe")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        type=parse_setting,
        metavar="KEY=VALUE",
        help="any other rmoe model setting, e.g. router_aux_loss_coef=0.01 (repeatable)",
    )


def router_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The rmoe settings of the router flags."""
    kw: dict[str, object] = dict(args.set)
    for flag in ("router_dim", "router_cell", "router_scorer"):
        if getattr(args, flag) is not None:
            kw[flag] = getattr(args, flag)
    return kw


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "import",
        help="import a Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE checkpoint (or retrofit a router)",
        description="Import a transformers MoE checkpoint as an rmoe model with the same\n"
        "function, optionally retrofitting a recurrent router; or retrofit a recurrent router\n"
        "onto a linear-router rmoe run.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="checkpoint folder (config.json + safetensors) or rmoe run")
    p.add_argument("--out", required=True, help="destination folder (written atomically)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="weight dtype (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--seed", type=int, default=0, help="retrofitted router's init (default 0)")
    add_router_flags(
        p, ROUTERS, "linear (the checkpoint's gates, default) or recurrent (retrofitted)"
    )
    return p


def print_result(res, verb: str) -> None:
    """The lines `rmoe import` / `rmoe upcycle` print about an `ImportResult`."""
    c = res.config
    print(
        f"{verb} {res.source} -> rmoe ({res.router} router, {c.num_hidden_layers} layers, "
        f"{c.num_experts} experts, top-{c.num_experts_per_tok}) in {res.out_dir}: "
        f"{', '.join(res.files)}"
    )
    for note in res.notes:
        print(f"  note: {note}")
    print(f"train it with: rmoe train {res.out_dir}/train.yaml --init-from {res.out_dir} --out RUN")


def run(args: argparse.Namespace) -> int:
    from rmoe.integrations.importing import import_checkpoint

    res = import_checkpoint(
        args.source,
        args.out,
        router=args.router,
        dtype=args.dtype,
        force=args.force,
        seed=args.seed,
        **router_kwargs(args),
    )
    print_result(res, "imported")
    return 0
