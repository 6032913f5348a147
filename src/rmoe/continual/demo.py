"""The built-in continual pre-training demonstration (``rmoe continual cpt-demo``).

1. Pre-train a small byte-level RMoE on ``python-stdlib`` (code): ``<out>/base``.
2. Continue it on ``pydoc-topics`` (English prose about Python) with each strategy of
   :mod:`rmoe.continual.cpt`, every arm with the same optimizer, schedule and token budget
   (``steps x batch_size x seq_len``), evaluating both domains at log-spaced steps:

   ========== ===============================================================================
   full       all of the new domain, one pass (cut at the budget)
   subset     a random quarter of the budget's tokens, 4 epochs
   relevance  the quarter most similar (TF-IDF) to a reference sample -- the docstrings of
              Python's builtins, also English prose about Python -- 4 epochs
   replay     the new domain with 25% of the training tokens from python-stdlib
   combined   relevance subset + 25% replay, epochs filling the budget
   ========== ===============================================================================

3. Measure the stability gap of every arm on both domains (:mod:`rmoe.continual.gap`) and write
   ``<out>/gap_compare.{json,md,png}``.

The base run is reused when ``<out>/base`` already holds a finished model, and each arm when its
``gap.json`` exists, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmoe.continual.cpt import CPTOptions, prepare_continual_pretraining
from rmoe.continual.gap import compare_gap_reports, write_gap_report

log = logging.getLogger(__name__)

__all__ = ["CPT_ARMS", "DEMO_BASE_CONFIG", "CPTDemoSettings", "cpt_arms", "run_cpt_demo"]

DEMO_BASE_CONFIG: dict[str, Any] = {
    "model": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "moe_intermediate_size": 96,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "router_type": "recurrent",
        "router_dim": 16,
        "router_aux_loss_coef": 0.01,
        "max_position_embeddings": 128,
    },
    "data": {"corpus": "python-stdlib", "tokenizer": "bytes", "seq_len": 128, "batch_size": 16},
    "optim": {
        "lr": 3e-3,
        "weight_decay": 0.1,
        "warmup_steps": 30,
        "schedule": "cosine",
        "min_lr_ratio": 0.1,
        "grad_clip": 1.0,
    },
    "train": {
        "max_steps": 600,
        "seed": 0,
        "threads": 1,
        "log_interval": 25,
        "eval_interval": 0,
        "eval_batches": 8,
        "save_interval": 0,
        "keep_last": 1,
    },
}
"""The demo's base run: ~0.2M parameters, 2 layers, 8 experts (top-2), recurrent router."""

CPT_ARMS: tuple[str, ...] = ("full", "subset", "relevance", "replay", "combined")


@dataclass
class CPTDemoSettings:
    """Sizes of the demonstration.

    Attributes:
        pretrain_steps: steps of the base run on python-stdlib.
        steps: steps of every continual arm (the shared token budget is
            ``steps * batch_size * seq_len``).
        lr: peak learning rate of the continual arms (constant after ``warmup_steps``).
        warmup_steps: warm-up of the continual arms.
        epochs: epochs of the subset arms (their subset is ``budget / epochs`` tokens).
        replay_ratio: share of replayed python-stdlib tokens in the replay arms.
        eval_log_points: log-spaced evaluations of the continual arms.
        chunk_chars: documents are cut into pieces of this many characters before selection.
        threads: torch CPU threads (1 is fastest on a shared 2-core machine).
        seed: seed of every run.
    """

    pretrain_steps: int = 600
    steps: int = 150
    lr: float = 3e-3
    warmup_steps: int = 10
    epochs: int = 4
    replay_ratio: float = 0.25
    eval_log_points: int = 16
    chunk_chars: int = 2000
    threads: int = 1
    seed: int = 0


