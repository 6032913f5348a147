"""Write a linear-router rmoe model as a native transformers checkpoint (Mixtral, OLMoE,
Qwen2-MoE, Qwen3-MoE) that loads with the target's own classes, without ``trust_remote_code``.

The names, layouts and config fields come from the tables of
:mod:`rmoe.integrations.families`; this module only walks them rmoe -> HF:

* :func:`check_exportable` refuses what the target cannot represent (a ValueError naming the
  field and what would be needed) and returns notes on training-only settings it drops;
* :func:`hf_config` builds the target's config object;
* :func:`hf_state_dict` maps the rmoe state dict to the target's tensors;
* :func:`export_model` / :func:`export_run` write ``config.json``, ``model.safetensors``,
  ``generation_config.json`` and the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``
  + ``special_tokens_map.json``, loadable by ``AutoTokenizer``) into a temporary folder next
  to the destination, then rename it into place.

In float32 the exported model's logits equal rmoe's to float rounding (about 1e-6; the
tests check 1e-5). In bf16/fp16 they differ by the rounding of a few operations computed in a
different order (RMSNorm casts before multiplying by its weight in transformers, after in rmoe).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .families import (
    LINEAR_ROUTERS,
    ROUTER_KEY,
    TRAINING_ONLY,
    Family,
    Zeros,
    expand,
    get_family,
    plan_from_rmoe,
    unmet_requirement,
)


@dataclass
class ExportResult:
    """What `export_model` wrote.

    Attributes:
        out_dir: the checkpoint folder.
        family: the target family name (``mixtral``, ...).
        model_class: the transformers class that loads it (``MixtralForCausalLM``, ...).
        files: the file names written, sorted.
        notes: settings dropped or adapted on the way (one sentence each).
    """

    out_dir: Path
    family: str
    model_class: str
    files: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def load_snippet(self) -> str:
        """One line of Python that loads the checkpoint."""
        return (
            f"from transformers import {self.model_class}; "
            f'model = {self.model_class}.from_pretrained("{self.out_dir}")'
        )


def check_exportable(config: Any, family: Family | str) -> list[str]:
    """Raise ValueError when `family` cannot represent the rmoe `config` exactly.

    Returns:
        notes on settings that change training only and are not carried (jitter, training
        capacity, GW-MoE, ...), and on router types mapped to plain linear gates.
    """
    family = get_family(family) if isinstance(family, str) else family
    problem = unmet_requirement(family, config)
    if problem is not None:
        raise ValueError(problem)
    notes = []
    for name, (inert, what) in TRAINING_ONLY.items():
        value = getattr(config, name, inert)
        if value != inert:
            notes.append(f"{name}={value!r}: {what}")
    if config.router_type == "random":
        notes.append("router_type 'random': the frozen router becomes an ordinary (trainable) gate")
    if config.router_type == "shared":
        notes.append("router_type 'shared': the one shared router weight is copied into each layer")
    return notes


def hf_config_kwargs(config: Any, family: Family, dtype: torch.dtype | None = None) -> dict:
    """Keyword arguments of the target's config class for the rmoe `config` (fields,
    constants, derived fields; ``dtype`` as the weights' dtype name when given)."""
    kw: dict[str, Any] = {hf: getattr(config, rm) for hf, rm in family.fields.items()}
    kw.update(family.constants)
    kw.update({hf: d.to_hf(config) for hf, d in family.derived.items()})
    if isinstance(kw.get("mlp_only_layers"), list):
        kw["mlp_only_layers"] = list(kw["mlp_only_layers"])
    if dtype is not None:
        kw["dtype"] = str(dtype).removeprefix("torch.")
    return kw


def hf_config(config: Any, family: Family | str, dtype: torch.dtype | None = None):
    """The target's config object (e.g. ``MixtralConfig``) for the rmoe `config`, with
    ``architectures`` set to the target's causal-LM class."""
    import transformers

    family = get_family(family) if isinstance(family, str) else family
    cls = getattr(transformers, family.config_class)
    cfg = cls(**hf_config_kwargs(config, family, dtype))
    cfg.architectures = [family.model_class]
    return cfg


