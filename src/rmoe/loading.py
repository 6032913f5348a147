"""The one model loader: a run directory or a saved model directory -> model, tokenizer, run config.

Every command that reads a model (``rmoe eval``, ``generate``, ``analyze``, ``finetune``, the
continual harness, the experiment evaluator, ``train --init-from``) goes through
:func:`load_model`, so they agree on which folder holds the model and which tokenizer goes with it.

Where the model is (:func:`find_model_dir`), in order: the path itself when it holds
``config.json``; ``path/model`` or ``path/final``; else the newest (highest step) ``step-N`` /
``checkpoint-N`` folder with a ``config.json`` directly under ``path`` or under
``path/checkpoints``. A path to a ``config.json`` file means its folder. An rmoe run directory
holds its latest model at the top level, so the run itself is found first.

Which tokenizer (:func:`find_tokenizer`): the nearest ``tokenizer.json`` in the model folder or
one of its parents up to the path given. When there is none, :func:`load_model` raises a
:class:`FileNotFoundError` that names the fix, unless the caller chose ``tokenizer=`` (any spec
:func:`rmoe.data.build_tokenizer` accepts, e.g. ``"bytes"``) or ``missing_tokenizer="bytes"``.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .runtime import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^(?:step|checkpoint)[-_](\d+)$")
MISSING_TOKENIZER = ("error", "bytes")
"""What :func:`load_model` does when no tokenizer.json is found: raise, or use the byte one."""


@dataclass
class Loaded:
    """A loaded model and what came with it.

    Attributes:
        model: the model, in eval mode, on the requested device.
        tokenizer: an :class:`rmoe.data.Tokenizer`.
        run_config: the run's ``config.yaml`` as a dict (rmoe training runs), else None.
        model_dir: the folder the weights were read from.
        tokenizer_dir: the folder the tokenizer was read from (None: given or byte fallback).
        tokenizer_fallback: True when no tokenizer.json was found and the byte tokenizer is used.
    """

    model: torch.nn.Module
    tokenizer: Any
    run_config: dict[str, Any] | None
    model_dir: Path
    tokenizer_dir: Path | None = None
    tokenizer_fallback: bool = False
    notes: list[str] = field(default_factory=list)

    def __iter__(self):
        """``model, tokenizer, run_config = load_model(...)`` unpacks the three main parts."""
        return iter((self.model, self.tokenizer, self.run_config))


def find_model_dir(path: str | Path, verify: bool = False) -> Path:
    """The directory holding ``config.json`` for a model path or a run (rules in the module doc);
    with ``verify``, checked by :func:`check_integrity` before it is returned.

    Raises:
        FileNotFoundError: the path does not exist, is another file, or holds no model.
        ValueError: ``verify`` and the directory is damaged (one line).
    """
    found = _find_model_dir(path)
    if verify:
        check_integrity(found)
    return found


def _find_model_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist; give a model directory with config.json "
            "or an rmoe run directory"
        )
    if p.is_file():
        if p.name == "config.json":
            return p.parent
        raise FileNotFoundError(f"{str(path)!r} is a file; give the model directory instead")
    if (p / "config.json").is_file():
        return p
    for name in ("model", "final"):
        if (p / name / "config.json").is_file():
            return p / name
    steps: list[tuple[int, float, Path]] = []
    for parent in (p, p / "checkpoints"):
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "config.json").is_file():
                steps.append((int(m.group(1)), child.stat().st_mtime, child))
    if steps:
        return max(steps)[2]
    raise FileNotFoundError(
        f"no config.json in {str(p)!r} nor in its model/, final/, step-N/, checkpoint-N/ or "
        "checkpoints/step-N/ folders; give the directory that holds config.json"
    )


def find_tokenizer(model_dir: Path, given: Path) -> Path | None:
    """The nearest folder with a ``tokenizer.json``: ``model_dir`` or one of its ancestors up
    to ``given`` (the path the user passed, e.g. a run directory), else None."""
    model_dir, given = Path(model_dir).resolve(), Path(given).expanduser().resolve()
    d = model_dir
    while True:
        if (d / "tokenizer.json").is_file():
            return d
        if d == given or d.parent == d or given not in d.parents:
            return None
        d = d.parent


def read_run_config(path: str | Path, model_dir: Path | None = None) -> dict[str, Any] | None:
    """The run's ``config.yaml`` (in ``path`` or ``model_dir``) as a dict, or None."""
    import yaml

    for cand in (Path(path) / "config.yaml", *([model_dir / "config.yaml"] if model_dir else [])):
        if cand.is_file():
            return yaml.safe_load(cand.read_text())
    return None


