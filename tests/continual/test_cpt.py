"""Continual pre-training strategies (rmoe.continual.cpt) and stability-gap reports (gap)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rmoe.continual.cpt import (
    CPTOptions,
    chunk_documents,
    materialize_corpus,
    prepare_continual_pretraining,
)
from rmoe.continual.gap import (
    compare_gap_reports,
    corpus_labels,
    curve_mean,
    gap_report,
    max_rebound,
    read_eval_curves,
    write_gap_report,
)
from rmoe.continual.selection import (
    ngram_scores,
    perplexity_scores,
    reference_texts,
    tfidf_scores,
)
from rmoe.data import get_corpus
from rmoe.training.config import from_dict

PYTHON_DOCS = [
    "The list type is a mutable sequence; append adds an item and sort orders the list in place.",
    "A dictionary maps keys to values; the keys method returns a view of the dictionary keys.",
    "Strings are immutable sequences of Unicode code points; the split method returns a list.",
    "A function definition binds the function name to a function object; return gives a value.",
    "Exceptions are raised with raise and handled with try and except clauses in Python code.",
    "Iterators implement the next method; a for loop calls iter on the sequence it traverses.",
]
COOKING_DOCS = [
    "Whisk the eggs with sugar until pale, then fold in the flour and bake for twenty minutes.",
    "Simmer the tomatoes with garlic and olive oil; season the sauce with basil and pepper.",
    "Knead the bread dough for ten minutes, let it rise, then shape the loaves and bake them.",
    "Roast the chicken with lemon and thyme until golden, basting with butter every so often.",
    "Chop the onions finely and fry them slowly in butter until soft and sweet and brown.",
    "Serve the soup hot with crusty bread and a sprinkle of fresh parsley and grated cheese.",
]
REFERENCE = [
    "The sort method of a list sorts the items; a dictionary lookup uses the keys; the string "
    "split method returns a list of words; raise an exception, handle it with except; a "
    "function returns a value to its caller; iterate over a sequence with a for loop."
]


def test_chunk_documents_respects_the_limit_and_keeps_text():
    doc = "para one line\nmore\n\n" + "x" * 250 + "\n\nshort\n\nend"
    chunks = chunk_documents([doc, ""], 100)
    assert all(len(c) <= 100 for c in chunks)
    assert "".join(c.replace("\n", "") for c in chunks) == doc.replace("\n", "")
    assert chunk_documents(["a", "", "b"], 0) == ["a", "b"]


@pytest.mark.parametrize("scorer", [tfidf_scores, ngram_scores])
def test_relevance_selection_picks_the_relevant_documents(scorer):
    pool = [d for pair in zip(COOKING_DOCS, PYTHON_DOCS) for d in pair]  # interleaved
    scores = scorer(pool, REFERENCE)
    top = {pool[i] for i in np.argsort(-scores)[: len(PYTHON_DOCS)]}
    assert top == set(PYTHON_DOCS)


def test_reference_texts_builtin_docstrings():
    docs = reference_texts("builtin:docstrings")
    assert len(docs) > 50 and any("str(object" in d or "Return" in d for d in docs)


def test_perplexity_scores_are_minus_the_mean_token_loss(tokenizer):
    import torch
    import torch.nn.functional as F

    from .conftest import make_model

    model = make_model(tokenizer).eval()
    docs = ["hello world", "abc"]
    scores = perplexity_scores(model, tokenizer, docs, seq_len=8)
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode("abc")]])
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits
    manual = F.cross_entropy(logits[0], ids[0, 1:]).item()
    assert scores[1] == pytest.approx(-manual, abs=1e-5)


def test_materialized_corpus_has_the_intended_splits_in_order(tmp_path):
    splits = {"train": [f"train doc {i}" for i in range(30)], "valid": ["v1", "v2"], "test": ["t"]}
    out = materialize_corpus(tmp_path / "derived", splits)
    corpus = get_corpus(f"text:{out}")
    for split, docs in splits.items():
        assert corpus.documents(split) == docs


def _domain_dir(tmp_path):
    """A new-domain text directory: prose documents of known sizes, split by file name hash."""
    root = tmp_path / "new"
    root.mkdir()
    rng = np.random.default_rng(0)
    words = "python list dict string method value key sequence object function".split()
    for i in range(120):
        text = " ".join(rng.choice(words, size=int(rng.integers(20, 60))))
        (root / f"doc{i:03d}.txt").write_text(text)
    return root


def _cfg(tmp_path, corpus, **train):
    raw = {
        "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        "data": {
            "corpus": corpus,
            "seq_len": 32,
            "batch_size": 4,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"max_steps": 50, **train},
    }
    return from_dict(raw)


def test_subset_size_and_epochs_set_the_steps(tmp_path):
    root = _domain_dir(tmp_path)
    cfg = _cfg(tmp_path, f"text:{root}")
    opts = CPTOptions(subset_tokens=2000, epochs=3, seed=1)
    cfg, manifest = prepare_continual_pretraining(cfg, tmp_path / "run", None, opts)
    pool = get_corpus(f"text:{root}").documents("train")
    biggest = max(len(d) + 1 for d in pool)
    assert abs(manifest["selected_tokens"] - 2000) <= biggest
    assert manifest["selected_documents"] < len(pool)
    assert cfg.train.max_steps == int(np.ceil(3 * manifest["selected_tokens"] / (4 * 32)))
    epochs = manifest["epochs_over_derived_data"]
    assert 3 <= epochs < 3 + 4 * 32 / manifest["selected_tokens"] + 1e-9  # one step of rounding
    derived = get_corpus(cfg.data.corpus)
    assert sum(len(d) + 1 for d in derived.documents("train")) == manifest["selected_tokens"]
    assert derived.documents("valid") == get_corpus(f"text:{root}").documents("valid")
    assert json.loads((tmp_path / "run" / "cpt_manifest.json").read_text()) == manifest
    assert cfg.train.eval_log_points == 16  # dense evaluation at the start by default
    # the same options again reuse the materialised data; different ones rebuild (new run)
    again, m2 = prepare_continual_pretraining(
        _cfg(tmp_path, f"text:{root}"), tmp_path / "run", None, opts
    )
    assert m2 == manifest
    with pytest.raises(ValueError, match="--resume with different"):
        prepare_continual_pretraining(
            _cfg(tmp_path, f"text:{root}"),
            tmp_path / "run",
            None,
            CPTOptions(subset_tokens=999),
            resume=True,
        )


def test_relevance_selection_in_prepare(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    for i, d in enumerate(PYTHON_DOCS + COOKING_DOCS):
        for k in range(4):
            (root / f"{i}-{k}.txt").write_text(d)
    ref = tmp_path / "ref.txt"
    ref.write_text(REFERENCE[0])
    cfg = _cfg(tmp_path, f"text:{root}")
    opts = CPTOptions(select="relevance", select_top=0.5, reference=str(ref))
    cfg, manifest = prepare_continual_pretraining(cfg, tmp_path / "run", None, opts)
    kept = get_corpus(cfg.data.corpus).documents("train")
    assert kept and all(d in PYTHON_DOCS for d in kept)
    assert manifest["strategy"]["select"] == "relevance"


def test_replay_ratio(tmp_path):
    root = _domain_dir(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    for i in range(60):
        (old / f"code{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    cfg = _cfg(tmp_path, f"text:{root}")
    opts = CPTOptions(replay=f"text:{old}", replay_ratio=0.3, chunk_chars=200)
    cfg, manifest = prepare_continual_pretraining(cfg, tmp_path / "run", None, opts)
    assert manifest["replay_share"] == pytest.approx(0.3, abs=0.02)
    assert f"text:{old}" in cfg.data.extra_eval  # the old domain is evaluated too
    docs = get_corpus(cfg.data.corpus).documents("train")
    replayed = sum(len(d) + 1 for d in docs if "def f" in d or "return x" in d)
    assert replayed == manifest["replay_tokens"]


def test_option_errors():
    with pytest.raises(ValueError, match="select-reference"):
        CPTOptions(select="relevance", select_top=0.5).validate()
    with pytest.raises(ValueError, match="needs --select-top"):
        CPTOptions(select="perplexity").validate()
    with pytest.raises(ValueError, match="--replay-ratio"):
        CPTOptions(replay="python-stdlib").validate()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CPTOptions(replay="x", replay_ratio=1.0).validate()


# ---------------------------------------------------------------------------------- gap
def _write_metrics(run, curves, manifest=None):
    run.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 1, "loss": 3.0}]
    for corpus, values in curves.items():
        for step, v in values:
            lines.append({"step": step, "split": "valid", "corpus": corpus, "valid_loss": v})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if manifest:
        (run / "cpt_manifest.json").write_text(json.dumps(manifest))


def test_gap_from_a_runs_metrics(tmp_path):
    run = tmp_path / "run"
    new = [(0, 2.0), (1, 2.3), (3, 2.5), (10, 2.1), (30, 1.9), (100, 1.5)]
    old = [(0, 1.0), (1, 1.2), (3, 1.4), (10, 1.3), (30, 1.35), (100, 1.3)]
    _write_metrics(
        run,
        {"text:/d": new, "python-stdlib": old},
        {"derived_corpus": "text:/d", "new_corpus": "pydoc-topics", "old_corpus": "python-stdlib"},
    )
    assert corpus_labels(run) == {"text:/d": "new", "pydoc-topics": "new", "python-stdlib": "old"}
    curves = read_eval_curves(run)
    assert curves["text:/d"] == ([0, 1, 3, 10, 30, 100], [v for _, v in new])
    rep = gap_report(run)
    n, o = rep["curves"]["new"], rep["curves"]["old"]
    assert n["dip_depth"] == pytest.approx(0.5) and n["worst_step"] == 3
    assert n["recovery_step"] == 30 and n["steps_to_recover"] == 30
    assert n["final_value"] == 1.5 and n["best_value"] == 1.5
    assert n["recovered_share"] == pytest.approx(1.0 / 0.5)
    assert o["dip_depth"] == pytest.approx(0.4) and o["recovery_step"] is None
    assert o["rebound"] == pytest.approx(0.4)
    assert n["mean_loss"] == pytest.approx(curve_mean([s for s, _ in new], [v for _, v in new]))
    paths = write_gap_report(run)
    assert json.loads(paths["json"].read_text())["curves"]["new"]["dip_depth"] == pytest.approx(0.5)
    md = paths["markdown"].read_text()
    assert "| run | new |" in md and "never" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    run2 = tmp_path / "run2"
    _write_metrics(
        run2,
        {"text:/d": new[:3] + [(10, 1.9), (100, 1.4)]},
        {"derived_corpus": "text:/d", "new_corpus": "x", "old_corpus": None},
    )
    cmp = compare_gap_reports([run, run2], tmp_path / "cmp", names=["a", "b"])
    assert "| b | new |" in cmp["markdown"].read_text()


def test_gap_helpers_and_errors(tmp_path):
    assert max_rebound([0, 1, 2, 3], [3.0, 2.0, 2.5, 1.0]) == (0.5, 2.0)
    assert max_rebound([0, 1], [2.0, 1.0]) == (0.0, 0.0)
    assert curve_mean([0, 2], [1.0, 3.0]) == pytest.approx(2.0)
    assert curve_mean([5], [1.5]) == 1.5
    run = tmp_path / "r"
    run.mkdir()
    with pytest.raises(FileNotFoundError):
        read_eval_curves(run)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(ValueError, match="eval_log_points"):
        read_eval_curves(run)


def test_gap_refuses_a_run_without_a_gap_curve(tmp_path):
    """A plain run (evaluated only at the end, or never at step 0) is not a stability-gap run:
    one line saying how to train one, no report written."""
    run = tmp_path / "plain"
    _write_metrics(run, {"python-stdlib": [(200, 2.0), (400, 1.8), (600, 1.7)]})
    with pytest.raises(ValueError, match=r"not a continual-pre-training run.*\[200, 400, 600\]"):
        write_gap_report(run, tmp_path / "out")
    assert not (tmp_path / "out" / "gap.json").exists()
    _write_metrics(run, {"python-stdlib": [(0, 2.0), (600, 1.7)]})
    with pytest.raises(ValueError, match="--init-from BASE"):
        gap_report(run)


def test_cpt_demo_continues_a_base_of_another_shape(tmp_path):
    """`cpt-demo --base RUN` continues the base as it is: its width and context, not the
    demo's defaults (a base of another width used to fail with a size-mismatch traceback)."""
    import pydoc_data.topics

    from rmoe.config import RMoEConfig
    from rmoe.continual.demo import CPTDemoSettings, run_cpt_demo
    from rmoe.training.config import from_dict
    from rmoe.training.trainer import train

    corpus = tmp_path / "code.txt"
    corpus.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:40])[:40_000])
    raw = {
        "model": dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                      moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                      router_type="recurrent", router_dim=8, max_position_embeddings=32),
        "data": dict(corpus=f"text:{corpus}", seq_len=32, batch_size=2,
                     cache_dir=str(tmp_path / "cache")),
        "train": dict(max_steps=2, eval_batches=1, threads=1),
    }  # fmt: skip
    train(from_dict(raw), tmp_path / "base", progress=False)
    settings = CPTDemoSettings(steps=2, warmup_steps=1, eval_log_points=2, chunk_chars=400)
    paths = run_cpt_demo(tmp_path / "demo", settings, arms=["full"], base=tmp_path / "base")
    assert paths["markdown"].is_file()
    cfg = RMoEConfig.from_pretrained(tmp_path / "demo" / "full")
    assert (cfg.hidden_size, cfg.max_position_embeddings) == (24, 32)
