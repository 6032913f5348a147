"""Preparing a run: resume or fresh, tokenizer, data, model, optimizer — in that order.

:func:`prepare_run` does everything :func:`rmoe.training.train` needs before the first step and
returns it as one :class:`PreparedRun`. The order of the steps fixes the random streams: the
model is built right after ``seed_everything(train.seed)``, and the router weights come from
their own stream (``init_weights_seeded``) so arms that differ only in the router share the
rest of the initialisation and see the same batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from ..data import TokenSplit, WindowSampler, build_tokenizer, get_corpus, get_split_tokens
from ..loading import find_model_dir, load_weights
from ..modeling import RMoEForCausalLM
from ..runtime import (
    DistInfo,
    autocast_dtype,
    environment,
    resolve_device,
    seed_everything,
    set_threads,
    setup_distributed,
)
from .checkpoint import Checkpointer, latest_checkpoint, load_state, resume_checkpoint
from .config import TrainConfig, compile_enabled, dump_config, from_dict
from .optim import build_optimizer, build_scheduler
from .step import attach_router_step


@dataclass
class PreparedRun:
    """Everything the training loop uses.

    Attributes:
        cfg: the validated run config.
        run_dir: the run directory.
        device, dist, amp: where and how to compute (amp None = float32).
        tokenizer: the run's tokenizer (saved in run_dir).
        splits: ``{"train", "valid"}`` token splits of the training corpus.
        extra_eval: ``{corpus spec: valid split}`` of ``data.extra_eval``.
        eval_steps: steps (besides every ``eval_interval``) at which to evaluate.
        model: the unwrapped model; ``train_model`` is it wrapped (DDP/FSDP/compile).
        optimizer, scheduler, sampler, checkpointer: the training state and its saver.
        step: optimizer steps already done (0 for a fresh run).
        resumed: the run continues from a checkpoint.
        micro_batch: windows per micro-batch on this process.
        router_hook: the optimizer-step pre-hook that updates the expert biases and resets the
            balance losses' step state once per optimizer step
            (:func:`~rmoe.training.step.attach_router_step`).
    """

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    dist: DistInfo
    amp: torch.dtype | None
    tokenizer: Any
    splits: dict[str, TokenSplit]
    extra_eval: dict[str, TokenSplit]
    eval_steps: set[int]
    model: RMoEForCausalLM
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: WindowSampler
    checkpointer: Checkpointer
    step: int
    resumed: bool
    micro_batch: int
    router_hook: RemovableHandle | None = None


def checkpoint_to_resume(run_dir: Path, resume: bool, cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from (``resume``), or None for a fresh run.

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint.
        FileExistsError: a fresh run into a directory that holds checkpoints.
        ValueError: resuming with a config that changes the model, data or optimizer.
    """
    if resume:
        ckpt = resume_checkpoint(run_dir)  # the newest intact one; damaged newer ones: warned
        if ckpt is None:
            raise FileNotFoundError(
                f"--resume: {run_dir} holds no checkpoint (expected {run_dir}/checkpoints/step-*/"
                "trainer_state.pt); start a new run without --resume"
            )
        check_resume_config(from_dict(load_state(ckpt)["config"]), cfg)
        return ckpt
    if (run_dir / "checkpoints").is_dir() and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out"
        )
    return None


def check_resume_config(saved: TrainConfig, new: TrainConfig) -> None:
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


def choose_tokenizer(cfg: TrainConfig, corpus, ckpt: Path | None, init_dir: Path | None):
    """The run's tokenizer: the checkpoint's when resuming; the starting model's own when
    starting from another run (a new one, e.g. ``bpe:N`` retrained on the new corpus, would
    silently remap the token ids the weights were trained on); else ``data.tokenizer``."""
    if ckpt is not None:
        return build_tokenizer(str(ckpt))
    if init_dir is not None and (init_dir / "tokenizer.json").is_file():
        return build_tokenizer(str(init_dir))
    if cfg.data.tokenizer.startswith("bpe:"):
        return build_tokenizer(cfg.data.tokenizer, train_texts=corpus.documents("train"))
    return build_tokenizer(cfg.data.tokenizer)


def load_data(
    cfg: TrainConfig, ckpt: Path | None, init_dir: Path | None
) -> tuple[Any, dict[str, TokenSplit], dict[str, TokenSplit]]:
    """(tokenizer, train/valid splits, extra evaluation splits) of the run's corpora."""
    d = cfg.data
    corpus = get_corpus(d.corpus, text_field=d.text_field)
    tokenizer = choose_tokenizer(cfg, corpus, ckpt, init_dir)
    splits = {
        s: get_split_tokens(corpus, tokenizer, s, cache_dir=d.cache_dir) for s in ("train", "valid")
    }
    extra = {
        spec: get_split_tokens(
            get_corpus(spec, text_field=d.text_field), tokenizer, "valid", cache_dir=d.cache_dir
        )
        for spec in d.extra_eval
    }
    return tokenizer, splits, extra


def log_spaced_steps(max_steps: int, points: int) -> set[int]:
    """Step 0 plus about `points` log-spaced steps in [1, max_steps] (always including the last)."""
    steps = {0, max_steps}
    if points > 0:
        for v in np.geomspace(1, max_steps, num=points):
            steps.add(int(round(v)))
    return steps


def evaluation_steps(cfg: TrainConfig) -> set[int]:
    """``train.eval_at`` plus the log-spaced points of ``train.eval_log_points``."""
    steps = set(int(s) for s in cfg.train.eval_at)
    if cfg.train.eval_log_points > 0:
        steps |= log_spaced_steps(cfg.train.max_steps, cfg.train.eval_log_points)
    return steps