def cpt_arms(s: CPTDemoSettings, tokens_per_step: int) -> dict[str, CPTOptions]:
    """The demo's strategies at one token budget (``s.steps * tokens_per_step``)."""
    budget = s.steps * tokens_per_step
    quarter = budget // s.epochs
    common = {"chunk_chars": s.chunk_chars, "seed": s.seed, "eval_log_points": s.eval_log_points}
    ref = "builtin:docstrings"
    return {
        "full": CPTOptions(**common),
        "subset": CPTOptions(subset_tokens=quarter, epochs=s.epochs, select="random", **common),
        "relevance": CPTOptions(
            subset_tokens=quarter, epochs=s.epochs, select="relevance", reference=ref, **common
        ),
        "replay": CPTOptions(replay="python-stdlib", replay_ratio=s.replay_ratio, **common),
        "combined": CPTOptions(
            subset_tokens=int(quarter * (1 - s.replay_ratio)),
            epochs=s.epochs,
            select="relevance",
            reference=ref,
            replay="python-stdlib",
            replay_ratio=s.replay_ratio,
            **common,
        ),
    }


def _finished(run_dir: Path) -> bool:
    return (run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()


def run_cpt_demo(
    out_dir: str | Path,
    settings: CPTDemoSettings | None = None,
    arms: Sequence[str] = CPT_ARMS,
    progress: bool = False,
    on_arm: Callable[[str, dict[str, Any]], None] | None = None,
    base: str | Path | None = None,
) -> dict[str, Path]:
    """Run the demonstration (module docstring) and return the comparison's paths.

    ``base``: an existing base run to continue from instead of ``<out_dir>/base`` -- e.g. to
    repeat the continual arms with other seeds from the same starting model. Its model shape is
    used (whatever it is), with the demo's data and optimiser settings.
    """
    from rmoe.training.checkpoint import latest_checkpoint
    from rmoe.training.config import from_dict
    from rmoe.training.trainer import train

    s = settings or CPTDemoSettings()
    unknown = set(arms) - set(CPT_ARMS)
    if unknown:
        raise ValueError(
            f"unknown demo arm(s) {sorted(unknown)}; choose from {', '.join(CPT_ARMS)}"
        )
    out = Path(out_dir)
    base_dir = Path(base) if base is not None else out / "base"
    raw = copy.deepcopy(DEMO_BASE_CONFIG)
    raw["train"].update(max_steps=s.pretrain_steps, seed=s.seed, threads=s.threads)
    if base is not None and not _finished(base_dir):
        raise FileNotFoundError(f"--base {base_dir} is not a finished run (no config.json)")
    if base is not None:  # continue the base as it is: its shape, not the demo's default
        _adopt_model(raw, base_dir)
    if not _finished(base_dir):
        log.info("pre-training the base model on python-stdlib (%d steps)", s.pretrain_steps)
        train(from_dict(raw), base_dir, progress=progress)
    tokens_per_step = raw["data"]["batch_size"] * raw["data"]["seq_len"]
    options = cpt_arms(s, tokens_per_step)
    done: list[str] = []
    for arm in arms:
        run_dir = out / arm
        if not (run_dir / "gap.json").is_file():
            craw = copy.deepcopy(raw)
            craw["data"]["corpus"] = "pydoc-topics"
            craw["optim"].update(lr=s.lr, warmup_steps=s.warmup_steps, schedule="constant")
            craw["train"].update(max_steps=s.steps, eval_batches=8)
            resume = latest_checkpoint(run_dir) is not None
            if not resume and (run_dir / "metrics.jsonl").is_file():
                (run_dir / "metrics.jsonl").unlink()  # an interrupted arm: start it again
            cfg, manifest = prepare_continual_pretraining(
                from_dict(craw), run_dir, base_dir, options[arm], resume=resume
            )
            log.info("arm %s: %d steps", arm, cfg.train.max_steps)
            train(cfg, run_dir, resume=resume, init_from=base_dir, progress=progress)
            write_gap_report(run_dir)
            if on_arm is not None:
                on_arm(arm, manifest)
        done.append(arm)
    return compare_gap_reports([out / a for a in done], out, names=done)


def _adopt_model(raw: dict[str, Any], base_dir: Path) -> None:
    """Set ``raw["model"]`` to the base model's shape (and the window to fit its context)."""
    from rmoe.loading import checkpoint_model

    model, _vocab = checkpoint_model(base_dir)
    raw["model"] = model
    limit = model.get("max_position_embeddings")
    if limit and raw["data"]["seq_len"] > limit:
        raw["data"]["seq_len"] = int(limit)
