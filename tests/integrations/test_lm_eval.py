"""lm-evaluation-harness integration: the `rmoe` LM against hand computations with the model's
logits, the built-in offline tasks, `rmoe eval --tasks` and `python -m rmoe.lm_eval`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from rmoe import RMoEConfig, RMoEForCausalLM  # noqa: E402
from rmoe.cli.main import main  # noqa: E402
from rmoe.data import build_tokenizer  # noqa: E402
from rmoe.integrations import lm_eval as rl  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """No hub; the built-in tasks' data in this test's folder."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(rl.TASKS_DIR_ENV, str(tmp_path / "lm_eval_tasks"))


@pytest.fixture
def model_dir(tmp_path):
    """A tiny random two-layer recurrent-router model with the byte tokenizer."""
    torch.manual_seed(0)
    config = RMoEConfig(
        vocab_size=258, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, router_dim=8,
        router_type="recurrent", max_position_embeddings=64,
    )  # fmt: skip
    path = tmp_path / "model"
    RMoEForCausalLM(config).save_pretrained(path)
    build_tokenizer("bytes").save(path)
    return path


@pytest.fixture
def lm(model_dir):
    return rl.RMoELM(pretrained=str(model_dir), device="cpu", batch_size=3)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _hand_loglikelihood(model, ids: list[int], m: int) -> tuple[float, bool]:
    """log p of the last m ids given the ones before: one unpadded forward pass."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]]), use_cache=False).logits[0]
    logp = logits.float().log_softmax(-1)[-m:]
    target = torch.tensor(ids[-m:])
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_equals_a_hand_computation_with_the_logits(lm):
    tok, eos = lm.tokenizer, lm.tokenizer.eos_id
    pairs = [
        ("The quick brown", " fox"),
        ("Trailing space moves to the continuation ", "here"),
        ("", "an empty context"),
        ("x" * 100, " a context longer than max_length=64 is cut from the left"),
        ("def f(x):\n    return", " x + 1"),
    ]
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        stripped = ctx.rstrip()
        cont = ctx[len(stripped) :] + cont
        ids = ([eos] + tok.encode(stripped) + tok.encode(cont))[-(lm.max_length + 1) :]
        want_ll, want_greedy = _hand_loglikelihood(lm.model, ids, len(tok.encode(cont)))
        assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
    # no begin-of-text token unless the context is empty
    plain = rl.RMoELM.from_model(lm.model, lm.tokenizer, add_bos_token=False)
    (ll, _), (ll_empty, _) = plain.loglikelihood(_requests("loglikelihood", [pairs[0], pairs[2]]))
    ids = tok.encode(pairs[0][0] + pairs[0][1])
    assert ll == pytest.approx(_hand_loglikelihood(lm.model, ids, 4)[0], abs=1e-4)
    assert ll_empty == pytest.approx(got[2][0], abs=1e-6)


def test_greedy_flag_is_true_for_the_models_own_argmax(lm):
    ids = [lm.tokenizer.eos_id] + lm.tokenizer.encode("abc")
    with torch.no_grad():
        nxt = int(lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
    (_, greedy), (_, not_greedy) = lm.score_sequences(
        [(ids + [nxt], 1), (ids + [(nxt + 1) % 256], 1)]
    )
    assert greedy and not not_greedy
    assert lm.score_sequences([(ids, 0)]) == [(0.0, True)]  # nothing to score


def test_rolling_windows_score_every_token_once_with_the_longest_context(lm):
    short = rl.RMoELM.from_model(lm.model, lm.tokenizer, max_length=4)
    eos = lm.tokenizer.eos_id
    windows = short.rolling_windows(list(range(10)))  # lm_eval's documented example
    assert windows == [([eos, 0, 1, 2, 3], 4), ([3, 4, 5, 6, 7], 4), ([5, 6, 7, 8, 9], 2)]
    text = "Rolling log-likelihood of a short document."
    ids = [eos] + lm.tokenizer.encode(text)
    (whole,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert whole == pytest.approx(_hand_loglikelihood(lm.model, ids, len(ids) - 1)[0], abs=1e-3)
    small = rl.RMoELM.from_model(lm.model, lm.tokenizer, max_length=16)
    (windowed,) = small.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    hand = sum(_hand_loglikelihood(lm.model, s, m)[0] for s, m in small.rolling_windows(ids[1:]))
    assert windowed == pytest.approx(hand, abs=1e-3)


def test_generate_until_is_greedy_and_stops_at_the_stop_strings(lm):
    tok = lm.tokenizer
    contexts = ["def main(", "import os\nimport sys\n", "x"]

    def hand(context: str, n: int) -> str:
        ids, new = [tok.eos_id] + tok.encode(context), []
        for _ in range(n):
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([ids + new]), use_cache=False).logits
            new.append(int(logits[0, -1].argmax()))
        return tok.decode(new, skip_special_tokens=True)

    full = [hand(c, 10) for c in contexts]
    stop = full[0][2]  # a character the first continuation produces after two others
    reqs = _requests(
        "generate_until", [(c, {"until": [stop], "max_gen_toks": 10}) for c in contexts]
    )
    got = lm.generate_until(reqs)
    assert got == [t[: t.index(stop)] if stop in t else t for t in full]
    (unbounded,) = lm.generate_until(
        _requests("generate_until", [(contexts[1], {"max_gen_toks": 10})])
    )
    assert unbounded == full[1]


def test_built_from_a_loaded_model_and_rejects_bad_arguments(model_dir):
    from rmoe.loading import load_model

    loaded = load_model(model_dir, device="cpu")
    assert rl.RMoELM(pretrained=loaded).max_length == 64  # no run config: max_position_embeddings
    assert rl.RMoELM.from_model(loaded.model, "bytes", batch_size="auto").batch_size == 8
    with pytest.raises(ValueError, match="unknown rmoe model argument.*'temperature'"):
        rl.RMoELM(pretrained=loaded, temperature=1.0)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        rl.RMoELM(model=loaded.model)
    with pytest.raises(ValueError, match="pretrained=PATH"):
        rl.RMoELM()


def test_builtin_tasks_are_deterministic_offline_files(tmp_path):
    mc, cloze = rl.multiple_choice_docs(), rl.cloze_docs()
    assert mc == rl.multiple_choice_docs() and cloze == rl.cloze_docs()
    assert len(mc["test"]) >= 300 and len(cloze["test"]) >= 200 and len(mc["train"]) == 32
    paragraphs = rl.pydoc_paragraphs()
    for doc in mc["test"][:50]:
        assert len(set(doc["choices"])) == 4 and 0 <= doc["label"] < 4
        true = doc["context"] + " " + doc["choices"][doc["label"]]
        assert any(t == doc["topic"] and p.startswith(true) for t, p in paragraphs)
    assert all(d["target"].isalpha() for d in cloze["test"])
    folder = rl.builtin_task_dir()
    assert folder.is_relative_to(tmp_path)
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert rl.builtin_task_dir() == folder  # unchanged files are not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    yaml_text = (folder / "rmoe_pydoc_mc.yaml").read_text()
    assert str(folder / "rmoe_pydoc_mc.test.jsonl") in yaml_text


def test_builtin_multiple_choice_accuracy_equals_a_hand_computation(lm):
    res = rl.evaluate_tasks(lm, ["rmoe_pydoc_mc"], limit=8)
    scores = res.by_task()["rmoe_pydoc_mc"]
    docs = rl.multiple_choice_docs()["test"][:8]
    tok, hits, hits_norm = lm.tokenizer, 0, 0
    for doc in docs:
        ctx = [tok.eos_id] + tok.encode(doc["context"])
        lls = []
        for choice in doc["choices"]:
            cont = tok.encode(" " + choice)
            ids = (ctx + cont)[-(lm.max_length + 1) :]
            lls.append(_hand_loglikelihood(lm.model, ids, min(len(cont), len(ids) - 1))[0])
        norm = [ll / len((" " + c).encode()) for ll, c in zip(lls, doc["choices"])]
        hits += max(range(4), key=lls.__getitem__) == doc["label"]
        hits_norm += max(range(4), key=norm.__getitem__) == doc["label"]
    assert scores["acc"] == pytest.approx(hits / 8) and scores["acc_norm"] == pytest.approx(
        hits_norm / 8
    )
    assert scores["acc_stderr"] is not None and res.scores[0].samples == 8
    assert res.settings["limit"] == 8 and res.settings["max_length"] == 64


def test_local_task_folder_through_include_path(lm, tmp_path):
    import yaml

    folder = rl.builtin_task_dir()
    config = yaml.safe_load((folder / "rmoe_pydoc_cloze.yaml").read_text())
    config.update(task="my_local_cloze", tag=[])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_local_cloze.yaml").write_text(yaml.safe_dump(config))
    res = rl.evaluate_tasks(lm, ["my_local_cloze"], include_path=tmp_path / "mine", limit=4)
    metrics = res.by_task()["my_local_cloze"]
    assert 0 <= metrics["acc"] <= 1 and metrics["perplexity"] > 1
    with pytest.raises(FileNotFoundError, match="not a directory"):
        rl.evaluate_tasks(lm, ["my_local_cloze"], include_path=tmp_path / "nowhere")


def test_rmoe_eval_tasks_end_to_end(model_dir, capsys):
    assert (
        main(
            ["eval", str(model_dir), "--tasks", "rmoe_pydoc_mc", "--limit", "8", "--device", "cpu"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "task" in out and "stderr" in out and "acc_norm" in out
    written = model_dir / "lm_eval" / "rmoe_pydoc_mc-limit8.json"
    body = json.loads(written.read_text())
    assert 0 <= body["scores"]["rmoe_pydoc_mc"]["acc"] <= 1
    assert body["settings"]["tasks"] == ["rmoe_pydoc_mc"] and body["lm_eval"]["results"]


def test_rmoe_eval_without_lm_eval_is_one_line(model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", str(model_dir), "--tasks", "rmoe_pydoc_mc"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'rmoe[eval]'" in err


@pytest.mark.slow  # lm_eval's command line indexes all its ~15 000 task YAMLs (10-30 s)
def test_python_m_rmoe_lm_eval_runs_lm_evals_cli(model_dir, lm, tmp_path):
    import yaml

    config = yaml.safe_load((rl.builtin_task_dir() / "rmoe_pydoc_mc.yaml").read_text())
    config.update(task="my_mc", tag=[])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_mc.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "rmoe.lm_eval", "--model", "rmoe", "--model_args",
           f"pretrained={model_dir}", "--tasks", "rmoe_pydoc_mc,my_mc", "--include_path",
           str(tmp_path / "mine"), "--limit", "4", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rmoe_pydoc_mc" in proc.stdout and "my_mc" in proc.stdout and "acc_norm" in proc.stdout
