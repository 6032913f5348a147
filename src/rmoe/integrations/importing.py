"""Read a transformers MoE checkpoint (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) into an rmoe
model with the same function, or retrofit a recurrent router onto a linear-router model.

`import_checkpoint` is what ``rmoe import`` runs:

* **HF -> rmoe.** The checkpoint's ``config.json`` names its family (``model_type``); the
  family's table in :mod:`rmoe.integrations.families`, read HF -> rmoe, gives the
  `rmoe.RMoEConfig` (`rmoe_settings`) and the weights (`read_state`). Only safetensors are
  read (``model.safetensors`` or shards listed in ``model.safetensors.index.json``; pickles
  can run code and are refused). Anything rmoe cannot represent exactly is a ValueError that
  names it: a non-SiLU activation, a sliding window shorter than the context, ``clip_qkv``,
  a RoPE variant rmoe lacks, a tensor the table has no row for, an architecture option this
  rmoe version does not have. Optional tensors that are all zero (Qwen2's q/k/v biases,
  Qwen2-MoE's shared-expert gate) are dropped, which keeps the function exactly. In float32
  the imported model's logits equal the original's to float rounding (the tests check 1e-4)
  and greedy generation gives the same tokens.
* **Tokenizer.** The tokenizer files are copied; when rmoe's tokenizer loader would pick
  another end-of-sequence or padding token than ``config.json`` names, ``tokenizer_config.json``
  is given the config's ``eos_token`` / ``pad_token`` (``align_special_tokens``).
* **Retrofit** (``router="recurrent"``): the model is imported with its linear gates, then
  `rmoe.training.surgery.retrofit_recurrent` adds the recurrent router so that the logits at
  the start equal the linear model's. The source may also be an rmoe run or model directory
  with a linear router.

The output folder holds ``config.json`` + safetensors (loadable by
`rmoe.loading.load_model`), the tokenizer, and ``train.yaml``: a training config whose model
section is this model, for ``rmoe train OUT/train.yaml --init-from OUT --out RUN``. Reading
safetensors, building the model around the tensors and writing the folder are
:mod:`rmoe.integrations.checkpoints`' (shared with ``rmoe upcycle``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoints import (
    Checkpoint,
    build_model,
    copy_generation_config,
    copy_tokenizer,
    read_config_json,
    rmoe_options,
    save_model,
)
from .families import (
    BASE_INERT,
    DENSE_FAMILIES,
    FAMILIES,
    Family,
    Plan,
    Zeros,
    expand,
    plan_from_hf,
)
from .families import settings_from_hf as table_settings

ROUTERS = ("linear", "recurrent")
"""What an import can give the model: its own linear gates, or a retrofitted recurrent router."""

TRAINING_SETTINGS = frozenset(
    {
        "router_aux_loss_coef",
        "router_aux_loss_type",
        "router_z_loss_coef",
        "router_jitter",
        "router_expert_bias",
        "router_bias_update_rate",
        "capacity_factor",
        "experts_backend",
        "hidden_dropout",
        "attention_dropout",
        "gw_entropy_threshold",
        "gw_max_tokens_per_seq",
        "gw_selection",
    }
)
"""rmoe settings an import may set without changing the imported function (balance losses,
dropout, capacity in training, GW-MoE; a new expert bias starts at zero)."""

_OPTIONAL = {
    "attn_bias": "attention_bias",
    "attn_out_bias": "attention_out_bias",
    "shared_gate": "shared_expert_gate",
}
"""Plan flag -> rmoe option of tensors an import drops when the checkpoint's are all zero."""

_OFF = (None, False, 0, 0.0, "none", {}, [])


@dataclass
class ImportResult:
    """What `import_checkpoint` (or `rmoe.integrations.upcycle.upcycle_checkpoint`) wrote.

    Attributes:
        out_dir: the rmoe model folder.
        source: the source family (``mixtral``, ...), or ``rmoe`` for a retrofitted rmoe model.
        router: the router type of the written model.
        config: its `rmoe.RMoEConfig`.
        files: the file names written, sorted.
        notes: what the user should know (one sentence each).
    """

    out_dir: Path
    source: str
    router: str
    config: Any
    files: list[str]
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint
# ----------------------------------------------------------------------------------------------
def hf_family(raw: Mapping[str, Any], families: Mapping[str, Family], what: str) -> Family:
    """The family of a ``config.json`` dict among `families` (ValueError naming the choices)."""
    model_type = raw.get("model_type")
    if model_type not in families:
        hint = ""
        if model_type in DENSE_FAMILIES and families is not DENSE_FAMILIES:
            hint = "; it is a dense model: make an MoE model of it with rmoe upcycle"
        elif model_type in FAMILIES and families is not FAMILIES:
            hint = "; it is an MoE model already: read it with rmoe import"
        raise ValueError(
            f"cannot {what} model_type {model_type!r}: rmoe {what}s {sorted(families)} "
            f"checkpoints (config.json model_type){hint}"
        )
    return families[model_type]