def _canonical_state(state: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The rmoe state dict with every linear-kind router under the per-layer linear router key
    (`ROUTER_KEY`): the shared router's one weight is copied to each MoE layer."""
    state = dict(state)
    shared_key = LINEAR_ROUTERS.get(config.router_type)
    if shared_key is not None:
        weight = state.pop(shared_key)
        for i in config.moe_layer_indices:
            state[ROUTER_KEY.format(i=i)] = weight
    return state


def hf_state_dict(
    state: Mapping[str, torch.Tensor], config: Any, family: Family | str
) -> dict[str, torch.Tensor]:
    """The target's tensors (HF key -> contiguous tensor that owns its memory) for an rmoe
    state dict (`model.state_dict()`), following the family's table.

    Raises:
        ValueError: a tensor the table expects is missing, or the state has tensors the
            table does not map (a model feature the export would silently drop).
    """
    family = get_family(family) if isinstance(family, str) else family
    state = _canonical_state(state, config)
    plan = plan_from_rmoe(config)
    dtype = state["model.embed_tokens.weight"].dtype
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for entry in expand(family, plan):
        if isinstance(entry.layout, Zeros):
            tensors = [entry.layout.zeros(plan.dims, dtype)]
        else:
            if entry.rmoe not in state:
                raise ValueError(f"the rmoe state dict has no {entry.rmoe!r} ({family.name} row)")
            used.add(entry.rmoe)
            tensors = entry.layout.to_hf(state[entry.rmoe].detach(), plan.num_experts)
        for key, t in zip(entry.hf, tensors, strict=True):
            out[key] = t.to("cpu").clone().contiguous()
    if plan.flags["tied"]:
        used.add("lm_head.weight")
    left = sorted(set(state) - used)
    if left:
        raise ValueError(
            f"the {family.name} table does not map these rmoe tensors: {left[:5]}"
            f"{' ...' if len(left) > 5 else ''}; the export would drop them"
        )
    return out


def write_atomically(out: Path, force: bool, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a fresh folder next to `out`, then rename it to `out` (the
    one way `rmoe export`, `import` and `upcycle` write their output folder).

    Raises:
        FileExistsError: `out` is a non-empty folder and not `force`.
        NotADirectoryError: `out` exists and is not a folder.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"--out {str(out)!r} exists and is not empty; choose another folder or pass --force "
            "to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_model(
    model: torch.nn.Module,
    family: Family | str,
    out: str | Path,
    *,
    tokenizer: Any | None = None,
    force: bool = False,
) -> ExportResult:
    """Write `model` (an `rmoe.RMoEForCausalLM`) to `out` as a `family` checkpoint.

    Args:
        model: the rmoe model; its weights are written in their current dtype.
        family: ``mixtral``, ``olmoe``, ``qwen2_moe`` or ``qwen3_moe`` (or a `Family`).
        out: the destination folder (must not exist or be empty, unless `force`).
        tokenizer: an `rmoe.data.Tokenizer` to save with the weights, or None.
        force: replace an existing non-empty `out`.

    Raises:
        ValueError: the target cannot represent the model (see `check_exportable`).
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    family = get_family(family) if isinstance(family, str) else family
    config = model.config
    notes = check_exportable(config, family)
    tensors = hf_state_dict(model.state_dict(), config, family)
    dtype = tensors["model.embed_tokens.weight"].dtype
    cfg = hf_config(config, family, dtype)

    def write(tmp: Path) -> None:
        cfg.save_pretrained(tmp)
        GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)

    out = Path(out).expanduser()
    write_atomically(out, force, write)
    files = sorted(p.name for p in out.iterdir())
    return ExportResult(out, family.name, family.model_class, files, notes + list(family.notes))


def export_run(
    path: str | Path,
    family: Family | str,
    out: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    force: bool = False,
) -> ExportResult:
    """Load a run or saved model with `rmoe.loading.load_model` (on the CPU, in `dtype` or
    as saved) and `export_model` it with its tokenizer (when the run has one)."""
    from ..loading import load_model

    family = get_family(family) if isinstance(family, str) else family
    loaded = load_model(path, device="cpu", dtype=dtype, missing_tokenizer="bytes")
    tokenizer = None if loaded.tokenizer_fallback else loaded.tokenizer
    result = export_model(loaded.model, family, out, tokenizer=tokenizer, force=force)
    if loaded.tokenizer_fallback:
        result.notes.append(f"no tokenizer.json in {loaded.model_dir} or above it: none written")
    return result
