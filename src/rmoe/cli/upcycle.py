"""`rmoe upcycle`: a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint as an rmoe MoE model."""

from __future__ import annotations

import argparse

from rmoe.cli.import_hf import DTYPE_NAMES, add_router_flags, print_result, router_kwargs

EXAMPLE = """examples:
  rmoe upcycle ~/ckpt/Llama-tiny --experts 8 --top-k 2 --out models/llama-moe
  rmoe upcycle ~/ckpt/Qwen3-tiny --experts 8 --top-k 2 --router recurrent --router-dim 64 \\
      --noise 0.01 --out models/qwen3-rmoe
  rmoe upcycle ~/ckpt/Mistral-tiny --experts 6 --top-k 2 --shared-experts 2 --method split \\
      --out models/mistral-split

then continue pre-training it:
  rmoe train models/llama-moe/train.yaml --init-from models/llama-moe --out runs/up \\
      --set data.corpus=python-stdlib --set train.max_steps=500

What it guarantees:
  --method copy (default): every expert is a copy of the layer's dense MLP. The K chosen
    experts' combine weights sum to one, so at the start the MoE model computes the dense
    model's function exactly (float32 logits equal to float rounding) with ANY router,
    recurrent included. --noise S adds N(0, (S * std(W))^2) to each routed expert's weights
    (then only approximately equal). --shared-experts N adds N more copies, every copy's down
    projection divided by N + 1 (still exact).
  --method split (LLaMA-MoE): the MLP's F hidden neurons are cut into E + N contiguous groups
    (F must be divisible by E + N); routed group e, its down projection times E, is expert e;
    the last N groups are the shared experts. The output DIFFERS from the dense model's at the
    start: only K of the E routed groups run per token, weighted by the router. It equals the
    dense MLP only for K = E with uniform router weights, and in expectation over the choice
    of groups for a uniform router; continued training has to recover the rest.
The router (any rmoe router type) starts from its own initialisation (seeded by --seed); the
top-K probabilities are always renormalised (norm_topk_prob). Checkpoints with something rmoe
cannot represent (another activation, a short sliding window, an unsupported RoPE type, MLP
biases, ...) are refused with the field named. MoE checkpoints are read by `rmoe import`.
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "upcycle",
        help="turn a dense Llama / Mistral / Qwen2 / Qwen3 checkpoint into an rmoe MoE model",
        description="Sparse upcycling: each dense MLP becomes an MoE block whose experts start\n"
        "as copies of it (same function at the start) or as a split of its neurons.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="dense checkpoint folder (config.json + safetensors)")
    p.add_argument("--experts", type=int, required=True, metavar="E", help="routed experts")
    p.add_argument("--top-k", type=int, required=True, metavar="K", help="experts per token")
    p.add_argument("--out", required=True, help="destination folder (written atomically)")
    p.add_argument(
        "--method", choices=("copy", "split"), default="copy", help="default copy (exact)"
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        metavar="STD",
        help="relative Gaussian noise on the routed experts (default 0)",
    )
    p.add_argument(
        "--shared-experts", type=int, default=0, metavar="N", help="always-on shared experts"
    )
    p.add_argument("--seed", type=int, default=0, help="router init and noise (default 0)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="weight dtype (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    add_router_flags(
        p, None, "any rmoe router type: linear (default), recurrent, mlp, cosine, xmoe, ..."
    )
    return p


def run(args: argparse.Namespace) -> int:
    from rmoe.integrations.upcycle import upcycle_checkpoint

    res = upcycle_checkpoint(
        args.source,
        args.out,
        experts=args.experts,
        top_k=args.top_k,
        router=args.router,
        method=args.method,
        noise=args.noise,
        shared_experts=args.shared_experts,
        seed=args.seed,
        dtype=args.dtype,
        force=args.force,
        **router_kwargs(args),
    )
    print_result(res, "upcycled")
    return 0
