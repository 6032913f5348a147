"""`rmoe info`: parameters, active parameters, FLOPs per token and router of a model or preset."""

from __future__ import annotations

import argparse
import json

EXAMPLE = """examples:
  rmoe info tiny
  rmoe info enwik8-medium --set model.router_type=linear
  rmoe info runs/tiny-rmoe --json
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "info",
        help="parameter and FLOP counts of a run, saved model, preset or YAML config",
        description="Total/active parameters, router parameters and forward FLOPs per token.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", help="run or model directory, preset name or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seq-len", type=int, default=None, help="context for attention FLOPs")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rmoe.config import RMoEConfig
    from rmoe.loading import find_model_dir
    from rmoe.modeling.accounting import count_config
    from rmoe.training import load_config

    target = Path(args.target)
    seq_len = args.seq_len
    if target.is_dir():
        cfg = RMoEConfig.from_pretrained(find_model_dir(target))
    else:
        tc = load_config(args.target, args.set)
        vocab = tc.model.get("vocab_size", 258)
        cfg = tc.model_config(vocab_size=vocab)
        seq_len = seq_len or tc.data.seq_len
    counts = count_config(cfg, seq_len)
    info = {
        "router_type": cfg.router_type,
        "router": _router_desc(cfg),
        "layers": cfg.num_hidden_layers,
        "moe_layers": len(cfg.moe_layer_indices),
        "hidden_size": cfg.hidden_size,
        "experts": f"{cfg.num_experts} x width {cfg.moe_intermediate_size}, top-{cfg.num_experts_per_tok}",
        **counts.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"router:              {info['router']}")
    print(
        f"layers:              {info['layers']} ({info['moe_layers']} MoE), width {info['hidden_size']}"
    )
    print(f"experts:             {info['experts']}")
    print(
        f"parameters:          {counts.total_params:,} total, {counts.active_params:,} active per token"
    )
    print(f"router parameters:   {counts.router_params:,}")
    print(
        f"forward FLOPs/token: {counts.forward_flops_per_token:,} (router {counts.router_flops_per_token:,}; seq_len {counts.seq_len})"
    )
    return 0


def _router_desc(cfg) -> str:
    from rmoe.registry import ROUTERS

    if not ROUTERS[cfg.router_type].uses_cell:
        return cfg.router_type
    variant = "RMoE"
    if not cfg.router_pass_state:
        variant = "RMoE-NP"
    elif cfg.router_detach_state:
        variant = "RMoE-detach"
    return (
        f"recurrent ({variant}; {cfg.router_cell}, P={cfg.router_dim}, scorer {cfg.router_scorer})"
    )
