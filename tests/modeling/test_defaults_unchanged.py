"""With every architecture option of issue 15 at its default, a model is bit for bit the model
of the code before them: the same parameters from the same seed (global random stream and
`init_weights_seeded`), the same logits, training loss, gradients and greedy tokens.

The reference is the code at `BASE_COMMIT` (the commit before the options), extracted with
`git archive` and run in a subprocess next to a subprocess of the current code, both with one
thread; every tensor must be `torch.equal`. Change `BASE_COMMIT` only for a deliberate change
of the defaults (and say so in the commit message)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from tests.conftest import ROUTER_VARIANTS

import rmoe

BASE_COMMIT = "c1c6bace66fbc20989b55ce80fc71ec09e06a98d"
REPO = Path(__file__).resolve().parents[2]

TINY = dict(
    vocab_size=258,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_intermediate_size=24,
    intermediate_size=48,
    num_experts=4,
    num_experts_per_tok=2,
    router_dim=8,
    max_position_embeddings=128,
)
NEW_OPTIONS = (
    "attention_bias",
    "attention_out_bias",
    "qk_norm",
    "rope_scaling",
    "shared_expert_gate",
    "router_base_linear",
)
"""The options the base commit does not have (a variant setting one is not a default)."""
CURRENT_ONLY = dict(router_cell_fused=False)
"""Options later than the base commit whose default changes float rounding, not the model
(the fused recurrent cell): set to their bit-exact value in the current run only."""
VARIANTS = {
    **{k: v for k, v in ROUTER_VARIANTS.items() if not set(v) & set(NEW_OPTIONS)},
    "dense-and-shared": dict(mlp_only_layers=[1], num_shared_experts=1),
    "linear-dense-head_dim": dict(router_type="linear", mlp_only_layers=[0], head_dim=12),
}

FINGERPRINT = r"""
import json, sys
import torch
torch.set_num_threads(1)
from rmoe import RMoEConfig, RMoEForCausalLM

tiny, variants, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
tiny.update(json.loads(sys.argv[4]))
ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(123))
mask = torch.ones_like(ids)
mask[1, :3] = 0
res = {}
for name, kw in variants.items():
    for init in ("global", "seeded"):
        key = f"{name}/{init}"
        torch.manual_seed(0)
        model = RMoEForCausalLM(RMoEConfig(**tiny, **kw))
        if init == "seeded":
            model.init_weights_seeded(7)
        res.update({f"{key}/param/{n}": t.clone() for n, t in model.state_dict().items()})
        model.eval()
        with torch.no_grad():
            res[f"{key}/logits"] = model(ids).logits
            res[f"{key}/padded"] = model(ids, attention_mask=mask).logits
        res[f"{key}/generate"] = model.generate(
            ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=257
        )
        model.train()
        torch.manual_seed(1)
        step = model(ids, labels=ids)
        step.loss.backward()
        res[f"{key}/loss"] = step.loss.detach()
        res[f"{key}/aux"] = step.aux_loss.detach()
        res.update(
            {f"{key}/grad/{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}
        )
torch.save(res, out)
"""


def _extract_base(dest: Path) -> Path:
    """`BASE_COMMIT`'s src/ under dest (skips the test without git or the commit)."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    known = subprocess.run(
        [git, "-C", str(REPO), "cat-file", "-e", f"{BASE_COMMIT}^{{commit}}"],
        capture_output=True,
    )
    if known.returncode != 0:
        pytest.skip(f"commit {BASE_COMMIT[:10]} is not in this checkout (shallow or no git)")
    archive = dest / "base.tar"
    with archive.open("wb") as f:
        subprocess.run(
            [git, "-C", str(REPO), "archive", BASE_COMMIT, "src/rmoe"], stdout=f, check=True
        )
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def _start(src: Path, out: Path, extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", FINGERPRINT, json.dumps(TINY), json.dumps(VARIANTS), str(out)]
    args.append(json.dumps(extra or {}))
    return subprocess.Popen(args, env=env, cwd=out.parent, stderr=subprocess.PIPE, text=True)


def test_default_options_reproduce_the_code_before_them_bit_for_bit(tmp_path):
    base_src = _extract_base(tmp_path)
    current_src = Path(rmoe.__file__).resolve().parents[1]
    runs = {
        "base": _start(base_src, tmp_path / "base.pt"),
        "current": _start(current_src, tmp_path / "current.pt", CURRENT_ONLY),
    }
    for name, proc in runs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} fingerprint failed:\n{err[-3000:]}"
    base = torch.load(tmp_path / "base.pt")
    current = torch.load(tmp_path / "current.pt")
    assert sorted(base) == sorted(current), set(base) ^ set(current)
    differ = [k for k in base if not torch.equal(base[k], current[k])]
    assert not differ, f"{len(differ)} of {len(base)} tensors changed, e.g. {differ[:5]}"
    assert len(base) > 1000  # every variant's parameters, gradients, logits, tokens
