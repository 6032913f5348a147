"""Fine-tuning takes its gradient masker from the caller (rmoe.training.sft.SFTMasker): the loop
scopes the batch's token mask around forward and backward and masks once per step."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmoe.data import build_tokenizer
from rmoe.data.examples import IGNORE_INDEX, Example
from rmoe.training.sft import SFTConfig, finetune

EXAMPLES = [Example(f"q{i} ->", f" a{i}") for i in range(6)]


class TinyLM(nn.Module):
    """Embedding + linear head: ``loss`` is the next-token CE on ``labels`` (like an HF LM)."""

    def __init__(self, vocab: int = 260, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)
        self.forwards: list[bool] = []  # per forward: was a token mask in scope?
        self.scope: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.forwards.append(bool(self.scope))
        logits = self.head(self.embed(input_ids))
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        return SimpleNamespace(loss=loss, logits=logits)


class FakeMasker:
    """Records the calls the loop makes, in order."""

    def __init__(self, model: TinyLM, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.calls: list[tuple] = []

    @contextmanager
    def token_mask(self, mask):
        self.calls.append(("enter", mask.clone()))
        self.model.scope.append(mask)
        try:
            yield
        finally:
            self.model.scope.pop()
            self.calls.append(("exit",))

    def apply_(self) -> None:
        grads = [p.grad is not None for p in self.model.parameters()]
        self.calls.append(("apply", all(grads), bool(self.model.scope)))

    def remove(self) -> None:
        self.calls.append(("remove",))


def _run(steps: int = 3, **cfg):
    """Fine-tune a TinyLM with a FakeMasker: ``(model, [maskers made], result)``."""
    tok = build_tokenizer("bytes")
    model = TinyLM(tok.vocab_size)
    made: list[FakeMasker] = []

    def factory(m, optimizer):
        made.append(FakeMasker(m, optimizer))
        return made[-1]

    config = SFTConfig(steps=steps, batch_size=3, device="cpu", grad_clip=0.0, **cfg)
    try:
        res = finetune(model, tok, EXAMPLES, None, config, masker=factory)
    except ValueError as err:
        return model, made, err
    return model, made, res


def test_the_factory_is_called_once_with_the_model_and_its_optimizer():
    model, made, res = _run()
    assert len(made) == 1 and made[0].model is model
    assert isinstance(made[0].optimizer, torch.optim.AdamW)
    assert res.steps == 3


def test_token_mask_scopes_forward_and_backward_then_apply_once_per_step():
    model, (masker,), _ = _run(steps=3)
    kinds = [c[0] for c in masker.calls]
    assert kinds == ["enter", "exit", "apply"] * 3 + ["remove"]
    assert model.forwards == [True, True, True]  # every forward ran inside the token mask
    for call in masker.calls:
        if call[0] == "enter":
            mask = call[1]
            assert mask.shape[0] == 3 and mask.dtype == torch.long
            assert set(mask.unique().tolist()) <= {0, 1} and mask[:, 0].all()
        if call[0] == "apply":
            assert call[1]  # after backward: every parameter has a gradient
            assert not call[2]  # the token mask is no longer in force


def test_remove_runs_when_training_fails():
    _, made, err = _run(steps=2, lr=float("inf"))
    assert isinstance(err, ValueError) and "loss is" in str(err)
    assert made[0].calls[-1] == ("remove",)


@pytest.mark.parametrize("option", [{"migu_ratio": 0.7}, {"random_mask_ratio": 0.5}])
def test_masking_config_without_a_masker_is_refused(option):
    tok = build_tokenizer("bytes")
    with pytest.raises(ValueError, match="masker_factory"):
        finetune(TinyLM(tok.vocab_size), tok, EXAMPLES, None, SFTConfig(steps=1, **option))


def test_training_imports_nothing_of_continual():
    import subprocess
    import sys

    code = (
        "import sys, rmoe.training, rmoe.training.sft, rmoe.training.surgery, "
        "rmoe.training.sft_eval; "
        "bad = [m for m in sys.modules if m.startswith('rmoe.continual')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