def _vocab_size(cfg: TrainConfig, tokenizer, init_dir: Path | None) -> int:
    """The model's vocabulary: the tokenizer's size, or, when starting from a model whose
    embedding is padded beyond its tokenizer (Qwen, OLMoE checkpoints), that model's size."""
    vocab = tokenizer.vocab_size
    if init_dir is not None and (init_dir / "config.json").is_file():
        import json

        init_vocab = json.loads((init_dir / "config.json").read_text()).get("vocab_size")
        if isinstance(init_vocab, int) and init_vocab != vocab:
            if init_vocab < vocab:
                raise ValueError(
                    f"the tokenizer has {vocab} tokens but the model in {init_dir} has a "
                    f"vocabulary of {init_vocab}; use the tokenizer saved with that model"
                )
            vocab = init_vocab
    if "vocab_size" in cfg.model and cfg.model["vocab_size"] != vocab:
        raise ValueError(
            f"model.vocab_size={cfg.model['vocab_size']} but the model needs {vocab} "
            "(the tokenizer's size, or the --init-from model's); drop model.vocab_size "
            "(it is set from the tokenizer)"
        )
    return vocab


def build_model(cfg: TrainConfig, tokenizer, init_dir: Path | None) -> RMoEForCausalLM:
    """The run's model, seeded (router weights from their own stream), with the weights of
    ``init_dir`` when starting from another run."""
    seed_everything(cfg.train.seed)
    vocab = _vocab_size(cfg, tokenizer, init_dir)
    model = RMoEForCausalLM(
        cfg.model_config(
            vocab_size=vocab,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
            bos_token_id=tokenizer.eos_id,
        )
    )
    model.init_weights_seeded(cfg.train.seed)
    if init_dir is not None:
        load_weights(model, init_dir)
    return model


def micro_batch_size(cfg: TrainConfig, world: int) -> int:
    """Windows per micro-batch per process: ``data.batch_size / (processes x grad_accum)``."""
    accum = cfg.data.grad_accum
    if cfg.data.batch_size % (world * accum):
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by processes x grad_accum "
            f"= {world} x {accum}"
        )
    return cfg.data.batch_size // (world * accum)


def wrap_distributed(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """FSDP2 (``train.fsdp``: every decoder layer, then the whole model) or DDP."""
    if cfg.train.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def write_run_files(run: PreparedRun) -> None:
    """config.yaml, env.json and the tokenizer (main process)."""
    if not run.dist.is_main:
        return
    dump_config(run.cfg, run.run_dir / "config.yaml")
    env = environment(run.device, run.dist.world_size)
    (run.run_dir / "env.json").write_text(json.dumps(env, indent=2))
    run.tokenizer.save(run.run_dir)


def apply_trainable(model: torch.nn.Module, trainable: str, verbose: bool = True) -> None:
    """Freeze what `train.trainable` leaves out (`all`: nothing) and say how much trains."""
    if trainable == "all":
        return
    from .surgery import freeze_except_router

    names = freeze_except_router(model, train_base=trainable == "router+base")
    if verbose:
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(
            f"train.trainable={trainable}: training {len(names)} tensors, {n:,} of "
            f"{total:,} parameters ({100 * n / total:.2f} %); the rest are frozen",
            flush=True,
        )


def prepare_run(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    init_from: str | Path | None = None,
) -> PreparedRun:
    """Validate, set up the device and processes, then build or restore the run's state
    (see :func:`rmoe.training.train` for the arguments). Writes config.yaml, env.json and the
    tokenizer to the run directory."""
    cfg.validate()
    run_dir = Path(out_dir)
    device = resolve_device(cfg.train.device)
    di = setup_distributed(device)
    set_threads(cfg.train.threads)
    amp = autocast_dtype(cfg.train.dtype, device)
    ckpt = checkpoint_to_resume(run_dir, resume, cfg)
    if di.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    init_dir = find_model_dir(init_from, verify=True) if init_from is not None else None
    tokenizer, splits, extra = load_data(cfg, ckpt, init_dir)
    model = build_model(cfg, tokenizer, init_dir)
    model.to(device)
    micro = micro_batch_size(cfg, di.world_size)
    sampler = WindowSampler(
        splits["train"].n_tokens, cfg.data.seq_len, micro, cfg.train.seed, di.rank, di.world_size
    )
    state = None
    if ckpt is not None:
        load_weights(model, ckpt)  # full weights, before any sharding
        state = load_state(ckpt)
    apply_trainable(model, cfg.train.trainable, di.is_main)  # before DDP/FSDP and the optimizer
    train_model = wrap_distributed(model, cfg, device) if di.world_size > 1 else model
    # FSDP replaces parameters with sharded ones: build the optimizer after wrapping
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    # expert biases / global-balance counts: once per optimizer step, on the unwrapped model
    router_hook = attach_router_step(model, optimizer)
    fsdp = di.world_size > 1 and cfg.train.fsdp
    checkpointer = Checkpointer(
        run_dir, model, optimizer, scheduler, sampler, tokenizer, cfg.to_dict(),
        cfg.train.keep_last, fsdp=fsdp, is_main=di.is_main,
        on_write_error=cfg.train.on_save_error,
    )  # fmt: skip
    step = checkpointer.restore(state) if state is not None else 0
    if compile_enabled(cfg.train.compile, device.type):
        train_model = torch.compile(train_model)
    run = PreparedRun(
        cfg=cfg, run_dir=run_dir, device=device, dist=di, amp=amp, tokenizer=tokenizer,
        splits=splits, extra_eval=extra, eval_steps=evaluation_steps(cfg), model=model,
        train_model=train_model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
        checkpointer=checkpointer, step=step, resumed=ckpt is not None, micro_batch=micro,
        router_hook=router_hook,
    )  # fmt: skip
    write_run_files(run)
    return run
