"""`rmoe analyze`: routing and expert analytics of one or two MoE checkpoints, with a report."""

from __future__ import annotations

import argparse
import sys

from rmoe.formatting import fmt_number

EXAMPLE = """examples:
  rmoe analyze runs/tiny-rmoe --out analysis/rmoe
  rmoe analyze runs/tiny-smoe runs/tiny-rmoe --tokens 65536 --out analysis/smoe-vs-rmoe
  rmoe analyze ~/models/OLMoE-1B-7B --data pydoc-topics --tokens 8192 --device cuda
  rmoe analyze ~/models/gpt-oss-20b --tokens 8192 --device cuda

Models: rmoe runs and saved models, and 42 transformers MoE families by config.model_type
(mixtral, olmoe, qwen2_moe, qwen3_moe, qwen3_next, deepseek_v2/v3, gpt_oss, llama4_text, dbrx,
jetmoe, granitemoe, phimoe, glm4_moe, ... ; the full list is in the README and in the error an
unsupported model gets).

PATH is a model directory with config.json (rmoe, Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE,
DeepSeek-V2/V3) or an rmoe run directory (its model/, final/ or newest checkpoints/step-N/
is used). The tokenizer is read from the same directory (tokenizer.json); without one the
byte tokenizer is used and metrics.json says so. With two paths every figure shows both.
Writes OUT/metrics.json, OUT/figures/*.png and OUT/report.html.
"""

_KEY_ROWS: tuple[tuple[str, str], ...] = (
    ("lm_loss", "LM loss (nats/token)"),
    ("entropy_normalized", "router entropy / ln E"),
    ("inner_balance", "inner balance IB"),
    ("outer_balance", "outer balance OB"),
    ("load_cv", "load CV"),
    ("mi_binned_offdiag", "cross-layer MI, binned (nats)"),
    ("mi_index_offdiag", "cross-layer MI, indices (nats)"),
    ("weight_cos_act", "expert weight cosine (act)"),
    ("router_r2_act", "router-vs-expert R² (act)"),
    ("diversity_score", "diversity score"),
    ("output_angular_sim", "expert output angular sim"),
    ("rank_agreement", "norm-rank = score-rank share"),
    ("activation_ratio", "activation ratio"),
    ("router_grad_lm", "‖∇ router‖ from LM loss"),
    ("router_grad_balance", "‖∇ router‖ from balance loss"),
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `rmoe analyze` and return its parser."""
    p = sub.add_parser(
        "analyze",
        help="routing and expert analytics of one or two MoE checkpoints (figures + report)",
        description=(
            "Run a model over N tokens of a corpus's valid split and measure its routing "
            "(expert load, router entropy, inner/outer balance, cross-layer mutual information, "
            "agreement between two checkpoints) and its experts (weight and output similarity, "
            "neuron matching, router-vs-expert R², PCA, norm-vs-score ranks, activation ratio, "
            "diversity score, router gradient norms). Writes metrics.json, PNG figures and "
            "report.html, and prints the key numbers."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="model or run directory")
    p.add_argument("path2", nargs="?", help="optional second model, compared side by side")
    p.add_argument(
        "--data",
        default="python-stdlib",
        help="corpus spec, as for training (default: python-stdlib); its valid split is used",
    )
    p.add_argument("--tokens", type=int, default=65536, help="tokens to analyse (default: 65536)")
    p.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")
    p.add_argument("--seq-len", type=int, default=256, help="window length (default: 256)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward (default: 16)")
    p.add_argument(
        "--output-tokens",
        type=int,
        default=4096,
        help="tokens on which every expert is run for the output analyses (default: 4096; 0 = skip)",
    )
    p.add_argument(
        "--match-pairs",
        default="nearest",
        choices=["nearest", "all", "adjacent", "none"],
        help="expert pairs for neuron matching (default: nearest = each expert's most similar; "
        "none = skip, e.g. for very wide experts)",
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto = cuda if present)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: auto = float32 on CPU, bfloat16 on CUDA)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument(
        "--no-progress", "--quiet", action="store_true", dest="no_progress", help="no progress bars"
    )
    return p


def _num(value: object) -> str:
    return fmt_number(value, ".4g")


def run(args: argparse.Namespace) -> int:
    """Run the analysis, print where the report is and the key numbers."""
    from tqdm import tqdm

    from rmoe.loading import find_model_dir
    from rmoe.runtime import set_threads

    paths = [args.path] + ([args.path2] if args.path2 else [])
    for path in paths:  # a clear one-line error before any heavy import or loading
        find_model_dir(path)
    from rmoe.analysis.run import analyze

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {args.threads}")
        set_threads(args.threads)

    def progress(iterable, **kwargs):
        return tqdm(iterable, file=sys.stderr, leave=False, disable=args.no_progress, **kwargs)

    result = analyze(
        paths,
        data=args.data,
        tokens=args.tokens,
        out_dir=args.out,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=None if args.device == "auto" else args.device,
        output_tokens=args.output_tokens,
        match_pairs=args.match_pairs,
        dtype=args.dtype,
        progress=progress,
    )
    outputs = result["outputs"]
    key = result["key_numbers"]
    names = list(key)
    print(f"report:  {outputs['report']}")
    print(f"metrics: {outputs['metrics_json']} ({len(outputs['figures'])} figures)")
    for name, model in result["models"].items():
        if model.get("tokenizer_fallback"):
            print(f"note: {name}: {model['tokenizer_note']}")
        if "note" in model["data"]:
            print(f"note: {name}: {model['data']['note']}")
    width = max(len(label) for _, label in _KEY_ROWS)
    print(f"{'':{width}}  " + "  ".join(f"{n:>12}" for n in names))
    for field, label in _KEY_ROWS:
        print(f"{label:{width}}  " + "  ".join(f"{_num(key[n].get(field)):>12}" for n in names))
    comparison = result.get("comparison") or {}
    if "top1_agreement_mean" in comparison:
        print(
            f"routing agreement: top-1 {_num(comparison['top1_agreement_mean'])}, "
            f"Jaccard {_num(comparison['jaccard_mean'])}"
        )
    print(f"time: {result['timing_seconds']['total']:.1f} s")
    return 0
