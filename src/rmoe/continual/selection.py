"""Scoring documents for continual pre-training selection (:mod:`rmoe.continual.cpt`).

- :func:`tfidf_scores`: cosine of a document's TF-IDF vector with the centroid of a reference
  sample of the target domain (IDF from the pool).
- :func:`ngram_scores`: Moore-Lewis cross-entropy difference under bag-of-character-trigram
  models of the reference and of the pool, per character.
- :func:`perplexity_scores`: minus the mean per-token loss under the starting model.

Higher is better for all three (more reference-like, or more familiar to the model).
:func:`reference_texts` reads the reference sample.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SCORERS", "ngram_scores", "perplexity_scores", "reference_texts", "tfidf_scores"]

SCORERS: tuple[str, ...] = ("tfidf", "ngram")
"""Relevance scorers (``CPTOptions.scorer``)."""


def reference_texts(spec: str, text_field: str = "text") -> list[str]:
    """Documents of a reference sample: ``builtin:docstrings``, a text file, or a corpus spec
    (its train split)."""
    if spec == "builtin:docstrings":
        import builtins

        docs = []
        for name in sorted(dir(builtins)):
            obj = getattr(builtins, name)
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40 and not name.startswith("_"):
                docs.append(doc)
            for attr in sorted(getattr(obj, "__dict__", {}) if isinstance(obj, type) else {}):
                sub = getattr(obj, attr, None)
                sdoc = getattr(sub, "__doc__", None)
                if not attr.startswith("_") and isinstance(sdoc, str) and len(sdoc) > 40:
                    docs.append(sdoc)
        return sorted(set(docs))
    from rmoe.data import as_text, get_corpus

    path = Path(spec).expanduser()
    if path.is_file() and ":" not in spec.split("/")[0]:
        return [path.read_text(encoding="utf-8", errors="replace")]
    return [as_text(d) for d in get_corpus(spec, text_field=text_field).documents("train")]


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]+")
_STOP = frozenset(
    "the of and to in is it that for on as with by be are this or an at from which not if "
    "was but can all its has have will when then than so such into also may these their".split()
)
"""English function words left out of TF-IDF vectors (they carry no domain signal)."""


def _words(text: str) -> Counter[str]:
    return Counter(w for w in (m.lower() for m in _WORD.findall(text)) if w not in _STOP)


def tfidf_scores(pool: Sequence[str], reference: Sequence[str]) -> np.ndarray:
    """Cosine similarity of each pool document's TF-IDF vector to the reference centroid.

    Words are lower-cased identifiers of 2+ characters minus a short English stop list; IDF is
    ``log((1 + n) / (1 + df)) + 1`` over the pool; term frequency is ``1 + log(count)``;
    vectors are L2-normalised; the centroid is the mean of the reference vectors (IDF of the
    pool). Returns ``[len(pool)]`` float64.
    """
    if not pool or not reference:
        raise ValueError("tfidf scoring needs a non-empty pool and reference sample")
    pool_counts = [_words(d) for d in pool]
    df: Counter[str] = Counter()
    for c in pool_counts:
        df.update(c.keys())
    n = len(pool)

    def vec(counts: Counter[str]) -> dict[str, float]:
        v = {
            w: (1.0 + math.log(c)) * (math.log((1 + n) / (1 + df.get(w, 0))) + 1.0)
            for w, c in counts.items()
        }
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    centroid: Counter[str] = Counter()
    for doc in reference:
        for w, x in vec(_words(doc)).items():
            centroid[w] += x / len(reference)
    cnorm = math.sqrt(sum(x * x for x in centroid.values())) or 1.0
    scores = np.zeros(n)
    for i, counts in enumerate(pool_counts):
        v = vec(counts)
        scores[i] = sum(x * centroid.get(w, 0.0) for w, x in v.items()) / cnorm
    return scores


def _trigrams(text: str) -> Counter[str]:
    t = f"  {text.lower()}"
    return Counter(t[i : i + 3] for i in range(len(t) - 2))


def ngram_scores(pool: Sequence[str], reference: Sequence[str], alpha: float = 0.1) -> np.ndarray:
    """Moore-Lewis score per document: mean over its character trigrams of
    ``log p_ref(g) - log p_pool(g)`` (add-``alpha`` smoothed bag-of-trigram models).

    Higher means more like the reference than like the pool in general. ``[len(pool)]``.
    """
    if not pool or not reference:
        raise ValueError("n-gram scoring needs a non-empty pool and reference sample")
    ref: Counter[str] = Counter()
    for d in reference:
        ref.update(_trigrams(d))
    per_doc = [_trigrams(d) for d in pool]
    general: Counter[str] = Counter()
    for c in per_doc:
        general.update(c)
    vocab = len(set(ref) | set(general)) + 1
    n_ref, n_gen = sum(ref.values()), sum(general.values())
    scores = np.zeros(len(pool))
    for i, counts in enumerate(per_doc):
        total = sum(counts.values()) or 1
        s = 0.0
        for g, c in counts.items():
            lp_ref = math.log((ref.get(g, 0) + alpha) / (n_ref + alpha * vocab))
            lp_gen = math.log((general.get(g, 0) + alpha) / (n_gen + alpha * vocab))
            s += c * (lp_ref - lp_gen)
        scores[i] = s / total
    return scores


def perplexity_scores(
    model: Any,
    tokenizer: Any,
    pool: Sequence[str],
    seq_len: int = 256,
    max_tokens: int = 1024,
    batch_size: int = 16,
) -> np.ndarray:
    """Minus the mean per-token loss of each document (its first ``max_tokens`` tokens) under
    ``model``; higher = more familiar to the model. ``[len(pool)]``."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    model.eval()
    windows: list[tuple[int, list[int]]] = []
    for i, doc in enumerate(pool):
        ids = [tokenizer.eos_id, *list(tokenizer.encode(doc))[:max_tokens]]
        for s in range(0, max(1, len(ids) - 1), seq_len):
            piece = ids[s : s + seq_len + 1]
            if len(piece) >= 2:
                windows.append((i, piece))
    total = np.zeros(len(pool))
    count = np.zeros(len(pool))
    pad = tokenizer.pad_id
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            chunk = windows[b : b + batch_size]
            t = max(len(p) for _, p in chunk)
            ids = torch.full((len(chunk), t), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), t), dtype=torch.long)
            for r, (_, p) in enumerate(chunk):
                ids[r, : len(p)] = torch.tensor(p)
                mask[r, : len(p)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits.float()
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(chunk), -1)
            valid = mask[:, 1:].bool()
            for r, (i, _) in enumerate(chunk):
                total[i] += float(ce[r][valid[r]].sum())
                count[i] += int(valid[r].sum())
    return -(total / np.maximum(count, 1))
