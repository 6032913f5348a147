"""Supervised fine-tuning (rmoe.training.sft): answer-only loss, router freezing, GW control,
MIGU inside the loop, exact-match evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from rmoe.continual import num_kept_rows
from rmoe.continual.masking import masker_factory
from rmoe.data.examples import IGNORE_INDEX, Example, collate, encode_example, load_examples
from rmoe.training.sft import SFTConfig, finetune
from rmoe.training.sft_eval import evaluate_examples, greedy_answers, normalize_answer
from rmoe.training.surgery import freeze_router

from .conftest import make_model, write_jsonl

EXAMPLES = [Example(f"q{i}: {w} ->", f" {w.upper()}") for i, w in enumerate(["ab", "cde", "f"])]


def test_labels_mask_everything_but_the_answer(tokenizer):
    enc = [encode_example(tokenizer, ex, 64) for ex in EXAMPLES]
    batch = collate(enc, tokenizer.pad_id)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for row, ex in enumerate(EXAMPLES):
        prompt = tokenizer.encode(ex.prompt)
        answer = tokenizer.encode(ex.answer) + [tokenizer.eos_id]
        n = 1 + len(prompt) + len(answer)
        assert ids[row, 0] == tokenizer.eos_id  # BOS
        assert ids[row, :n].tolist() == [tokenizer.eos_id, *prompt, *answer]
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (labels[row, : 1 + len(prompt)] == IGNORE_INDEX).all()
        assert labels[row, 1 + len(prompt) : n].tolist() == answer
        assert (labels[row, n:] == IGNORE_INDEX).all()
        assert (ids[row, n:] == tokenizer.pad_id).all()


def test_truncation_keeps_the_answer_and_the_end_of_the_prompt(tokenizer):
    ex = Example("x" * 50 + "END", " yes")
    ids, n_ctx = encode_example(tokenizer, ex, 12)
    assert len(ids) == 12
    assert tokenizer.decode(ids[n_ctx:-1]) == " yes" and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids[1:n_ctx]).endswith("END")


def test_model_loss_is_the_answer_token_cross_entropy(model, tokenizer):
    batch = collate([encode_example(tokenizer, ex, 64) for ex in EXAMPLES], tokenizer.pad_id)
    model.eval()
    out = model(**batch)
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    manual = F.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out.lm_loss, manual, atol=1e-5)
    # prompt tokens carry no loss: changing them as targets would not change anything
    n_answer = sum(len(tokenizer.encode(ex.answer)) + 1 for ex in EXAMPLES)
    assert int(keep.sum()) == n_answer


def test_load_examples_fields_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"question": "2+2", "answer": 4}, {"question": "1+1", "answer": 2}])
    ex = load_examples(path, prompt_field="question")
    assert ex == [Example("2+2", "4"), Example("1+1", "2")]
    with pytest.raises(ValueError, match="no field 'prompt'.*question"):
        load_examples(path)


def test_normalize_answer():
    assert normalize_answer("  The  Snake_case! ") == "snakecase"
    assert normalize_answer(" a b ", "strip") == "a b"
    assert normalize_answer(" x", "none") == " x"


def test_freeze_router_leaves_router_weights_unchanged(model, tokenizer):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = finetune(
        model,
        tokenizer,
        EXAMPLES,
        None,
        SFTConfig(steps=3, batch_size=3, lr=1e-2, freeze_router=True, device="cpu"),
    )
    assert res.frozen and all(".router" in n or "router_cell" in n for n in res.frozen)
    assert any("router_cell" in n for n in res.frozen)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not changed & set(res.frozen)
    assert "model.layers.0.attn.q_proj.weight" in changed
    assert "model.layers.0.moe.experts.gate_proj" in changed
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_freeze_router_needs_an_moe_model():
    with pytest.raises(ValueError, match="no router parameters"):
        freeze_router(torch.nn.Linear(2, 2))


def test_gw_random_control_broadcasts_as_many_tokens_as_gw(model, tokenizer):
    examples = [Example(f"p{i} " * 5, f" a{i}") for i in range(8)]
    counts = {}
    for random_ctl in (False, True):
        m = copy.deepcopy(model)
        cfg = SFTConfig(
            steps=1,
            batch_size=8,
            gw_threshold=0.3,
            gw_random=random_ctl,
            freeze_router=True,
            device="cpu",
        )
        res = finetune(m, tokenizer, examples, None, cfg)
        counts[random_ctl] = res.gw_tokens
        assert m.config.gw_entropy_threshold is None  # restored
        assert m.config.gw_selection == "entropy"
    assert counts[False] == counts[True] and counts[False][0] > 0


def test_gw_with_a_cap(model, tokenizer):
    examples = [Example("x " * 20, " y")] * 4
    res = finetune(
        model,
        tokenizer,
        examples,
        None,
        SFTConfig(steps=1, batch_size=4, gw_threshold=0.0, gw_max_tokens_per_seq=2, device="cpu"),
    )
    layers = model.config.num_hidden_layers
    assert res.gw_tokens == [4 * 2 * layers]


@pytest.mark.parametrize("kind", ["migu", "random"])
def test_masking_in_the_sft_loop_changes_only_allowed_rows(tokenizer, kind):
    model = make_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ratio = 0.7
    cfg = SFTConfig(
        steps=1,
        batch_size=3,
        lr=1e-2,
        weight_decay=0.0,
        grad_clip=0.0,
        device="cpu",
        **({"migu_ratio": ratio} if kind == "migu" else {"random_mask_ratio": ratio}),
    )
    finetune(model, tokenizer, EXAMPLES, None, cfg, masker=masker_factory(cfg))
    checked = 0
    linear = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    for name, p in model.named_parameters():
        diff = p.detach() != before[name]
        if name in linear:  # nn.Linear [F_out, D_in]: attention, router proj/scorer, lm_head
            rows = diff.any(dim=1)
            assert int(rows.sum()) <= num_kept_rows(p.shape[0], ratio), name
            checked += 1
        elif p.dim() == 3:  # experts [E, F_out, D_in]: per expert
            rows = diff.any(dim=2)
            for e in range(p.shape[0]):
                assert int(rows[e].sum()) <= num_kept_rows(p.shape[1], ratio), (name, e)
            assert rows.any(), name
            checked += 1
    assert checked >= 10
    # not linear layers, so not masked: the embedding and the shared GRU cell of the router
    assert (model.model.embed_tokens.weight != before["model.embed_tokens.weight"]).any()
    assert (model.model.router_cell.weight_ih != before["model.router_cell.weight_ih"]).any()


def test_plain_sft_moves_more_rows(tokenizer):
    model = make_model(tokenizer)
    w0 = model.model.layers[0].attn.q_proj.weight.detach().clone()
    finetune(model, tokenizer, EXAMPLES, None, SFTConfig(steps=1, batch_size=3, device="cpu"))
    moved = (model.model.layers[0].attn.q_proj.weight != w0).any(dim=1).sum()
    assert int(moved) > num_kept_rows(w0.shape[0], 0.7)


def test_batched_greedy_matches_one_by_one(model, tokenizer):
    prompts = ["a", "hello there", "xyz: 12 ->"]
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=8)
    single = [greedy_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_exact_match_scores_the_models_own_answers_as_correct(model, tokenizer):
    prompts = ["a", "bb", "ccc", "dddd"]
    preds = greedy_answers(model, tokenizer, prompts, max_new_tokens=5)
    own = [Example(p, a) for p, a in zip(prompts, preds)]
    res = evaluate_examples(model, tokenizer, own, max_new_tokens=5, normalize="none")
    assert res["exact_match"] == 1.0
    wrong = [Example(p, a + "Q") for p, a in zip(prompts, preds)]
    res = evaluate_examples(model, tokenizer, wrong, max_new_tokens=6, normalize="none")
    assert res["exact_match"] == 0.0 and res["tf_exact_match"] == 0.0
    assert res["answer_loss"] > 0


def test_finetune_learns_and_reports(tokenizer):
    model = make_model(tokenizer)
    data = [Example(f"copy {a} =", f" {a}") for a in "0123456789"]
    before = evaluate_examples(model, tokenizer, data, generate=False)
    cfg = SFTConfig(steps=40, batch_size=10, lr=1e-2, device="cpu", eval_every=20)
    res = finetune(model, tokenizer, data, data, cfg)
    assert res.steps == 40 and len(res.losses) == 40 and len(res.answer_losses) == 40
    assert res.losses[-1] < res.losses[0] / 2
    assert [e["step"] for e in res.evals] == [20, 40]
    assert res.final_eval["answer_loss"] < before["answer_loss"] / 2
    assert 0.0 <= res.final_eval["exact_match"] <= 1.0
    assert len(res.final_eval["predictions"]) == 10
    assert res.config["lr"] == 1e-2 and res.trainable_parameters > 0