def hf_config(directory: str | Path, family: Family) -> Any:
    """The family's transformers config object read from the folder (defaults filled in the
    way the family's own model would fill them)."""
    import transformers

    cls = getattr(transformers, family.config_class)
    try:
        return cls.from_pretrained(str(directory))
    except (OSError, TypeError, ValueError, KeyError) as exc:
        msg = str(exc).strip("\"'")
        raise ValueError(f"cannot read {family.config_class} from {directory}: {msg}") from None


# ----------------------------------------------------------------------------------------------
# Config: HF -> rmoe, with every field judged
# ----------------------------------------------------------------------------------------------
def check_hf_fields(family: Family, config: Any, raw: Mapping[str, Any]) -> list[str]:
    """Judge every field of a `family` HF config: constants must hold (or their `Accept`
    must find no problem), fields rmoe does not know must be at transformers' default.

    Returns:
        notes (ignored config.json keys, training-only settings not carried, ...).

    Raises:
        ValueError: a field whose value changes the model in a way rmoe cannot represent.
    """
    import transformers

    where = f"cannot import {family.name}"
    notes = []
    for name, constant in family.constants.items():
        if name in family.accepts:
            continue
        value = getattr(config, name, constant)
        if value != constant:
            raise ValueError(
                f"{where}: {name}={value!r} changes the model; rmoe's architecture has only "
                f"{name}={constant!r}"
            )
    for accept in family.accepts.values():
        problem = accept.problem(config)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        if (note := accept.note(config)) is not None:
            notes.append(note)
    cls = getattr(transformers, family.config_class)
    known = {*family.fields, *family.constants, *family.derived, *family.accepts, *BASE_INERT}
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name not in known and getattr(config, f.name, None) != getattr(defaults, f.name, None):
            raise ValueError(
                f"{where}: config field {f.name}={getattr(config, f.name)!r} is not one rmoe "
                "knows how to carry (it may change the model); only its default "
                f"{getattr(defaults, f.name)!r} can be imported"
            )
    declared = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map)
    legacy = {"rope_theta", "rope_scaling", "head_dim", "torch_dtype", "_name_or_path"}
    for key in sorted(set(raw) - declared - legacy - BASE_INERT):
        if key == "quantization_config":
            raise ValueError(
                f"{where}: the checkpoint is quantized (quantization_config); rmoe imports "
                "floating-point weights only: dequantize it first"
            )
        notes.append(f"config.json key {key!r} is not a {family.config_class} field: ignored")
    return notes


