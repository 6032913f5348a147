"""rmoe model folders from checkpoints: reading safetensors, building a model around loaded
tensors, carrying the tokenizer, writing the output folder.

The parts `rmoe import` (:mod:`rmoe.integrations.importing`) and `rmoe upcycle`
(:mod:`rmoe.integrations.upcycle`) share:

* `Checkpoint`: the tensors of a safetensors folder (one file or the shards of
  ``model.safetensors.index.json``), read one at a time; pickles are refused;
* `build_model`: an `rmoe.RMoEForCausalLM` built on the meta device around a state dict (no
  copy of the tensors), the parameters it lacks (a new router) initialised the model's way;
* `copy_tokenizer` / `align_special_tokens`: the checkpoint's tokenizer, readable by
  `rmoe.data.Tokenizer` with the end-of-sequence and padding tokens the config names;
* `save_model`: ``config.json`` + safetensors, ``train.yaml`` (`train_yaml`) and the tokenizer,
  written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from the checkpoint as its tokenizer (those present)."""


class Checkpoint:
    """The tensors of a safetensors checkpoint folder, read one at a time.

    ``model.safetensors.index.json`` (sharded) or the folder's ``*.safetensors`` files. Use as
    a context manager (the files stay open until it exits).

    Raises:
        FileNotFoundError: no safetensors in the folder (pickle checkpoints are refused).
    """

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(
                p.name for ext in ("bin", "pt", "pth") for p in self.directory.glob(f"*.{ext}")
            )
            found = f" (found {pickles[:3]}: pickle files, which can run code when read)"
            raise FileNotFoundError(
                f"no safetensors weights in {str(self.directory)!r}{found if pickles else ''}; "
                "rmoe reads model.safetensors or the shards of model.safetensors.index.json "
                "only (convert with transformers: from_pretrained(...).save_pretrained(...))"
            )
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"shard {name} listed in {index.name} is missing")
            try:
                handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as exc:  # safetensors' own error type is not a ValueError
                self._stack.close()
                raise ValueError(f"cannot read {path} as safetensors: {exc}") from None
            self._where.update(dict.fromkeys(handle.keys(), handle))

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def keys(self) -> set[str]:
        """Every tensor name in the checkpoint."""
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` (read from its file now)."""
        return self._where[key].get_tensor(key)


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict.

    Raises:
        FileNotFoundError: no such folder or no config.json in it.
        ValueError: the file is not JSON.
    """
    path = Path(directory).expanduser()
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(
            f"{str(path)!r} {what}; give a checkpoint folder with config.json and safetensors "
            "weights (a transformers save_pretrained folder)"
        )
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {exc}") from None


def rmoe_options() -> frozenset[str]:
    """The settings `rmoe.RMoEConfig` takes (its keyword arguments)."""
    from ..config import RMoEConfig

    params = inspect.signature(RMoEConfig.__init__).parameters
    return frozenset(
        n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    )


def build_model(
    config: Any, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None, seed: int = 0
) -> torch.nn.Module:
    """An `rmoe.RMoEForCausalLM` for `config` holding the tensors of `state` (taken as they
    are, without a copy); the parameters `state` lacks (a new router) get the model's own
    initialisation from a generator seeded with `seed`, buffers zeros. Cast to `dtype`
    (None = the dtype of the embeddings in `state`).

    Raises:
        ValueError: a tensor of `state` that the model has not, or of another shape.
    """
    from ..modeling import RMoEForCausalLM

    with torch.device("meta"):
        model = RMoEForCausalLM(config)
    expected = model.state_dict()
    for key, t in state.items():
        if key not in expected:
            raise ValueError(f"the rmoe model has no tensor {key!r}")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{key}: the checkpoint's shape {tuple(t.shape)} does not match the config's "
                f"{tuple(expected[key].shape)}"
            )
    model.load_state_dict(dict(state), strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    generator = torch.Generator().manual_seed(seed)
    for _, module in model.named_modules():
        if any(t.is_meta for t in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_module(module, torch.nn.init, generator)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    dtype = dtype or state["model.embed_tokens.weight"].dtype
    return model.to(dtype).eval()


def _first_id(value: Any) -> int | None:
    if isinstance(value, list | tuple):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def align_special_tokens(
    directory: Path, eos_id: Any, pad_id: Any, vocab_size: int | None = None
) -> list[str]:
    """Make rmoe's tokenizer loader (`rmoe.data.Tokenizer.load`) pick, in `directory`, the end
    of sequence and padding tokens the model config names (`eos_id`, first of a list;
    `pad_id`): where it would pick another, ``tokenizer_config.json`` gets the config's token.

    Returns:
        notes on what was set, on a tokenizer size other than `vocab_size`, or on why rmoe
        cannot read the tokenizer.
    """
    import tokenizers

    from ..data.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    try:
        current: Tokenizer | None = Tokenizer.load(directory)
    except ValueError:
        current = None
    set_tokens = {}
    for name, wanted in (("eos_token", _first_id(eos_id)), ("pad_token", _first_id(pad_id))):
        have = None if current is None else getattr(current, name.replace("token", "id"))
        token = backend.id_to_token(wanted) if wanted is not None else None
        if token is not None and have != wanted:
            set_tokens[name] = token
    notes = []
    if set_tokens:
        path = directory / "tokenizer_config.json"
        cfg = json.loads(path.read_text()) if path.is_file() else {}
        cfg.update(set_tokens)
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        shown = ", ".join(f"{k}={v!r}" for k, v in set_tokens.items())
        notes.append(f"tokenizer_config.json: set {shown} (the ids config.json names)")
    try:
        size = Tokenizer.load(directory).vocab_size
    except ValueError as exc:
        notes.append(f"rmoe cannot use this tokenizer ({exc}); pass --tokenizer to rmoe commands")
        return notes
    if vocab_size is not None and size != vocab_size:
        notes.append(
            f"the tokenizer has {size} tokens and the model's vocabulary {vocab_size} rows: "
            + (
                "rmoe commands refuse a tokenizer larger than the model"
                if size > vocab_size
                else "a padded embedding: rmoe commands use the model's vocabulary (the extra "
                "rows are never produced by the tokenizer)"
            )
        )
    return notes


def copy_tokenizer(src: Path, dst: Path, config: Any) -> list[str]:
    """Copy the tokenizer files of `src` into `dst` (a tokenizer.json is made with
    transformers' fast conversion when `src` has none) and `align_special_tokens` to the
    model `config` (its eos / pad token ids and vocabulary size)."""
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    if not copied:
        return [f"no tokenizer files in {src}: none written (rmoe commands then need --tokenizer)"]
    notes = []
    if not (dst / "tokenizer.json").is_file():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src))
            tok.backend_tokenizer.save(str(dst / "tokenizer.json"))
            notes.append("tokenizer.json made from the slow tokenizer files (fast conversion)")
        except Exception as exc:  # noqa: BLE001 - any conversion failure is a note, not a stop
            return [f"rmoe needs a tokenizer.json and the conversion failed ({exc})"]
    ids = config.eos_token_id, config.pad_token_id, config.vocab_size
    return notes + align_special_tokens(dst, *ids)


def train_yaml(config: Any) -> str:
    """A training config (YAML) whose model section is `config` (without the vocabulary size
    and token ids, which ``rmoe train`` takes from the tokenizer)."""
    import yaml

    skip = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"}
    model = {n: getattr(config, n) for n in sorted(rmoe_options() - skip) if hasattr(config, n)}
    head = (
        "# The architecture of the model in this folder, as an rmoe training config:\n"
        "#   rmoe train THIS_FOLDER/train.yaml --init-from THIS_FOLDER --out RUN \\\n"
        "#       --set data.corpus=... --set train.max_steps=...\n"
    )
    return head + yaml.safe_dump({"model": model}, sort_keys=False)


def save_model(
    model: torch.nn.Module,
    out: str | Path,
    force: bool,
    tokenizer: Any | None = None,
    extra: Any | None = None,
) -> list[str]:
    """Write `model` (save_pretrained), ``train.yaml``, the tokenizer (an `rmoe.data.Tokenizer`
    to save, or None) and whatever `extra(tmp)` writes, atomically into `out`.

    Returns:
        the notes `extra` returns (a list, or None)."""
    from .export import write_atomically

    notes: list[str] = []

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "train.yaml").write_text(train_yaml(model.config))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if extra is not None:
            notes.extend(extra(tmp) or [])

    write_atomically(Path(out).expanduser(), force, write)
    return notes


def copy_generation_config(src: Path, dst: Path) -> None:
    """Copy ``generation_config.json`` (generation defaults, end-of-sequence ids) when `src`
    has one."""
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", dst / "generation_config.json")
