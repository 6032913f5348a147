import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rmoe.training import NonFiniteLossError, latest_checkpoint, lr_factor, train


def losses_of(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def test_train_writes_run_and_loads_with_auto(micro_cfg, tmp_path):
    out = tmp_path / "run"
    res = train(micro_cfg(train=dict(save_interval=5)), out, progress=False)
    assert res.status == "completed" and res.step == 10
    assert res.losses[-1] < res.losses[0]
    assert {"loss", "bpb", "ppl", "tokens"} <= set(res.final_eval)
    for f in (
        "config.yaml",
        "env.json",
        "metrics.jsonl",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ):
        assert (out / f).is_file(), f
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert len(rec["layer_load_cv"]) == 2 and len(rec["layer_entropy"]) == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def f(x):", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tok)
    assert latest_checkpoint(out).name == "step-0000010"
    from transformers import pipeline

    gen = pipeline("text-generation", model=str(out))
    text = gen("The ", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("The ") and len(text) > 4


def test_resume_is_bit_identical(micro_cfg, tmp_path):
    cfg = micro_cfg(train=dict(save_interval=4, max_steps=10))
    full = train(cfg, tmp_path / "full", progress=False)

    def interrupt(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    part = train(cfg, tmp_path / "part", progress=False, on_step=interrupt)
    assert part.status == "interrupted" and part.step == 6
    assert latest_checkpoint(tmp_path / "part").name == "step-0000006"
    rest = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert rest.step == 10
    assert part.losses + rest.losses == full.losses  # exact equality, not approximate
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "part")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_nan_loss_stops_and_keeps_last_checkpoint(micro_cfg, tmp_path):
    cfg = micro_cfg(train=dict(save_interval=3, max_steps=10))
    out = tmp_path / "run"

    def poison(step, loss):
        if step == 4:  # corrupt the weights: the next step's loss is NaN
            import rmoe.training.trainer as t  # noqa: F401

            raise_nan.model_param.data.fill_(float("nan"))

    class raise_nan:  # holder for a parameter found after the model is built
        model_param = None

    orig = torch.nn.Module.to

    def grab(self, *a, **k):
        r = orig(self, *a, **k)
        if raise_nan.model_param is None and hasattr(self, "lm_head"):
            raise_nan.model_param = self.lm_head.weight
        return r

    torch.nn.Module.to = grab
    try:
        with pytest.raises(NonFiniteLossError, match="step 5.*step-0000003"):
            train(cfg, out, progress=False, on_step=poison)
    finally:
        torch.nn.Module.to = orig
    ck = latest_checkpoint(out)
    assert ck.name == "step-0000003"
    model = AutoModelForCausalLM.from_pretrained(ck)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_new_run_refuses_existing_checkpoints_and_bad_resume(micro_cfg, tmp_path):
    cfg = micro_cfg(train=dict(max_steps=2))
    out = tmp_path / "run"
    train(cfg, out, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, out, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)
    other = micro_cfg(model=dict(hidden_size=64), train=dict(max_steps=4))
    with pytest.raises(ValueError, match="model.hidden_size"):
        train(other, out, resume=True, progress=False)


def test_grad_accumulation_matches_big_batch(micro_cfg, tmp_path):
    train(micro_cfg(train=dict(max_steps=3)), tmp_path / "a", progress=False)
    train(
        micro_cfg(data=dict(grad_accum=2), train=dict(max_steps=3)), tmp_path / "b", progress=False
    )
    lm = lambda d: [  # noqa: E731
        json.loads(x)["lm_loss"]
        for x in (d / "metrics.jsonl").read_text().splitlines()
        if "lm_loss" in x
    ]
    la, lb = lm(tmp_path / "a"), lm(tmp_path / "b")
    # step 1 (same weights): the LM loss over two half-batches equals the full-batch one
    assert abs(la[0] - lb[0]) < 1e-6
    # the balance loss is computed per micro-batch (nonlinear in f and P), so later steps drift
    # by a little
    for x, y in zip(la, lb):
        assert abs(x - y) < 1e-3


def test_lr_schedule(micro_cfg):
    cfg = micro_cfg(
        optim=dict(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), train=dict(max_steps=20)
    )
    assert lr_factor(0, cfg) == pytest.approx(0.25)
    assert lr_factor(3, cfg) == pytest.approx(1.0)
    assert lr_factor(20, cfg) == pytest.approx(0.1)
    cfg.optim.schedule = "constant"
    assert lr_factor(15, cfg) == 1.0
    cfg.optim.schedule = "linear"
    assert lr_factor(12, cfg) == pytest.approx(0.1 + 0.9 * 0.5)


def test_dense_log_spaced_eval_on_two_corpora(micro_cfg, tmp_path, corpus_file):
    other = tmp_path / "other.txt"
    other.write_text("import os\nprint(os.getcwd())\n" * 400)
    cfg = micro_cfg(
        data=dict(extra_eval=[f"text:{other}"]),
        train=dict(max_steps=8, eval_log_points=4, eval_batches=1),
    )
    train(cfg, tmp_path / "run", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r.get("split") == "valid"]
    steps = sorted({r["step"] for r in evals})
    assert steps[0] == 0 and steps[-1] == 8 and len(steps) >= 4
    assert {r["corpus"] for r in evals} == {f"text:{corpus_file}", f"text:{other}"}