def rmoe_settings(
    family: Family, config: Any, raw: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """The `rmoe.RMoEConfig` keyword arguments of a `family` HF config, and notes.

    Raises:
        ValueError: the config holds something rmoe cannot represent (`check_hf_fields`,
            the derived fields' inverses), naming it.
    """
    notes = check_hf_fields(family, config, raw)
    try:
        kw = table_settings(family, config)
    except ValueError as exc:
        raise ValueError(f"cannot import {family.name}: {exc}") from None
    kw["head_dim"] = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    if isinstance(kw.get("eos_token_id"), list) and len(kw["eos_token_id"]) == 1:
        kw["eos_token_id"] = kw["eos_token_id"][0]
    kw["router_type"] = "linear"
    kw.setdefault("intermediate_size", kw.get("moe_intermediate_size", 512))
    return kw, notes


def check_options(kw: dict[str, Any], source: str) -> dict[str, Any]:
    """`kw` without the settings `rmoe.RMoEConfig` lacks, when they are off.

    Raises:
        ValueError: a setting that is on and that this rmoe version does not have.
    """
    options = rmoe_options()
    out = {}
    for name, value in kw.items():
        if name in options:
            out[name] = value
        elif value not in _OFF:
            raise ValueError(
                f"cannot import {source}: it needs rmoe's {name}={value!r}, an architecture "
                "option this version of rmoe does not have"
            )
    return out


# ----------------------------------------------------------------------------------------------
# Weights: HF -> rmoe
# ----------------------------------------------------------------------------------------------
def drop_zero_options(
    ckpt: Checkpoint, family: Family, plan: Plan, kw: dict[str, Any]
) -> tuple[Plan, list[str]]:
    """Turn off the optional tensors (`_OPTIONAL`: attention biases, the shared-expert gate)
    that are all zero in `ckpt` and that the family's table writes as zeros when off: the
    function is unchanged (a zero gate, 0.5 = sigmoid(0), is folded into the shared expert's
    down projection by the table). Updates `kw`; returns the new plan and notes."""
    flags = dict(plan.flags)
    notes = []
    for flag, option in _OPTIONAL.items():
        if not flags.get(flag):
            continue
        off = {
            r.hf for r in family.tensors if isinstance(r.layout, Zeros) and (flag, False) in r.when
        }
        rows = tuple(r for r in family.tensors if (flag, True) in r.when and r.hf in off)
        keys = [k for e in expand(dataclasses.replace(family, tensors=rows), plan) for k in e.hf]
        if keys and all(k in ckpt and not ckpt.get(k).any() for k in keys):
            flags[flag] = False
            kw[option] = False
            notes.append(
                f"{option}: the checkpoint's {rows[0].hf.split('.')[-2]} tensors are all "
                "zero, so the model is imported without them (same function)"
            )
    return dataclasses.replace(plan, flags=flags), notes


_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_state(ckpt: Checkpoint, family: Family, plan: Plan) -> dict[str, torch.Tensor]:
    """The rmoe state dict of a `family` checkpoint, walking the table HF -> rmoe.

    Raises:
        ValueError: a tensor the table expects is missing, an HF-only tensor that rmoe can
            take only as zeros is not zero, or the checkpoint has tensors the table does not
            map (a part of the model rmoe has no place for).
    """
    where = f"cannot import {family.name}"
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for entry in expand(family, plan):
        if isinstance(entry.layout, Zeros):
            for key in entry.hf:
                if key in ckpt and ckpt.get(key).any():
                    raise ValueError(
                        f"{where}: {key} is not zero and rmoe has no counterpart"
                        f"{' (' + entry.note + ')' if entry.note else ''}"
                    )
                used.add(key)
            continue
        missing = [k for k in entry.hf if k not in ckpt]
        if missing:
            raise ValueError(f"{where}: the checkpoint has no {missing[0]} (for {entry.rmoe})")
        state[entry.rmoe] = entry.layout.to_rmoe([ckpt.get(k) for k in entry.hf])
        used.update(entry.hf)
    if plan.flags["tied"]:
        used.add("lm_head.weight")
    left = sorted(k for k in ckpt.keys() - used if not k.endswith(_IGNORED_SUFFIXES))
    if left:
        raise ValueError(
            f"{where}: rmoe has no place for these tensors: {left[:4]}"
            f"{' ...' if len(left) > 4 else ''} (an architecture variant the {family.name} "
            "table does not describe)"
        )
    return state


# ----------------------------------------------------------------------------------------------
# The import
# ----------------------------------------------------------------------------------------------
def check_router_kwargs(router: str, router_kwargs: Mapping[str, Any]) -> None:
    """ValueError for a router rmoe import cannot give, or settings a linear import cannot
    take without changing the model."""
    if router not in ROUTERS:
        raise ValueError(
            f"--router {router!r}: an import keeps the checkpoint's linear gates (linear) or "
            "retrofits a recurrent router with the same logits at the start (recurrent); for "
            "another router, start from a dense model with rmoe upcycle"
        )
    bad = sorted(set(router_kwargs) - TRAINING_SETTINGS) if router == "linear" else []
    if bad:
        raise ValueError(
            f"{bad} would change the imported linear model; only {sorted(TRAINING_SETTINGS)} "
            "can be set (router settings go with --router recurrent)"
        )


def retrofit(
    model: torch.nn.Module, router_kwargs: Mapping[str, Any], seed: int = 0
) -> torch.nn.Module:
    """`rmoe.training.surgery.retrofit_recurrent` (its new recurrent stage seeded with
    `seed`): a recurrent router whose logits at the start equal the linear gates'."""
    try:
        from ..training.surgery import retrofit_recurrent
    except ImportError:
        raise ValueError(
            "--router recurrent needs rmoe.training.surgery.retrofit_recurrent, which this rmoe "
            "version does not have"
        ) from None
    if model.config.router_type != "linear":
        raise ValueError(
            f"--router recurrent retrofits a linear-router model; this one has router_type "
            f"{model.config.router_type!r}"
        )
    return retrofit_recurrent(model, seed=seed, **dict(router_kwargs)).eval()


def _import_hf(
    src: Path, family: Family, raw: dict[str, Any], dtype: torch.dtype | None, settings: dict
) -> tuple[torch.nn.Module, list[str]]:
    from ..config import RMoEConfig

    config = hf_config(src, family)
    kw, notes = rmoe_settings(family, config, raw)
    plan = plan_from_hf(family, config)
    with Checkpoint(src) as ckpt:
        plan, dropped = drop_zero_options(ckpt, family, plan, kw)
        kw = check_options({**kw, **settings}, family.name)
        state = read_state(ckpt, family, plan)
    model = build_model(RMoEConfig(**kw), state, dtype)
    return model, notes + dropped


def import_checkpoint(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    router: str = "linear",
    dtype: str | torch.dtype | None = None,
    force: bool = False,
    seed: int = 0,
    **router_kwargs: Any,
) -> ImportResult:
    """Import a Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE checkpoint folder (or retrofit an rmoe
    one) into an rmoe model folder `out_dir` (written atomically).

    Args:
        hf_dir: a transformers checkpoint folder (config.json + safetensors + tokenizer), or,
            with ``router="recurrent"``, an rmoe run or model directory with a linear router.
        out_dir: the destination (must not exist or be empty, unless `force`).
        router: ``linear`` (the checkpoint's gates) or ``recurrent`` (retrofit).
        dtype: the weights' dtype (a name or torch dtype); None = as stored.
        force: replace a non-empty `out_dir`.
        seed: the initialisation of a retrofitted recurrent stage.
        router_kwargs: rmoe settings: for ``recurrent``, the recurrent stage's (router_dim,
            router_cell, ..., `rmoe.training.surgery.RETROFIT_KEYS`); any of
            `TRAINING_SETTINGS` for either router.

    Raises:
        ValueError: what rmoe cannot represent, named; FileNotFoundError: no checkpoint.
    """
    from ..runtime import resolve_dtype

    check_router_kwargs(router, router_kwargs)
    torch_dtype = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    src = Path(hf_dir).expanduser()
    if not src.exists():
        read_config_json(src)  # raises FileNotFoundError with the fix
    raw = read_config_json(src) if (src / "config.json").is_file() else {"model_type": "rmoe"}
    settings = {k: v for k, v in router_kwargs.items() if k in TRAINING_SETTINGS}
    recurrent = {k: v for k, v in router_kwargs.items() if k not in TRAINING_SETTINGS}
    if raw.get("model_type") == "rmoe":
        model, tokenizer, notes = _load_rmoe(src, router, torch_dtype, settings)
        source, extra = "rmoe", None
    else:
        family = hf_family(raw, FAMILIES, "import")
        model, notes = _import_hf(src, family, raw, torch_dtype, settings)
        source, tokenizer = family.name, None

        def extra(tmp: Path) -> list[str]:
            copy_generation_config(src, tmp)
            return copy_tokenizer(src, tmp, model.config)

    if router == "recurrent":
        model = retrofit(model, recurrent, seed)
    notes += save_model(model, out_dir, force, tokenizer=tokenizer, extra=extra)
    out = Path(out_dir).expanduser()
    files = sorted(p.name for p in out.iterdir())
    return ImportResult(out, source, model.config.router_type, model.config, files, notes)


def _load_rmoe(
    src: Path, router: str, dtype: torch.dtype | None, settings: Mapping[str, Any]
) -> tuple[torch.nn.Module, Any, list[str]]:
    """(model with `settings` applied, tokenizer or None, notes) of an rmoe run or model
    directory, which an import can only retrofit (``router`` recurrent)."""
    from ..config import RMoEConfig
    from ..loading import load_model

    if router != "recurrent":
        raise ValueError(
            f"{str(src)!r} is already an rmoe model; importing it means retrofitting a router: "
            "pass --router recurrent"
        )
    loaded = load_model(src, device="cpu", dtype=dtype, missing_tokenizer="bytes")
    old = loaded.model.config
    kw = {n: getattr(old, n) for n in rmoe_options() if hasattr(old, n)}
    model = build_model(RMoEConfig(**{**kw, **settings}), loaded.model.state_dict(), dtype)
    tokenizer = None if loaded.tokenizer_fallback else loaded.tokenizer
    return model, tokenizer, list(loaded.notes)
