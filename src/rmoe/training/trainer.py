"""The training loop: one process by default, DDP (or FSDP on GPUs) under torchrun/accelerate.

The trainer knows nothing about a particular router: it calls the model, adds the router losses
the model returns, and logs per-MoE-layer routing statistics computed from the router logits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data import (
    TokenSplit,
    WindowSampler,
    build_tokenizer,
    eval_windows,
    get_batch,
    get_corpus,
    get_split_tokens,
)
from ..modeling import RMoEForCausalLM
from ..modeling.losses import load_balancing_loss, normalized_entropy
from .checkpoint import (
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig, dump_config, from_dict

log = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The loss became NaN or Inf; the run stopped without saving over the last good checkpoint."""


@dataclass
class TrainResult:
    """Summary of a run.

    Attributes:
        run_dir: the run directory.
        step: optimizer steps completed.
        status: "completed", "interrupted" (Ctrl-C, checkpoint saved) or "time_limit".
        tokens_per_s: mean training throughput over the run (all processes).
        final_eval: last validation metrics (loss, bpb, ppl, tokens), if any.
        losses: training loss per step of this invocation.
    """

    run_dir: Path
    step: int
    status: str
    tokens_per_s: float
    final_eval: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    """Process-group facts (world_size 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun / accelerate set up through the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda:LOCAL_RANK when available, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use cpu or auto")
    return dev


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain float32)."""
    if name == "float32" or (name == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def environment(device: torch.device, world: int) -> dict[str, Any]:
    """Facts recorded in env.json."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "world_size": world,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Optimisation
# ----------------------------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices and expert tensors (dim >= 2) only."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    o = cfg.optim
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then constant / cosine /
    linear decay to min_lr_ratio at max_steps."""
    o, total = cfg.optim, cfg.train.max_steps
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, total - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    if o.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    split: TokenSplit,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Mean next-token loss over non-overlapping windows of a split, with bits per byte
    (loss / ln 2 * tokens / bytes of the split; for the byte tokenizer: bits per character) and
    perplexity (per token).

    Returns:
        dict(loss, bpb, ppl, tokens).
    """
    dist_info = dist_info or DistInfo()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    world, rank = dist_info.world_size, dist_info.rank
    # global batches of batch_size * world windows; every rank runs the same number of forward
    # passes (sharded models need that), a rank without rows in the last batch scores nothing
    for global_starts in eval_windows(
        split.n_tokens, seq_len, batch_size * world, max_batches or None
    ):
        starts = global_starts[rank * batch_size : (rank + 1) * batch_size]
        weight = 1.0
        if len(starts) == 0:
            starts, weight = global_starts[:1], 0.0
        x, y = get_batch(split.tokens, starts, seq_len, device)
        ctx = torch.autocast(device.type, amp_dtype) if amp_dtype else nullcontext()
        with ctx:
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        )
        total += weight * torch.stack(
            [loss.double(), torch.tensor(float(y.numel()), device=device, dtype=torch.float64)]
        )
    if dist_info.world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    n = total[1].item()
    if n == 0:
        raise ValueError(
            f"the evaluation split has fewer than seq_len + 1 = {seq_len + 1} tokens; "
            "use a shorter data.seq_len or a larger corpus"
        )
    loss = total[0].item() / n
    return {
        "loss": loss,
        "bpb": split.bits_per_byte(loss),
        "ppl": math.exp(min(loss, 700.0)),
        "tokens": int(n),
    }


def routing_stats(router_logits: tuple[torch.Tensor, ...], k: int) -> dict[str, list[float]]:
    """Per-MoE-layer statistics from router logits ([N, E] each): load coefficient of variation,
    max load violation (max/mean - 1), mean normalised entropy, balance loss."""
    out: dict[str, list[float]] = {"load_cv": [], "max_violation": [], "entropy": [], "aux": []}
    for logits in router_logits:
        probs = torch.softmax(logits.detach().float(), -1)
        idx = probs.topk(k, -1).indices
        counts = torch.bincount(idx.reshape(-1), minlength=probs.shape[-1]).float()
        mean = counts.mean()
        out["load_cv"].append((counts.std(unbiased=False) / mean).item())
        out["max_violation"].append((counts.max() / mean - 1).item())
        out["entropy"].append(normalized_entropy(probs).mean().item())
        out["aux"].append(load_balancing_loss(probs, idx).item())
    return out


# ----------------------------------------------------------------------------------------------
# Loading runs
# ----------------------------------------------------------------------------------------------
def _load_weights(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise ValueError(
            f"weights in {directory} do not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    init_from: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a model as `cfg` says, writing everything to `out_dir`.

    Args:
        cfg: the run configuration.
        out_dir: run directory (created; must be empty of checkpoints unless `resume`).
        resume: continue from the newest checkpoint in out_dir (bit-identical on CPU).
        init_from: start from the weights of another run or saved model directory (continual
            pre-training); the optimizer and data order start fresh.
        progress: show a progress bar (main process only).
        on_step: called as on_step(step, loss) after every optimizer step (tests use it to
            simulate Ctrl-C).
    """
    cfg.validate()
    run_dir = Path(out_dir)
    device = resolve_device(cfg.train.device)
    di = setup_distributed(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    amp = autocast_dtype(cfg.train.dtype, device)
    if amp is not None and device.type == "cpu" and cfg.train.dtype == "auto":
        amp = None

    ckpt = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(
                f"--resume: {run_dir} holds no checkpoint (expected {run_dir}/checkpoints/step-*/"
                "trainer_state.pt); start a new run without --resume"
            )
        saved_cfg = from_dict(load_state(ckpt)["config"])
        _check_resume_config(saved_cfg, cfg)
    elif (run_dir / "checkpoints").is_dir() and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out"
        )
    if di.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # --- data and tokenizer
    corpus = get_corpus(cfg.data.corpus, text_field=cfg.data.text_field)
    init_dir = find_model_dir(init_from) if init_from is not None else None
    if ckpt is not None:
        tokenizer = build_tokenizer(str(ckpt))
    elif init_dir is not None and (init_dir / "tokenizer.json").is_file():
        # continue with the starting model's own tokenizer: a new one (e.g. bpe:N retrained on
        # the new corpus) would silently remap the token ids the weights were trained on
        tokenizer = build_tokenizer(str(init_dir))
    elif cfg.data.tokenizer.startswith("bpe:"):
        tokenizer = build_tokenizer(cfg.data.tokenizer, train_texts=corpus.documents("train"))
    else:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
    splits = {
        s: get_split_tokens(corpus, tokenizer, s, cache_dir=cfg.data.cache_dir)
        for s in ("train", "valid")
    }
    extra_eval = {
        spec: get_split_tokens(
            get_corpus(spec, text_field=cfg.data.text_field),
            tokenizer,
            "valid",
            cache_dir=cfg.data.cache_dir,
        )
        for spec in cfg.data.extra_eval
    }
    eval_steps = set(int(s) for s in cfg.train.eval_at)
    if cfg.train.eval_log_points > 0:
        eval_steps |= log_spaced_steps(cfg.train.max_steps, cfg.train.eval_log_points)

    # --- model
    seed_everything(cfg.train.seed)
    model_kw = dict(
        vocab_size=tokenizer.vocab_size,
        pad_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_id,
        bos_token_id=tokenizer.eos_id,
    )
    if "vocab_size" in cfg.model and cfg.model["vocab_size"] != tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model['vocab_size']} but the tokenizer has "
            f"{tokenizer.vocab_size} tokens; drop model.vocab_size (it is set from the tokenizer)"
        )
    model = RMoEForCausalLM(cfg.model_config(**model_kw))
    # router weights from their own stream: arms differing only in the router share the rest
    model.init_weights_seeded(cfg.train.seed)
    if init_dir is not None:
        _load_weights(model, init_dir)
    model.to(device)

    world, accum = di.world_size, cfg.data.grad_accum
    if cfg.data.batch_size % (world * accum):
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by processes x grad_accum "
            f"= {world} x {accum}"
        )
    micro = cfg.data.batch_size // (world * accum)
    sampler = WindowSampler(
        splits["train"].n_tokens, cfg.data.seq_len, micro, cfg.train.seed, di.rank, world
    )
    state = None
    if ckpt is not None:
        _load_weights(model, ckpt)  # full weights, before any sharding
        state = load_state(ckpt)

    use_fsdp = world > 1 and cfg.train.fsdp
    train_model: torch.nn.Module = model
    if world > 1:
        train_model = _wrap_distributed(model, cfg, device)
    # FSDP replaces parameters with sharded ones: build the optimizer after wrapping
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    step = 0
    if state is not None:
        if use_fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                model,
                optimizer,
                optim_state_dict=state["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    if di.is_main:
        dump_config(cfg, run_dir / "config.yaml")
        (run_dir / "env.json").write_text(json.dumps(environment(device, world), indent=2))
        tokenizer.save(run_dir)
    metrics_f = open(run_dir / "metrics.jsonl", "a") if di.is_main else None  # noqa: SIM115
    tb = _tensorboard(run_dir) if di.is_main else None

    def save(at_step: int) -> Path | None:
        model_sd = None
        if use_fsdp:  # gather full (unsharded) states: a collective, on every rank
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(model, options=opts)
            optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
        else:
            optim_sd = optimizer.state_dict()
        if not di.is_main:
            return None
        state = {
            "step": at_step,
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rng_state(),
            "config": cfg.to_dict(),
        }
        return save_checkpoint(
            run_dir, at_step, model, tokenizer, state, cfg.train.keep_last, model_sd
        )

    def write(rec: dict[str, Any]) -> None:
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, rec["step"])
                elif isinstance(v, list):
                    for i, vi in enumerate(v):
                        tb.add_scalar(f"{k}/layer{i}", vi, rec["step"])

    eval_bs = cfg.train.eval_batch_size or micro
    k = model.config.num_experts_per_tok
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    pbar = _progress(cfg.train.max_steps, step) if (progress and di.is_main) else None
    losses: list[float] = []
    status = "completed"
    final_eval: dict[str, float] = {}
    t_start = time.perf_counter()
    t_last, tokens_since = t_start, 0
    steps_run = 0
    train_model.train()

    def run_eval(at_step: int) -> dict[str, float]:
        ev = {}
        for spec, split in [(cfg.data.corpus, splits["valid"]), *extra_eval.items()]:
            res = evaluate_split(
                model, split, cfg.data.seq_len, eval_bs, cfg.train.eval_batches, device, amp, di
            )
            write(
                {
                    "step": at_step,
                    "split": "valid",
                    "corpus": spec,
                    **{f"valid_{k2}": v for k2, v in res.items()},
                }
            )
            if not ev:
                ev = res
        return ev

    if 0 in eval_steps and step == 0:
        final_eval = run_eval(0)

    stop = _StopFlag()
    try:
        stop.install()
        while step < cfg.train.max_steps and not stop.requested:
            log_now = (step + 1) % cfg.train.log_interval == 0 or step == 0
            optimizer.zero_grad(set_to_none=True)
            acc = torch.zeros(4, dtype=torch.float64)
            stats = None
            for micro_i in range(accum):
                x, y = get_batch(splits["train"].tokens, next(sampler), cfg.data.seq_len, device)
                last = micro_i == accum - 1
                sync_ctx = (
                    train_model.no_sync()
                    if world > 1 and not last and hasattr(train_model, "no_sync")
                    else nullcontext()
                )
                with sync_ctx:
                    ctx = torch.autocast(device.type, amp) if amp else nullcontext()
                    with ctx:
                        out = train_model(
                            input_ids=x, use_cache=False, output_router_logits=log_now and last
                        )
                        lm = F.cross_entropy(
                            out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1)
                        )
                        mc = model.config
                        loss = lm
                        aux = out.aux_loss if out.aux_loss is not None else lm.new_zeros(())
                        z = out.z_loss if out.z_loss is not None else lm.new_zeros(())
                        loss = lm + mc.router_aux_loss_coef * aux
                        if mc.router_z_loss_coef > 0:
                            loss = loss + mc.router_z_loss_coef * z
                    (loss / accum).backward()
                acc += torch.tensor(
                    [loss.item(), lm.item(), aux.item(), z.item()], dtype=torch.float64
                )
                if log_now and last and out.router_logits is not None:
                    stats = routing_stats(out.router_logits, k)
            acc /= accum
            if world > 1:
                acc_t = acc.to(device)
                dist.all_reduce(acc_t)
                acc = acc_t.cpu() / world
            loss_v = acc[0].item()
            if not math.isfinite(loss_v):
                last_ck = latest_checkpoint(run_dir)
                raise NonFiniteLossError(
                    f"loss is {loss_v} at step {step + 1}; stopped without saving. Last good "
                    f"checkpoint: {last_ck or 'none'}. Lower optim.lr, enable optim.grad_clip "
                    "or check the data."
                )
            gnorm = None
            if cfg.optim.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                if hasattr(gnorm, "full_tensor"):  # FSDP: a DTensor
                    gnorm = gnorm.full_tensor()
                gnorm = float(gnorm)
            optimizer.step()
            scheduler.step()
            step += 1
            steps_run += 1
            losses.append(loss_v)
            tokens_since += tokens_per_step
            if on_step is not None:
                on_step(step, loss_v)
            if log_now:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                rec: dict[str, Any] = {
                    "step": step,
                    "loss": loss_v,
                    "lm_loss": acc[1].item(),
                    "aux_loss": acc[2].item(),
                    "z_loss": acc[3].item(),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": tps,
                    "elapsed_s": now - t_start,
                }
                if gnorm is not None:
                    rec["grad_norm"] = gnorm
                if stats is not None:
                    rec.update({f"layer_{k2}": v for k2, v in stats.items()})
                write(rec)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{loss_v:.4f}", tok_s=f"{tps:,.0f}")
            if pbar is not None:
                pbar.update(1)
            if (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or (
                step in eval_steps
            ):
                final_eval = run_eval(step)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{loss_v:.4f}", val_bpb=f"{final_eval['bpb']:.3f}")
            if cfg.train.save_interval and step % cfg.train.save_interval == 0:
                save(step)
            if cfg.train.time_limit_s and time.perf_counter() - t_start > cfg.train.time_limit_s:
                status = "time_limit"
                break
        if stop.requested:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        status = "interrupted"
        log.warning("interrupted at step %d; saving a checkpoint", step)
    finally:
        stop.uninstall()
        if pbar is not None:
            pbar.close()
    elapsed = time.perf_counter() - t_start
    evaluated_last = (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or (
        step in eval_steps
    )
    if status != "interrupted" and (not final_eval or not evaluated_last):
        final_eval = run_eval(step)
    if steps_run or ckpt is None:
        save(step)
    if metrics_f is not None:
        metrics_f.close()
    if tb is not None:
        tb.close()
    if world > 1:
        dist.barrier()
    return TrainResult(
        run_dir=run_dir,
        step=step,
        status=status,
        tokens_per_s=steps_run * tokens_per_step / max(elapsed, 1e-9),
        final_eval=final_eval,
        losses=losses,
    )


class _StopFlag:
    """First Ctrl-C asks the loop to stop at the end of the current step (so the checkpoint is
    consistent); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after this step (press again to abort at once)")

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def log_spaced_steps(max_steps: int, points: int) -> set[int]:
    """Step 0 plus about `points` log-spaced steps in [1, max_steps] (always including the last)."""
    steps = {0, max_steps}
    if points > 0:
        for v in np.geomspace(1, max_steps, num=points):
            steps.add(int(round(v)))
    return steps


def _check_resume_config(saved: TrainConfig, new: TrainConfig) -> None:
    """Resuming must not change the model, the data or the optimizer; max_steps and logging may."""
    a, b = saved.to_dict(), new.to_dict()
    diffs = []
    for sec in ("model", "data", "optim"):
        for key in sorted(set(a[sec]) | set(b[sec])):
            if a[sec].get(key) != b[sec].get(key):
                diffs.append(
                    f"{sec}.{key}: checkpoint {a[sec].get(key)!r} vs now {b[sec].get(key)!r}"
                )
    for key in ("seed",):
        if a["train"][key] != b["train"][key]:
            diffs.append(f"train.{key}: checkpoint {a['train'][key]!r} vs now {b['train'][key]!r}")
    if diffs:
        raise ValueError("--resume with a different config: " + "; ".join(diffs))


def _wrap_distributed(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    if cfg.train.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(str(run_dir / "tb"))
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def find_model_dir(path: str | Path) -> Path:
    """A directory with config.json + safetensors: the path itself, or a run's newest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if (p / "config.json").is_file():
        return p
    ck = latest_checkpoint(p)
    if ck is not None:
        return ck
    raise FileNotFoundError(
        f"{p} is neither a saved model (no config.json) nor a run directory with checkpoints"
    )
