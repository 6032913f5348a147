"""The continual-learning harness, replay buffer and task loading."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rmoe.continual import continual_metrics
from rmoe.continual.harness import (
    ContinualConfig,
    ReplayBuffer,
    compare_methods,
    parse_method,
    run_sequence,
)
from rmoe.continual.tasks import (
    BUILTIN_TASKS,
    builtin_task,
    classification_example,
    load_task,
    parse_task_spec,
)
from rmoe.data.examples import Example
from rmoe.training.sft import SFTConfig

from .conftest import make_model, write_jsonl


def _cfg(method: str = "plain", steps: int = 4, **kw) -> ContinualConfig:
    return ContinualConfig(
        method=method,
        sft=SFTConfig(steps=steps, batch_size=8, lr=5e-3, device="cpu", max_len=48),
        **kw,
    )


def test_harness_on_two_tasks_writes_matrix_json_md_png(tmp_path, tokenizer, two_tasks):
    tasks = [load_task(str(d)) for d in two_tasks]
    assert [t.name for t in tasks] == ["upper", "rev"]
    model = make_model(tokenizer)
    stages = []
    res = run_sequence(
        model, tokenizer, tasks, _cfg(), tmp_path / "out", on_stage=lambda i, s: stages.append(s)
    )
    a = np.asarray(res.matrix)
    assert a.shape == (2, 2) and len(res.baseline) == 2
    assert ((a >= 0) & (a <= 1)).all()
    m = continual_metrics(a, res.baseline)
    assert res.metrics == m
    assert res.metrics.average_accuracy == pytest.approx(a[-1].mean())
    assert res.metrics.backward_transfer == pytest.approx(a[1, 0] - a[0, 0])
    lm = np.asarray(res.loss_matrix)
    assert res.loss_backward_transfer == pytest.approx(lm[1, 0] - lm[0, 0])
    assert res.loss_average == pytest.approx(lm[1].mean())
    assert [s["task"] for s in stages] == ["upper", "rev"]
    out = tmp_path / "out"
    for name in (
        "accuracy_matrix.json",
        "accuracy_matrix.md",
        "accuracy_matrix.png",
        "answer_loss_matrix.json",
        "result.json",
        "predictions.json",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "accuracy_matrix.json").read_text())
    assert saved["matrix"] == res.matrix and saved["task_names"] == ["upper", "rev"]
    assert saved["metrics"]["forward_transfer"] == res.metrics.forward_transfer
    assert (out / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    losses = json.loads((out / "answer_loss_matrix.json").read_text())
    assert np.asarray(losses["matrix"]).shape == (2, 2)


def test_compare_methods_summary(tmp_path, tokenizer, two_tasks):
    tasks = [load_task(str(d)) for d in two_tasks]

    def load():
        return make_model(tokenizer), tokenizer

    cfg = _cfg(steps=2, replay_size=4, metric="tf_exact_match")
    results = compare_methods(
        load, tasks, ["plain", "migu", "random-mask", "replay"], cfg, tmp_path
    )
    assert set(results) == {"plain", "migu", "random-mask", "replay"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["methods"]) == set(results)
    md = (tmp_path / "summary.md").read_text()
    assert "| migu |" in md and "BWT" in md
    assert (tmp_path / "random-mask" / "accuracy_matrix.png").is_file()
    replay = json.loads((tmp_path / "replay" / "result.json").read_text())
    assert replay["stages"][0]["replayed_examples"] == 0
    assert replay["stages"][1]["replayed_examples"] == 4
    assert replay["stages"][1]["train_examples"] == len(tasks[1].train) + 4
    migu = json.loads((tmp_path / "migu" / "result.json").read_text())
    assert [s["masking"] for s in migu["stages"]] == ["plain", "migu"]  # first task unmasked


def test_stage_configs_follow_the_method():
    cfg = _cfg("migu")
    assert cfg.stage_sft(0).migu_ratio is None and cfg.stage_sft(1).migu_ratio == 0.7
    cfg = _cfg("random-mask", mask_first_task=True, migu_ratio=0.5)
    assert cfg.stage_sft(0).random_mask_ratio == 0.5 and cfg.stage_sft(0).migu_ratio is None
    assert cfg.stage_sft(3).seed == cfg.sft.seed + 3
    cfg.sft.mask_targets = ["*.experts.*"]
    assert cfg.stage_sft(2).mask_targets == ["*.experts.*"]
    assert parse_method("migu+replay") == {"migu", "replay"}
    with pytest.raises(ValueError, match="nearest: 'migu'"):
        parse_method("mgu")
    with pytest.raises(ValueError, match="alternatives"):
        parse_method("migu+random-mask")


def test_replay_buffer_shares_capacity_equally():
    buf = ReplayBuffer(10, seed=0)
    a = [Example(f"a{i}", "x") for i in range(20)]
    b = [Example(f"b{i}", "y") for i in range(20)]
    c = [Example(f"c{i}", "z") for i in range(3)]
    buf.add("a", a)
    assert len(buf) == 10 and buf.per_task() == {"a": 10}
    first = list(buf.examples())
    buf.add("b", b)
    assert buf.per_task() == {"a": 5, "b": 5}
    assert buf.examples()[:5] == first[:5]  # shrinking keeps a prefix of the earlier sample
    buf.add("c", c)
    assert buf.per_task() == {"a": 4, "b": 3, "c": 3}
    assert len({ex.prompt for ex in buf.examples()}) == 10
    assert all(ex in a for ex in buf.examples()[:4])
    assert len(ReplayBuffer(0).examples()) == 0
    with pytest.raises(ValueError):
        ReplayBuffer(-1)


def test_replay_buffer_is_seeded():
    ex = [Example(str(i), "a") for i in range(50)]
    one, two = ReplayBuffer(5, seed=3), ReplayBuffer(5, seed=3)
    one.add("t", ex)
    two.add("t", ex)
    assert one.examples() == two.examples()


def test_builtin_tasks_are_deterministic_and_held_out():
    for name in BUILTIN_TASKS:
        task = builtin_task(name, n_train=120, n_eval=40)
        again = builtin_task(name, n_train=120, n_eval=40)
        assert task.train == again.train and task.eval == again.eval
        assert 0 < len(task.train) <= 120 and 0 < len(task.eval) <= 40
        assert all(ex.prompt.startswith(f"{name}: ") for ex in task.train)
        assert {ex.answer.strip() for ex in task.train} <= set(task.labels)
        if name != "topic":  # generalisation tasks: evaluation inputs never seen in training
            assert not {ex.prompt for ex in task.train} & {ex.prompt for ex in task.eval}
            assert len({ex.answer for ex in task.train}) >= 5
    naming = dict(
        (ex.prompt.split(": ")[1].split("\n")[0], ex.answer.strip())
        for ex in builtin_task("naming", 400, 10).train
    )
    assert all(v == "dunder" for k, v in naming.items() if k.startswith("__") and k.endswith("__"))
    topic = builtin_task("topic")
    assert classification_example("topic", "and", "booleans") in topic.train


def test_parse_task_spec():
    assert parse_task_spec("db=hf:org/db:cfg#text=content,train=100") == (
        "db",
        "hf:org/db:cfg",
        {"text": "content", "train": "100"},
    )
    assert parse_task_spec("data/x/train.jsonl") == (None, "data/x/train.jsonl", {})
    with pytest.raises(ValueError, match="unknown task option"):
        parse_task_spec("x.jsonl#colour=red")


def test_load_task_classification_with_label_names(tmp_path):
    d = tmp_path / "agnews"
    rows = [{"sentence": f"story {i} about things", "label": i % 2} for i in range(40)]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "test.jsonl", rows[:6])
    (d / "labels.json").write_text(json.dumps(["world", "sports"]))
    task = load_task(f"{d}#train=10")
    assert task.name == "agnews" and task.labels == ["sports", "world"]
    assert len(task.train) == 10 and len(task.eval) == 6
    assert sorted(ex.answer for ex in task.train).count(" world") == 5  # class-balanced
    assert task.train[0].prompt.startswith("agnews: story") and task.train[0].prompt.endswith(
        "agnews label:"
    )


def test_load_task_file_with_holdout_and_named(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"q": f"question {i}", "a": str(i)} for i in range(100)])
    task = load_task(f"myqa={path}#prompt=q,answer=a,holdout=0.2")
    assert task.name == "myqa"
    assert 60 <= len(task.train) <= 95 and len(task.train) + len(task.eval) == 100
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.eval}
    with pytest.raises(ValueError, match="rows need"):
        load_task(f"{path}")
    with pytest.raises(FileNotFoundError):
        load_task(str(tmp_path / "missing.jsonl"))


def test_load_task_train_file_finds_its_test_file(tmp_path):
    write_jsonl(tmp_path / "t_train.jsonl", [{"prompt": "p", "answer": "a"}] * 3)
    write_jsonl(tmp_path / "t_test.jsonl", [{"prompt": "q", "answer": "b"}])
    task = load_task(str(tmp_path / "t_train.jsonl"))
    assert len(task.train) == 3 and task.eval == [Example("q", "b")]


def test_builtin_task_renamed(tmp_path):
    task = load_task("styles=builtin:naming#train=20,eval=5")
    assert task.name == "styles" and len(task.train) == 20
    assert task.train[0].prompt.startswith("styles: ") and "styles label:" in task.train[0].prompt


def test_load_task_cl_benchmark_layout(tmp_path):
    """The O-LoRA / MIGU CL_Benchmark layout: train.json / test.json lists, string labels."""
    d = tmp_path / "CL_Benchmark" / "TC" / "agnews"
    d.mkdir(parents=True)
    rows = [
        {"label": lb, "sentence": f"Title: t{i}\nText: body {i}"}
        for i, lb in enumerate(["World", "Sports", "Business", "Science or Technology"] * 5)
    ]
    (d / "train.json").write_text(json.dumps(rows))
    (d / "test.json").write_text(json.dumps(rows[:4]))
    (d / "labels.json").write_text(
        json.dumps(["World", "Sports", "Business", "Science or Technology"])
    )
    task = load_task(f"{d}#eval=4")
    assert task.name == "agnews" and len(task.train) == 20 and len(task.eval) == 4
    assert task.eval[0] == classification_example("agnews", rows[0]["sentence"], "World")
    assert task.eval[0].prompt == "agnews: Title: t0 Text: body 0\nagnews label:"
