"""Continual pre-training strategies as a derived corpus (Guo et al., arXiv 2406.14833).

The paper's three remedies for the stability gap -- a properly sized subset trained for several
epochs, a high-quality / domain-relevant subset, and a data mixture resembling the original
pre-training data -- are all choices of *what text* the continued run sees. Here each is
materialised once, before training, as a text directory under the run directory
(``<run>/cpt_data/{train,valid,test}/*.txt``, described by ``<run>/cpt_manifest.json``), and the run's
``data.corpus`` is pointed at it (``text:<run>/cpt_data``), so the trainer is unchanged:

- ``subset_tokens=N`` (with ``epochs=K``): a seeded random subset of the new domain's training
  documents of about ``N`` tokens; with ``epochs`` the run's ``train.max_steps`` becomes
  ``ceil(K * tokens / (batch_size * seq_len))``.
- ``select="relevance"``: rank the documents by similarity to a *reference sample* of the target
  domain and keep the best (``select_top=F``: a share ``F`` of the pool's tokens, or
  ``subset_tokens``). Scorers: ``tfidf`` (cosine of a document's TF-IDF vector with the mean of
  the reference documents' vectors; IDF from the pool) and ``ngram`` (Moore-Lewis cross-entropy
  difference under bag-of-character-trigram models of the reference and of the pool, per
  character; higher = more reference-like).
- ``select="perplexity"``: keep the documents with the lowest per-token loss under the starting
  model (``init_from``): the text closest to what the model already knows, i.e. the smallest
  distribution shift. ``select="random"`` is the control with the same size.
- ``replay=CORPUS, replay_ratio=R``: add documents from ``CORPUS``'s training split (the original
  pre-training data) until they are a share ``R`` of the training tokens.

``chunk_chars=C`` first cuts every document into pieces of at most about ``C`` characters at
paragraph (then line) boundaries, so that selection and the replay ratio are finer than whole
documents (replay documents are always cut, at ``C`` or 4096 characters).

The derived corpus's valid and test splits are exactly the new domain's valid and test documents,
in their order, so the run's main evaluation is the new domain; the old domain (the starting
run's corpus, or ``old_corpus``) is added to ``data.extra_eval``; and, unless the config already
asks for evaluations, ``train.eval_log_points`` is set so that evaluation is dense at the start.
:mod:`rmoe.continual.gap` turns the resulting ``metrics.jsonl`` into stability-gap statistics.

File names are chosen so that :func:`rmoe.data.split_of` of each relative path is the intended
split (a counter suffix is tried until the hash agrees), with a zero-padded index first so the
sorted order is the intended order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rmoe.continual.selection import (
    SCORERS,
    ngram_scores,
    perplexity_scores,
    reference_texts,
    tfidf_scores,
)

log = logging.getLogger(__name__)

__all__ = [
    "SELECTIONS",
    "CPTOptions",
    "chunk_documents",
    "materialize_corpus",
    "prepare_continual_pretraining",
]

SELECTIONS: tuple[str, ...] = ("random", "relevance", "perplexity")
MANIFEST = "cpt_manifest.json"
DATA_DIR = "cpt_data"


@dataclass
class CPTOptions:
    """Continual pre-training strategy options (see the module docstring).

    Attributes:
        subset_tokens: keep about this many tokens of the new domain (None = all, or
            ``select_top``).
        epochs: passes over the derived training data; sets ``train.max_steps``.
        select: ``random``, ``relevance`` or ``perplexity`` (None: random when a size is set).
        select_top: share of the pool's tokens kept by ``select``.
        scorer: ``tfidf`` or ``ngram`` for ``relevance``.
        reference: the reference sample for ``relevance``: a corpus spec (its train split),
            a text file, or ``builtin:docstrings`` (docstrings of Python's builtins).
        chunk_chars: cut documents into pieces of at most this many characters (0 = whole).
        replay: corpus spec of the original domain to mix back in.
        replay_ratio: share of training tokens from ``replay``, in [0, 1).
        old_corpus: the original domain evaluated during training (default: the starting
            run's corpus, else ``replay``).
        eval_log_points: log-spaced evaluations set when the config asks for none.
        seed: subset sampling and replay sampling.
    """

    subset_tokens: int | None = None
    epochs: float | None = None
    select: str | None = None
    select_top: float | None = None
    scorer: str = "tfidf"
    reference: str | None = None
    chunk_chars: int = 0
    replay: str | None = None
    replay_ratio: float = 0.0
    old_corpus: str | None = None
    eval_log_points: int = 16
    seed: int = 0

    def active(self) -> bool:
        """Whether any strategy is requested."""
        return any(
            [
                self.subset_tokens is not None,
                self.epochs is not None,
                self.select is not None,
                self.select_top is not None,
                self.replay is not None,
                self.chunk_chars > 0,
            ]
        )

    def validate(self) -> None:
        """Raise ValueError on inconsistent options."""
        if self.subset_tokens is not None and self.subset_tokens < 1:
            raise ValueError(f"--subset-tokens must be >= 1, got {self.subset_tokens}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        if self.select is not None and self.select not in SELECTIONS:
            raise ValueError(
                f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}"
            )
        if self.select_top is not None and not 0 < self.select_top <= 1:
            raise ValueError(
                f"--select-top is a share of the pool in (0, 1], got {self.select_top}"
            )
        if self.select is not None and self.select != "random":
            if self.select_top is None and self.subset_tokens is None:
                raise ValueError(
                    f"--select {self.select} needs --select-top F (share of tokens kept) or "
                    "--subset-tokens N"
                )
        if self.select_top is not None and self.select is None:
            raise ValueError("--select-top needs --select random|relevance|perplexity")
        if self.scorer not in SCORERS:
            raise ValueError(
                f"--select-scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}"
            )
        if self.select == "relevance" and not self.reference:
            raise ValueError(
                "--select relevance needs --select-reference: a corpus spec, a text file or "
                "builtin:docstrings (a sample of the target domain to score documents against)"
            )
        if self.chunk_chars < 0:
            raise ValueError(f"--chunk-chars must be >= 0, got {self.chunk_chars}")
        if not 0 <= self.replay_ratio < 1:
            raise ValueError(f"--replay-ratio must be in [0, 1), got {self.replay_ratio}")
        if self.replay_ratio > 0 and not self.replay:
            raise ValueError("--replay-ratio needs --replay CORPUS (the original domain)")
        if self.replay and self.replay_ratio == 0:
            raise ValueError("--replay needs --replay-ratio R in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------
def chunk_documents(documents: Sequence[str], chunk_chars: int) -> list[str]:
    """Cut documents into pieces of at most ``chunk_chars`` characters.

    Paragraphs (blank-line separated) are packed greedily; a paragraph longer than the limit is
    packed line by line, and a longer line is cut. ``chunk_chars=0`` returns the documents.
    """
    if chunk_chars <= 0:
        return [d for d in documents if d]
    out: list[str] = []
    for doc in documents:
        pieces: list[str] = []
        for para in re.split(r"\n\s*\n", doc):
            if len(para) <= chunk_chars:
                pieces.append(para)
                continue
            for line in para.split("\n"):
                while len(line) > chunk_chars:
                    pieces.append(line[:chunk_chars])
                    line = line[chunk_chars:]
                pieces.append(line)
        current = ""
        for piece in pieces:
            joined = f"{current}\n\n{piece}" if current else piece
            if len(joined) <= chunk_chars:
                current = joined
            else:
                if current.strip():
                    out.append(current)
                current = piece
        if current.strip():
            out.append(current)
    return out


# ----------------------------------------------------------------------------------------------
# Materialisation
# ----------------------------------------------------------------------------------------------
def _file_name(split: str, index: int) -> str:
    from rmoe.data import split_of

    for k in range(10_000):
        rel = f"{split}/{index:07d}-{k}.txt"
        if split_of(rel) == split:
            return rel
    raise RuntimeError("no file name hashes into split")  # pragma: no cover - p ~ 0


def materialize_corpus(out_dir: str | Path, splits: dict[str, Sequence[str]]) -> Path:
    """Write documents as ``<out_dir>/<split>/<index>-<k>.txt`` (names hash to their split),
    atomically (a temporary directory renamed into place, replacing an older one).

    Returns:
        ``out_dir``. A ``text:<out_dir>`` corpus then yields exactly these documents per split,
        in order. Nothing else is written into ``out_dir`` (any file there would be a document).
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for split, docs in splits.items():
            (tmp / split).mkdir(parents=True, exist_ok=True)
            for i, doc in enumerate(docs):
                (tmp / _file_name(split, i)).write_text(doc, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _n_tokens(tokenizer: Any, doc: str) -> int:
    if getattr(tokenizer, "is_bytes", False):
        return len(doc.encode("utf-8")) + 1
    return len(tokenizer.encode(doc)) + 1


def _take_until(order: Sequence[int], sizes: Sequence[int], budget: int) -> list[int]:
    """Indices from ``order`` until their sizes reach ``budget`` (the last one may overshoot,
    unless skipping it lands closer)."""
    picked, total = [], 0
    for i in order:
        if total >= budget:
            break
        if total + sizes[i] > budget and (total + sizes[i] - budget) > (budget - total):
            continue
        picked.append(i)
        total += sizes[i]
    return picked


def _tokenizer_dir(init_from: str | Path) -> Path | None:
    from rmoe.loading import find_model_dir

    for cand in (find_model_dir(init_from), Path(init_from)):
        if (cand / "tokenizer.json").is_file():
            return cand.resolve()
    return None


def _init_tokenizer(init_from: str | Path | None, spec: str):
    from rmoe.data import build_tokenizer

    if init_from is not None:
        directory = _tokenizer_dir(init_from)
        if directory is not None:
            return build_tokenizer(str(directory))
    if spec.startswith("bpe:"):
        raise ValueError(
            "continual pre-training with a bpe:N tokenizer needs --init-from a run that saved "
            "its tokenizer (the new run must use the same one)"
        )
    return build_tokenizer(spec)


def _old_corpus(init_from: str | Path | None) -> str | None:
    if init_from is None:
        return None
    import yaml

    for cand in (Path(init_from) / "config.yaml", Path(init_from).parent / "config.yaml"):
        if cand.is_file():
            raw = yaml.safe_load(cand.read_text()) or {}
            return (raw.get("data") or {}).get("corpus")
    return None


def prepare_continual_pretraining(
    cfg: Any,
    run_dir: str | Path,
    init_from: str | Path | None,
    options: CPTOptions,
    resume: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Materialise the strategy's corpus and return ``(updated config, manifest)``.

    ``cfg`` is a :class:`rmoe.training.TrainConfig` whose ``data.corpus`` is the new domain; it
    is changed in place (``data.corpus``, ``data.extra_eval``, maybe ``train.max_steps`` and
    ``train.eval_log_points``) and returned. With ``resume`` an existing derived corpus built
    with the same options is reused; different options raise ValueError.
    """
    options.validate()
    run = Path(run_dir)
    data_dir = (run / DATA_DIR).resolve()
    target = cfg.data.corpus
    if target.startswith("text:") and Path(target[5:]).resolve() == data_dir:
        raise ValueError(
            "data.corpus already points at this run's derived corpus; set data.corpus to the new "
            "domain (e.g. pydoc-topics) when starting continual pre-training"
        )
    tokenizer = _init_tokenizer(init_from, cfg.data.tokenizer)
    start_tokenizer = None if init_from is None else _tokenizer_dir(init_from)
    if cfg.data.tokenizer.startswith("bpe:") and start_tokenizer is not None:
        # the trainer would train a new BPE on the derived corpus: use the starting run's
        cfg.data.tokenizer = str(start_tokenizer)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    old = options.old_corpus or _old_corpus(init_from) or options.replay
    key = {
        "options": options.to_dict(),
        "target": target,
        "text_field": cfg.data.text_field,
        "init_from": None if init_from is None else str(init_from),
        "tokens_per_step": tokens_per_step,
        "max_steps": cfg.train.max_steps,
    }
    manifest_path = run / MANIFEST
    manifest: dict[str, Any] | None = None
    if manifest_path.is_file() and data_dir.is_dir():
        existing = json.loads(manifest_path.read_text())
        if existing.get("key") == key:
            manifest = existing
        elif resume:
            raise ValueError(
                f"--resume with different continual pre-training options than {manifest_path} "
                "was built with; rerun with the original options"
            )
    if manifest is None:
        manifest = _build(cfg, data_dir, init_from, options, tokenizer, target, old, key)
        _write_json(manifest_path, manifest)
    cfg.data.corpus = f"text:{data_dir}"
    if old and old not in cfg.data.extra_eval and old != target:
        cfg.data.extra_eval = [*cfg.data.extra_eval, old]
    if manifest.get("max_steps") is not None:
        cfg.train.max_steps = int(manifest["max_steps"])
    if not cfg.train.eval_log_points and not cfg.train.eval_at:
        cfg.train.eval_log_points = options.eval_log_points
    cfg.validate()
    return cfg, manifest


def _budget(options: CPTOptions, pool_tokens: int) -> int:
    """Tokens of the new domain to keep: ``subset_tokens``, a ``select_top`` share, or all."""
    if options.subset_tokens is not None:
        return int(options.subset_tokens)
    if options.select_top is not None:
        return int(round(options.select_top * pool_tokens))
    return pool_tokens


def _scores(
    select: str | None,
    cfg: Any,
    options: CPTOptions,
    pool: Sequence[str],
    init_from: str | Path | None,
) -> np.ndarray | None:
    """The selection scores of the pool documents (None: random order or no selection)."""
    if select == "relevance":
        ref = reference_texts(options.reference or "", cfg.data.text_field)
        return (tfidf_scores if options.scorer == "tfidf" else ngram_scores)(pool, ref)
    if select == "perplexity":
        if init_from is None:
            raise ValueError(
                "--select perplexity scores documents with the starting model: pass --init-from RUN"
            )
        from rmoe.loading import load_model

        model, tok, _ = load_model(init_from, device="cpu")
        return perplexity_scores(model, tok, pool, seq_len=cfg.data.seq_len)
    return None


def _replay_documents(
    cfg: Any, options: CPTOptions, tokenizer: Any, domain_tokens: int
) -> tuple[list[str], int]:
    """Documents of the replay corpus making ``replay_ratio`` of the training tokens, and their
    token count."""
    from rmoe.data import as_text, get_corpus

    if not options.replay:
        return [], 0
    want = int(round(options.replay_ratio / (1 - options.replay_ratio) * domain_tokens))
    rcorpus = get_corpus(options.replay, text_field=cfg.data.text_field)
    rpool = chunk_documents(
        [as_text(d) for d in rcorpus.documents("train")], options.chunk_chars or 4096
    )
    rsizes = [_n_tokens(tokenizer, d) for d in rpool]
    rorder = list(range(len(rpool)))
    random.Random(options.seed + 1).shuffle(rorder)
    rpicked = _take_until(rorder, rsizes, want)
    return [rpool[i] for i in rpicked], int(sum(rsizes[i] for i in rpicked))


def _build(
    cfg: Any,
    data_dir: Path,
    init_from: str | Path | None,
    options: CPTOptions,
    tokenizer: Any,
    target: str,
    old: str | None,
    key: dict[str, Any],
) -> dict[str, Any]:
    from rmoe.data import as_text, get_corpus

    corpus = get_corpus(target, text_field=cfg.data.text_field)
    pool = chunk_documents([as_text(d) for d in corpus.documents("train")], options.chunk_chars)
    if not pool:
        raise ValueError(f"the new domain {target!r} has no training documents")
    sizes = [_n_tokens(tokenizer, d) for d in pool]
    pool_tokens = int(sum(sizes))
    budget = _budget(options, pool_tokens)
    select = options.select or ("random" if budget < pool_tokens else None)
    scores = _scores(select, cfg, options, pool, init_from)
    rng = random.Random(options.seed)
    if scores is not None:
        order = sorted(range(len(pool)), key=lambda i: (-scores[i], i))
    else:
        order = list(range(len(pool)))
        rng.shuffle(order)
    picked = sorted(_take_until(order, sizes, budget)) if select else list(range(len(pool)))
    train_docs = [pool[i] for i in picked]
    domain_tokens = int(sum(sizes[i] for i in picked))
    replay_docs, replay_tokens = _replay_documents(cfg, options, tokenizer, domain_tokens)
    mixed = train_docs + replay_docs
    random.Random(options.seed + 2).shuffle(mixed)
    total = domain_tokens + replay_tokens
    max_steps = None
    if options.epochs is not None:
        max_steps = max(
            1, math.ceil(options.epochs * total / (cfg.data.batch_size * cfg.data.seq_len))
        )
    steps = max_steps or cfg.train.max_steps
    manifest = {
        "key": key,
        "new_corpus": target,
        "old_corpus": old,
        "derived_corpus": f"text:{data_dir}",
        "strategy": {
            "select": select,
            "scorer": options.scorer if select == "relevance" else None,
            "reference": options.reference if select == "relevance" else None,
            "subset": select is not None,
            "epochs": options.epochs,
            "replay": options.replay,
            "replay_ratio": options.replay_ratio if options.replay else 0.0,
            "chunk_chars": options.chunk_chars,
        },
        "pool_documents": len(pool),
        "pool_tokens": pool_tokens,
        "selected_documents": len(train_docs),
        "selected_tokens": domain_tokens,
        "replay_documents": len(replay_docs),
        "replay_tokens": replay_tokens,
        "replay_share": replay_tokens / total if total else 0.0,
        "train_tokens": total,
        "max_steps": max_steps,
        "token_budget": steps * cfg.data.batch_size * cfg.data.seq_len,
        "epochs_over_derived_data": steps * cfg.data.batch_size * cfg.data.seq_len / max(total, 1),
        "selected_indices": picked if select else None,
        "top_scores": None
        if scores is None
        else [
            {"index": i, "score": float(scores[i]), "start": pool[i][:80]}
            for i in sorted(range(len(pool)), key=lambda i: -scores[i])[:10]
        ],
    }
    valid = [as_text(d) for d in corpus.documents("valid")]
    test = [as_text(d) for d in corpus.documents("test")]
    if not valid:
        raise ValueError(f"the new domain {target!r} has no valid documents to evaluate on")
    materialize_corpus(data_dir, {"train": mixed, "valid": valid, "test": test})
    log.info(
        "continual pre-training data: %d of %d documents (%d tokens), %d replay tokens (%.1f%%)",
        len(train_docs),
        len(pool),
        domain_tokens,
        replay_tokens,
        100 * manifest["replay_share"],
    )
    return manifest