def check_integrity(model_dir: Path) -> None:
    """Verify a model directory before reading it: against its ``manifest.json`` when it has
    one (rmoe runs and checkpoints), else the headers of its safetensors files.

    Raises:
        ValueError: (:class:`rmoe.training.integrity.IntegrityError`) one line naming the
            damaged file and the newest intact checkpoint of the run.
    """
    from .training.integrity import require_intact

    verdict = require_intact(model_dir)
    if not verdict.verified:
        log.info("%s has no manifest.json; loading it unverified", model_dir)


def _safetensors_error() -> type[BaseException]:
    try:
        from safetensors import SafetensorError

        return SafetensorError
    except ImportError:  # pragma: no cover
        return OSError


def _from_pretrained(model_dir: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    import rmoe  # noqa: F401  (registers the rmoe Auto classes; trust_remote_code is never used)

    check_integrity(model_dir)

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"cannot read the model config in {str(model_dir)!r}: {exc}") from exc
    log.info("loading %s model from %s", config.model_type, model_dir)
    kw = {} if dtype is None else {"dtype": dtype}
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)
    except (OSError, RuntimeError, KeyError, _safetensors_error()) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"could not load a model from {model_dir}: {first}") from exc


def _tokenizer_for(
    path: Path, model_dir: Path, tokenizer: str | None, missing: str
) -> tuple[Any, Path | None, str | None]:
    """(tokenizer, folder it came from, fallback note)."""
    from .data import build_tokenizer

    if tokenizer is not None:
        return build_tokenizer(tokenizer), None, None
    tok_dir = find_tokenizer(model_dir, path)
    if tok_dir is not None:
        return build_tokenizer(str(tok_dir)), tok_dir, None
    if missing == "bytes":
        note = (
            f"no tokenizer.json found in {model_dir} or above it; used the byte tokenizer "
            "(ids 0-255 = bytes, 256 = end of text)"
        )
        log.warning("%s", note)
        return build_tokenizer("bytes"), None, note
    raise FileNotFoundError(
        f"no tokenizer.json in {model_dir} or above it up to {path}; save the tokenizer next to "
        "the model, or name one (--tokenizer PATH, or --tokenizer bytes for byte-level models)"
    )


def load_model(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer: str | None = None,
    missing_tokenizer: str = "error",
) -> Loaded:
    """Load the model of a run or model directory, its tokenizer and its run config.

    Args:
        path: a run directory, a model directory, or a ``config.json`` (see the module doc).
        device: ``auto`` (see :func:`rmoe.runtime.resolve_device`) or a device name.
        dtype: weight dtype (``auto`` = bf16 on CUDA else float32, a name, a torch dtype), or
            None to load the weights as saved.
        tokenizer: a tokenizer spec that overrides the saved one (``bytes``, a tokenizer.json).
        missing_tokenizer: ``error`` (default) raises when no tokenizer.json is found;
            ``bytes`` uses the byte tokenizer and records a note.

    Raises:
        FileNotFoundError: no model or no tokenizer (with the fix).
        ValueError: an unreadable model, or a tokenizer larger than the model's vocabulary.
    """
    if missing_tokenizer not in MISSING_TOKENIZER:
        raise ValueError(f"missing_tokenizer must be one of {MISSING_TOKENIZER}")
    path = Path(path)
    model_dir = find_model_dir(path)
    dev = resolve_device(device)
    model = _from_pretrained(model_dir, None if dtype is None else resolve_dtype(dtype, dev))
    model.to(dev).eval()
    tok, tok_dir, note = _tokenizer_for(path, model_dir, tokenizer, missing_tokenizer)
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab and tok.vocab_size > vocab:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} tokens but the model in {model_dir} has a "
            f"vocabulary of {vocab}; put the model's tokenizer.json next to its config.json"
        )
    return Loaded(
        model=model,
        tokenizer=tok,
        run_config=read_run_config(path, model_dir),
        model_dir=model_dir,
        tokenizer_dir=tok_dir,
        tokenizer_fallback=note is not None,
        notes=[note] if note else [],
    )


