"""`rmoe info`: parameters, active parameters, FLOPs per token and router of a model or preset."""

from __future__ import annotations

import argparse
import json

EXAMPLE = """examples:
  rmoe info tiny
  rmoe info enwik8-medium --set model.router_type=linear
  rmoe info runs/tiny-rmoe --json
  rmoe info tiny --init-stats --set model.router_type=linear
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
    p.add_argument(
        "--init-stats",
        action="store_true",
        help="also build a freshly initialised model (seeded as training seeds it) and report "
        "each MoE layer's router-logit std and the normalised entropy of its distribution over "
        "experts (1 = uniform; softmax, or normalised sigmoid scores) on a random batch of "
        "4 x min(seq_len, 128) token ids",
    )
    return p


def init_router_stats(cfg, seq_len: int, seed: int) -> dict[str, list[float]]:
    """Router-logit std and normalised entropy of the router's distribution over experts
    (`RoutingResult.probs`) per MoE layer of a model built from ``cfg`` and initialised as
    ``rmoe train`` initialises it (``seed``), on random token ids."""
    import torch

    from rmoe.analysis.routing import router_logit_stats
    from rmoe.modeling import RMoEForCausalLM
    from rmoe.runtime import seed_everything

    seed_everything(seed)
    model = RMoEForCausalLM(cfg)
    model.init_weights_seeded(seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (4, min(seq_len, 128)), generator=g)
    with torch.no_grad():
        out = model.eval()(input_ids=ids, use_cache=False, output_routing=True)
    return router_logit_stats(out.routing)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rmoe.config import RMoEConfig
    from rmoe.loading import find_model_dir
    from rmoe.modeling.accounting import count_config
    from rmoe.training import load_config

    target = Path(args.target)
    seq_len, seed = args.seq_len, 0
    if target.is_dir():
        cfg = RMoEConfig.from_pretrained(find_model_dir(target))
    else:
        tc = load_config(args.target, args.set)
        vocab = tc.model.get("vocab_size", 258)
        cfg = tc.model_config(vocab_size=vocab)
        seq_len = seq_len or tc.data.seq_len
        seed = tc.train.seed
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
    if args.init_stats:
        info["init_router"] = init_router_stats(cfg, counts.seq_len, seed)
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
    if "init_router" in info:
        st = info["init_router"]
        stds = ", ".join(f"{v:.3g}" for v in st["logit_std"])
        ents = ", ".join(f"{v:.4f}" for v in st["entropy"])
        print(f"router logits at init (per MoE layer): std {stds}; normalised entropy {ents}")
    return 0


def _router_desc(cfg) -> str:
    """The router line: the registered router (with the recurrent variant when it has a cell),
    then every routing option set away from its default."""
    from rmoe.registry import ROUTERS

    base = cfg.router_type
    if ROUTERS[cfg.router_type].uses_cell:
        variant = "RMoE"
        if not cfg.router_pass_state:
            variant = "RMoE-NP"
        elif cfg.router_detach_state:
            variant = "RMoE-detach"
        base = (
            f"{base} ({variant}; {cfg.router_cell}, P={cfg.router_dim}, scorer {cfg.router_scorer})"
        )
    options = _router_options(cfg)
    return "; ".join([base, *options]) if options else base


def _router_options(cfg) -> list[str]:
    """Phrases for the routing options of ``cfg`` that differ from `RMoEConfig`'s defaults:
    score function and scale, logit residual, S-proj, expert bias, balance loss, capacity."""
    from rmoe.config import RMoEConfig

    default = RMoEConfig()

    def changed(name: str) -> bool:
        return getattr(cfg, name) != getattr(default, name)

    out = []
    if changed("router_score_func") or changed("router_scale"):
        scale = f" x {cfg.router_scale:g}" if changed("router_scale") else ""
        out.append(f"{cfg.router_score_func} scores{scale}")
    if changed("router_logit_residual"):
        detached = ", detached" if cfg.router_detach_residual else ""
        out.append(f"logit residual alpha={cfg.router_logit_residual:g}{detached}")
    if changed("router_share_proj"):
        out.append("S-proj (one projector for all layers)")
    if changed("router_expert_bias"):
        out.append(f"expert bias (rate {cfg.router_bias_update_rate:g})")
    if changed("router_aux_loss_type"):
        out.append(f"{cfg.router_aux_loss_type} balance loss (coef {cfg.router_aux_loss_coef:g})")
    if changed("capacity_factor") or changed("eval_capacity_factor"):
        train, ev = (_capacity(cfg.capacity_factor), _capacity(cfg.eval_capacity_factor))
        out.append(f"capacity {train} train / {ev} eval")
    return out


def _capacity(factor: float | None) -> str:
    return "dropless" if factor is None else f"{factor:g}"
