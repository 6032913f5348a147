"""Run configuration: a `TrainConfig` of four sections (model, data, optim, train), read from YAML
presets or files, with `--set section.key=value` overrides. Unknown keys fail with the list of
valid keys and the nearest match.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import RMoEConfig
from ..formatting import yaml_error_line


@dataclass
class DataConfig:
    """What text the run trains on and how it is cut.

    Attributes:
        corpus: corpus spec (`python-stdlib`, `text:PATH`, `jsonl:PATH`, `parquet:PATH`,
            `hf:NAME[:CONFIG]`, `enwik8:PATH`, `pydoc-topics`).
        text_field: the text column for jsonl/parquet/hf corpora.
        tokenizer: `bytes`, `bpe:N` (trained on the train split, saved with the run), or a path to
            a tokenizer.json / transformers tokenizer directory.
        seq_len: tokens per training window.
        batch_size: GLOBAL batch in sequences per optimizer step (over all processes and
            accumulation micro-steps).
        grad_accum: micro-steps per optimizer step (per process).
        cache_dir: token cache directory (None = $RMOE_CACHE_DIR or ~/.cache/rmoe/tokens).
        extra_eval: further corpus specs whose valid split is evaluated at every evaluation
            (e.g. the original domain during continual pre-training), same tokenizer.
    """

    corpus: str = "python-stdlib"
    text_field: str = "text"
    tokenizer: str = "bytes"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    cache_dir: str | None = None
    extra_eval: list[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule.

    Attributes:
        lr: peak learning rate.
        betas: Adam betas.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay, applied to matrices only (dim >= 2).
        warmup_steps: linear warm-up from 0 to `lr`.
        schedule: after warm-up: `constant`, `cosine` or `linear` decay to min_lr_ratio * lr.
        min_lr_ratio: final lr as a fraction of `lr` (cosine/linear).
        grad_clip: clip the global gradient norm to this (0 = off).
        router_lr_mult: the routers' parameters (every MoE layer's router, the shared recurrent
            cell, the shared router module) train at lr * router_lr_mult, on the same schedule
            (1 = the same lr as everything else).
        router_weight_decay: weight decay of the routers' matrices (None = weight_decay).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    router_lr_mult: float = 1.0
    router_weight_decay: float | None = None


TRAINABLE_CHOICES = ("all", "router", "router+base")


@dataclass
class RunConfig:
    """How long, how often, where and on what.

    Attributes:
        max_steps: optimizer steps.
        seed: seeds model init, data order and every RNG.
        device: `auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:N`.
        dtype: `auto` (float32 on CPU, bf16 autocast on GPU), `float32`, `bfloat16`.
        compile: wrap the model in torch.compile: `auto` (the default: on for CUDA, off
            elsewhere, what measures faster on each device type), true or false. Measured on
            CPU: a 4-layer D=128 E=8 RMoE step (batch 8 x 128, 2 threads, torch 2.13) took
            150 ms eager vs 140 ms compiled, but compiling cost 144 s first, paid back only
            after ~14,000 steps, so `auto` leaves CPU runs eager. On CUDA the MoE blocks
            compile without a graph break with the `sorted` and `grouped_mm` backends
            (fullgraph-clean custom ops) and the elementwise ops (norms, RoPE, SwiGLU) fuse.
        threads: CPU threads for torch (0 = torch's default).
        log_interval: steps between metrics.jsonl records (with per-layer routing stats).
        eval_interval: steps between validation evaluations (0 = only at the end).
        eval_batches: validation batches per evaluation (0 = the whole split).
        eval_batch_size: sequences per evaluation batch (0 = the training micro-batch).
        save_interval: steps between checkpoints (0 = only at the end).
        keep_last: checkpoints to keep.
        on_save_error: what a failed checkpoint save (e.g. a full disk, ENOSPC) does; either
            way the partial checkpoint is removed and the previous one stays intact:
            `stop` (default) ends the run with one line naming the error; `continue` logs a
            warning, keeps training and tries again at the next save interval.
        fsdp: shard with FSDP2 (fully_shard per decoder layer, then the whole model) instead of
            DDP when launched with several processes (GPUs with NCCL, or CPUs with gloo).
        time_limit_s: stop (with a checkpoint) after this many seconds of training (0 = off):
            a hard stop, wherever the learning-rate schedule is.
        time_budget_s: fit the whole run (steps, evaluations, the final save) into this many
            seconds (0 = off): the trainer measures its speed as it goes and ends the run at
            the step that fits, with the learning-rate schedule decaying to that step, never
            beyond max_steps (`rmoe.training.budget`). The step count then depends on the
            machine's speed, so such a run is reproducible only given its final step; the
            planned end is logged and saved with each checkpoint (`--resume` continues it).
        eval_at: extra steps at which to evaluate (0 = before the first step).
        eval_log_points: if > 0, also evaluate at step 0 and at about this many log-spaced steps
            in [1, max_steps] (dense at the start: stability-gap curves).
        trainable: which parameters train: `all`; `router` (only the recurrent stage: every
            Proj_i, G_i and the shared cell; a retrofit's original W_i stay frozen, a model
            without a cell trains its routers); `router+base` (that, plus the retrofit's W_i).
            Everything else gets ``requires_grad=False`` and no optimizer state.
    """

    max_steps: int = 1000
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | str = "auto"
    threads: int = 0
    log_interval: int = 10
    eval_interval: int = 0
    eval_batches: int = 50
    eval_batch_size: int = 0
    save_interval: int = 0
    keep_last: int = 2
    on_save_error: str = "stop"
    fsdp: bool = False
    time_limit_s: float = 0.0
    time_budget_s: float = 0.0
    eval_at: list[int] = field(default_factory=list)
    eval_log_points: int = 0
    trainable: str = "all"


def _model_defaults() -> dict[str, Any]:
    return {}


@dataclass
class TrainConfig:
    """A whole run: `model` holds `RMoEConfig` keyword arguments (vocab_size is set from the
    tokenizer), the other sections are `DataConfig`, `OptimConfig`, `RunConfig`."""

    model: dict[str, Any] = field(default_factory=_model_defaults)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-ready)."""
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    def model_config(self, **extra: Any) -> RMoEConfig:
        """The `RMoEConfig` of this run (validated)."""
        return RMoEConfig(**{**self.model, **extra})

    def validate(self) -> None:
        """Raise ValueError on out-of-range numbers or unknown choices."""
        d, o, t = self.data, self.optim, self.train
        checks = [
            (d.seq_len >= 1, f"data.seq_len must be >= 1, got {d.seq_len}"),
            (d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}"),
            (d.grad_accum >= 1, f"data.grad_accum must be >= 1, got {d.grad_accum}"),
            (o.lr > 0, f"optim.lr must be > 0, got {o.lr}"),
            (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
            (o.router_lr_mult > 0, f"optim.router_lr_mult must be > 0, got {o.router_lr_mult}"),
            (
                o.router_weight_decay is None or o.router_weight_decay >= 0,
                f"optim.router_weight_decay must be >= 0 or null, got {o.router_weight_decay}",
            ),
            (o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}"),
            (
                0 <= o.min_lr_ratio <= 1,
                f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}",
            ),
            (o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}"),
            (
                o.schedule in ("constant", "cosine", "linear"),
                f"optim.schedule={o.schedule!r}; expected constant, cosine or linear"
                + _nearest(o.schedule, ["constant", "cosine", "linear"]),
            ),
            (t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}"),
            (
                t.dtype in ("auto", "float32", "bfloat16"),
                f"train.dtype={t.dtype!r}; expected auto, float32 or bfloat16",
            ),
            (t.log_interval >= 1, f"train.log_interval must be >= 1, got {t.log_interval}"),
            (t.keep_last >= 1, f"train.keep_last must be >= 1, got {t.keep_last}"),
            (
                t.on_save_error in ("stop", "continue"),
                f"train.on_save_error={t.on_save_error!r}; expected stop or continue"
                + _nearest(t.on_save_error, ["stop", "continue"]),
            ),
            (
                _compile_choice(t.compile) is not None,
                f"train.compile={t.compile!r}; expected auto, true or false",
            ),
            (t.time_budget_s >= 0, f"train.time_budget_s must be >= 0, got {t.time_budget_s}"),
            (
                t.trainable in TRAINABLE_CHOICES,
                f"train.trainable={t.trainable!r}; expected one of {', '.join(TRAINABLE_CHOICES)}"
                + _nearest(t.trainable, TRAINABLE_CHOICES),
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        unknown = set(self.model) - set(model_field_names())
        if unknown:
            name = sorted(unknown)[0]
            raise ValueError(
                f"unknown config key 'model.{name}'; valid model keys: {sorted(model_field_names())}"
                + _nearest(name, model_field_names())
            )
        self.model_config(vocab_size=self.model.get("vocab_size", 258))

    def check_positions(self) -> None:
        """Refuse a training window longer than the model's positions (without RoPE scaling).
        Checked where a run is configured (`load_config`), not for every model description."""
        d = self.data
        model = self.model_config(vocab_size=self.model.get("vocab_size", 258))
        if d.seq_len > model.max_position_embeddings and not model.rope_scaling:
            raise ValueError(
                f"data.seq_len={d.seq_len} is longer than model.max_position_embeddings="
                f"{model.max_position_embeddings}; lower data.seq_len or raise "
                f"model.max_position_embeddings (--set model.max_position_embeddings={d.seq_len})"
            )


def _compile_choice(value: bool | str) -> bool | str | None:
    """train.compile as True, False or "auto" (None when it is none of those)."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v == "auto":
        return "auto"
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    return None


def compile_enabled(value: bool | str, device_type: str) -> bool:
    """Whether train.compile (True, False or "auto") compiles on this device type: "auto" is
    on for CUDA only (see `RunConfig.compile`)."""
    choice = _compile_choice(value)
    if choice is None:
        raise ValueError(f"train.compile={value!r}; expected auto, true or false")
    return device_type == "cuda" if choice == "auto" else choice


def model_field_names() -> list[str]:
    """The keys a run config's ``model`` section accepts: RMoEConfig's constructor arguments."""
    import inspect

    params = inspect.signature(RMoEConfig.__init__).parameters
    return [p for p in params if p not in ("self", "kwargs")]


def _nearest(name: str, choices) -> str:
    m = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.0)
    return f" (nearest: {m[0]!r})" if m else ""


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "train": RunConfig}


def valid_keys() -> list[str]:
    """Every settable key, dotted (`section.key`)."""
    keys = [f"model.{k}" for k in model_field_names()]
    for sec, cls in _SECTIONS.items():
        keys += [f"{sec}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _coerce(value: Any, like: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the type of the default `like`."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key} expects true/false, got {value!r}")
    if isinstance(like, int) and not isinstance(like, bool):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} expects an integer, got {value!r}") from None
        if f != int(f):
            raise ValueError(f"{key} expects an integer, got {value!r}")
        return int(f)
    if isinstance(like, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} expects a number, got {value!r}") from None
    if isinstance(like, list):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return list(value)
    if isinstance(like, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} expects a list like [0.9, 0.95], got {value!r}")
        return tuple(float(v) for v in value)
    return value


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a nested dict; unknown sections/keys raise ValueError."""
    cfg = TrainConfig()
    raw = raw or {}
    for sec, body in raw.items():
        if sec == "model":
            if not isinstance(body, dict):
                raise ValueError("config section 'model' must be a mapping")
            cfg.model.update(body)
            continue
        if sec not in _SECTIONS:
            raise ValueError(
                f"unknown config section {sec!r}; valid sections: model, data, optim, train"
                + _nearest(sec, ["model", "data", "optim", "train"])
            )
        if not isinstance(body, dict):
            raise ValueError(f"config section {sec!r} must be a mapping")
        for key, value in body.items():
            set_key(cfg, f"{sec}.{key}", value)
    cfg.validate()
    return cfg


def set_key(cfg: TrainConfig, dotted: str, value: Any) -> None:
    """Set `section.key` (strings from the CLI are parsed as YAML scalars)."""
    if "." not in dotted:
        raise ValueError(
            f"config key {dotted!r} needs a section, e.g. model.{dotted} or train.{dotted}"
            + _nearest(dotted, valid_keys())
        )
    sec, key = dotted.split(".", 1)
    if isinstance(value, str) and sec == "model":
        value = yaml.safe_load(value) if value != "" else value
    if sec == "model":
        if key not in model_field_names():
            raise ValueError(
                f"unknown config key {dotted!r}; valid keys: {', '.join(valid_keys())}"
                + _nearest(dotted, valid_keys())
            )
        cfg.model[key] = value
        return
    if sec not in _SECTIONS:
        raise ValueError(
            f"unknown config key {dotted!r}; valid keys: {', '.join(valid_keys())}"
            + _nearest(dotted, valid_keys())
        )
    section = getattr(cfg, sec)
    names = [f.name for f in dataclasses.fields(section)]
    if key not in names:
        raise ValueError(
            f"unknown config key {dotted!r}; valid keys: {', '.join(valid_keys())}"
            + _nearest(dotted, valid_keys())
        )
    default = getattr(type(section)(), key)
    if default is None:
        value = None if value in (None, "null", "None", "") else value
    else:
        value = _coerce(value, default, dotted)
    setattr(section, key, value)


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    root = resources.files("rmoe") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """A preset name (`tiny`, `enwik8-medium`, …) or a YAML file, then `key=value` overrides."""
    raw: dict[str, Any] = {}
    if name_or_path:
        path = Path(name_or_path)
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"config file {str(path)!r} does not exist")
            text = path.read_text()
        else:
            names = preset_names()
            if name_or_path not in names:
                raise ValueError(
                    f"unknown preset {name_or_path!r}; presets: {names}"
                    + _nearest(name_or_path, names)
                    + " (or pass a path to a YAML file)"
                )
            text = (resources.files("rmoe") / "configs" / f"{name_or_path}.yaml").read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(
                f"config {name_or_path!r} is not valid YAML ({yaml_error_line(exc)})"
            ) from None
        if raw is None:
            raise ValueError(
                f"config {name_or_path!r} is empty; give at least one section (model:, data:, "
                "optim:, train:) or start from a preset, e.g. `rmoe train tiny --set KEY=VALUE`"
            )
        if not isinstance(raw, dict):
            raise ValueError(f"config {name_or_path!r} must be a mapping of sections")
    cfg = from_dict(copy.deepcopy(raw))
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), value.strip())
    cfg.validate()
    cfg.check_positions()
    return cfg


def dump_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