_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
    "num_experts", "num_shared_experts", "shared_expert_intermediate_size", "router_dim",
    "first_k_dense", "max_position_embeddings", "router_type",
)  # fmt: skip
"""Config fields named first when saved weights do not fit a model (the ones shapes follow)."""


def config_differences(model: torch.nn.Module, directory: Path) -> list[str]:
    """``"field saved vs here"`` for each size-determining config field where the model saved
    in ``directory`` (its config.json) and ``model`` differ; every differing number when none
    of the usual fields does."""
    import json

    try:
        saved = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    here = model.config.to_dict()
    differ = [k for k in saved if k in here and saved[k] != here[k]]
    named = [k for k in _SHAPE_FIELDS if k in differ]
    if not named:
        named = [k for k in differ if isinstance(saved[k], int) and not isinstance(saved[k], bool)]
    return [f"{k} {saved[k]} vs {here[k]}" for k in named]


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the files; a damaged file becomes one ValueError line."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (OSError, _safetensors_error()) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot read {f}: {first} (a damaged or truncated file)") from exc
    return state


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load every ``*.safetensors`` file in ``directory`` into an already built model (strict
    but for tied embeddings): how training starts from another run (``--init-from``) or resumes.
    The directory is verified first (:func:`check_integrity`).

    Raises:
        FileNotFoundError: no safetensors file in the directory.
        ValueError: a damaged file (named, with the newest intact checkpoint); weights of a
            model with another config (the differing fields, e.g. ``hidden_size 192 vs 64``);
            names that do not fit the model (the first few are listed).
    """
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    check_integrity(directory)
    state = _read_safetensors(files)
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        diffs = config_differences(model, directory)
        if diffs:
            raise ValueError(
                f"the model in {directory} has another shape than this run's: "
                f"{', '.join(diffs)} (saved vs this run); set the same model.* values "
                "(e.g. --set model.<field>=<saved value>) or start from a model of this shape"
            )
        k = wrong[0]
        raise ValueError(
            f"weights in {directory} do not fit the model: {len(wrong)} tensors differ in shape, "
            f"e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)} (saved vs this run)"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        diffs = config_differences(model, directory)
        why = f" (the configs differ: {', '.join(diffs)}, saved vs this run)" if diffs else ""
        raise ValueError(
            f"weights in {directory} do not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}{why}"
        )


def context_limit(config: Any) -> int | None:
    """The longest sequence a model was built for: ``max_position_embeddings``, or None when
    it has none or declares RoPE scaling (then longer inputs are legitimate)."""
    if getattr(config, "rope_scaling", None):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


_TOKEN_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
"""Model keys `rmoe train` takes from the tokenizer, so a run config's model section omits."""


@lru_cache(maxsize=32)
def _read_checkpoint_model(model_dir: str, mtime: float) -> tuple[tuple[str, Any], ...]:
    from .config import RMoEConfig
    from .training.config import model_field_names

    config = RMoEConfig.from_pretrained(model_dir)
    names = [n for n in model_field_names() if n not in _TOKEN_KEYS]
    model = {n: copy.deepcopy(getattr(config, n)) for n in names if hasattr(config, n)}
    model["vocab_size"] = int(config.vocab_size)
    return tuple(model.items())


def checkpoint_model(init_from: str | Path) -> tuple[dict[str, Any], int]:
    """The model section (without vocabulary size and token ids, which `rmoe train` takes from
    the tokenizer) and the vocabulary size of a saved model: what an experiment's `init_from`
    arm or `rmoe continual cpt-demo --base` continues.

    Args:
        init_from: a run directory or a model directory with config.json (relative to the
            working directory), as `rmoe train --init-from` takes.

    Raises:
        FileNotFoundError: no model there (make the checkpoint first, e.g. with `rmoe import`).
    """
    model_dir = find_model_dir(init_from)
    mtime = (model_dir / "config.json").stat().st_mtime
    model = dict(_read_checkpoint_model(str(model_dir.resolve()), mtime))
    vocab = int(model.pop("vocab_size"))
    return copy.deepcopy(model), vocab
