"""Adapters of the transformers-5 MoE families: for each family a tiny random model of the
family's own class, saved and loaded back, routes and computes exactly as the adapter says.

(a) the expert loads rmoe reports equal the experts the model used (counted independently:
    the family's experts-module inputs, or its router's own output);
(b) the adapter's expert outputs equal the family's own experts module run on one-hot
    routing, also after writing permuted experts back;
(c) `rmoe analyze` runs end to end on some of the new families.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from rmoe.analysis.adapters import ExpertWeights, get_adapter, supported_families
from rmoe.analysis.adapters.huggingface import router_linear
from rmoe.analysis.adapters.weights import BIAS_TYPES, _read_fused
from rmoe.analysis.pipeline import metrics as M
from rmoe.loading import load_model

VOCAB = 260  # the byte tokenizer (258 ids) fits, for load_model and analyze
E = 4
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_experts=E,
    n_routed_experts=E,
    num_local_experts=E,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
"""Overrides applied to every family's config where it has the field."""
MLA = dict(
    kv_lora_rank=8,
    q_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    num_key_value_heads=4,
)
GROUPS = dict(n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1)
INDEXER = dict(index_n_heads=2, index_head_dim=8, index_topk=4)
DELTANET = dict(
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    shared_expert_intermediate_size=24,
)
EXTRA: dict[str, dict] = {
    "afmoe": {},
    "flint": dict(mlp_only_layers=[], shared_expert_intermediate_size=24),
    "granitemoe_swa": {},
    "hy_v3": {},
    "hy_v4": {**MLA, **GROUPS, **INDEXER, "swiglu_limit": 0.05},  # a limit the tiny model hits
    "lara_mini": dict(shared_expert_intermediate_size=24),
    "mellum": {},
    "aria_text": {},
    "bailing_hybrid": {**GROUPS, "num_experts_per_token": 2},
    "cohere2_moe": {},
    "dbrx": dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=E, moe_top_k=2),
    ),
    "deepseek_v32": {**MLA, **GROUPS, **INDEXER},
    "dots1": GROUPS,
    "ernie4_5_moe": dict(moe_num_experts=E, moe_k=2, moe_layer_start_index=0),
    "exaone_moe": GROUPS,
    "flex_olmo": {},
    "glm4_moe": GROUPS,
    "glm4_moe_lite": {**MLA, **GROUPS},
    "glm_moe_dsa": {**MLA, **GROUPS, **INDEXER},
    "gpt_oss": dict(swiglu_limit=0.05),  # a limit the tiny model's pre-activations reach
    "granitemoe": {},
    "granitemoehybrid": dict(
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        shared_intermediate_size=24,
        layer_types=["mamba", "attention"],
    ),
    "granitemoeshared": dict(shared_intermediate_size=24),
    "hunyuan_v1_moe": dict(moe_topk=2),
    "jamba": {},
    "jetmoe": dict(kv_channels=8),
    "kimi_linear": {
        **MLA,
        **GROUPS,
        "q_lora_rank": None,
        "num_experts_per_token": 2,
        "linear_attn_config": {"head_dim": 8, "num_heads": 4},
    },
    "lfm2_moe": dict(
        num_hidden_layers=3, num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]
    ),
    "llama4_text": dict(interleave_moe_layer_step=1),
    "mimo_v2_flash": GROUPS,
    "minimax": {},
    "minimax_m2": {},
    "phimoe": {},
    "qwen3_5_moe_text": DELTANET,
    "qwen3_next": DELTANET,
    "solar_open": GROUPS,
}
FAMILIES = sorted(EXTRA)
"""The families tested here (the seven older ones are in test_adapters.py)."""


def tiny_config(model_type: str, vocab: int = VOCAB):
    """The family's own config class with the tiny sizes of :data:`BASE` and its extras."""
    cls = CONFIG_MAPPING[model_type]
    fields = cls().to_dict()
    kwargs = {k: v for k, v in {**BASE, "vocab_size": vocab}.items() if k in fields}
    kwargs.update(EXTRA[model_type])
    return cls(**kwargs)


def build(model_type: str, vocab: int = VOCAB) -> nn.Module:
    """A tiny random model of the family's own causal-LM class, with larger router weights
    (decisive, varied routing) and non-zero selection biases."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab)).eval()
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer in adapter.layers:
            router_linear(layer.router)[0].normal_(0.0, 0.5)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                t.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Callable[[str], nn.Module]:
    """family -> its tiny model, saved with ``save_pretrained`` and loaded back with
    :func:`rmoe.loading.load_model` (cached per module)."""
    cache: dict[str, nn.Module] = {}

    def get(family: str) -> nn.Module:
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            build(family).save_pretrained(path)
            cache[family] = load_model(path, "cpu", torch.float32, missing_tokenizer="bytes").model
        return cache[family]

    return get


# --------------------------------------------------------------------------------------------
# the model's own choice, recorded independently of the adapter's capture
# --------------------------------------------------------------------------------------------


@contextmanager
def own_choices(adapter) -> Iterator[list[list[torch.Tensor]]]:
    """Per MoE layer, the [N, K] experts each batch used, from the family's own modules: the
    ``top_k_index`` its experts module received, or (Llama 4, JetMoE, whose experts module
    takes no indices) what its router returned."""
    seen: list[list[torch.Tensor]] = [[] for _ in adapter.layers]
    handles = []
    for i, layer in enumerate(adapter.layers):
        if adapter.family == "llama4_text":  # scores [N, E]: sigmoid of the chosen logits, else 0

            def hook(mod, args, out, i=i):
                seen[i].append(torch.nonzero(out[0] > 0)[:, 1].view(out[0].shape[0], -1))

            handles.append(layer.router.register_forward_hook(hook))
        elif adapter.family == "jetmoe":  # (sorted slot of each assignment, ..., logits)

            def hook(mod, args, out, i=i):
                order, k = out[0], mod.top_k
                experts = torch.repeat_interleave(
                    torch.arange(mod.num_experts), torch.tensor(out[3])
                )
                flat = torch.empty_like(order)
                flat[order] = experts
                seen[i].append(flat.view(-1, k))

            handles.append(layer.router.register_forward_hook(hook))
        else:

            def pre(mod, args, i=i):
                seen[i].append(args[1].detach().reshape(-1, args[1].shape[-1]))

            handles.append(layer.experts.register_forward_pre_hook(pre))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_equal_the_models_own_choice(family: str, loaded):
    model = loaded(family)
    adapter = get_adapter(model)
    assert adapter.family == family and adapter.num_layers >= 1
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), own_choices(adapter) as own, adapter.capture(store_inputs=24) as cap:
        model(ids, use_cache=False)
    spec = adapter.spec
    routing = M.routing(cap.layers, spec.num_experts)
    for i, lc in enumerate(cap.layers):
        used = torch.cat(own[i])
        n = ids.numel()
        assert lc.topk_idx.shape == used.shape == (n, spec.top_k)
        counts = np.bincount(used.flatten().numpy(), minlength=spec.num_experts)
        np.testing.assert_array_equal(routing.per_layer[i].stats.load.counts, counts)
        assert torch.equal(lc.topk_idx.sort(dim=1).values, used.sort(dim=1).values)
        torch.testing.assert_close(lc.probs.sum(-1), torch.ones(n))
        torch.testing.assert_close(adapter.router_logits(i, lc.inputs), lc.logits[:24])
        if spec.reproducible:  # the routing function reproduces the choice from the logits
            decision = adapter.route(i, lc.logits)
            assert torch.equal(decision.topk_idx, lc.topk_idx)
            torch.testing.assert_close(decision.topk_weight, lc.topk_weight, rtol=1e-4, atol=1e-5)
    assert (routing.per_layer[0].stats.load.counts > 0).sum() >= 2  # non-degenerate routing


# --------------------------------------------------------------------------------------------
# expert outputs
# --------------------------------------------------------------------------------------------


def family_expert(adapter, i: int, x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, D] expert ``k`` of MoE layer ``i`` on x [N, D], computed by the family's own
    modules: its experts module on one-hot routing (Llama 4: on every expert's copy of the
    tokens; JetMoE: its parallel-experts linears)."""
    layer = adapter.layers[i]
    n, d = x.shape
    with torch.no_grad():
        if adapter.family == "llama4_text":
            return layer.experts(x.repeat(adapter.spec.num_experts, 1)).view(-1, n, d)[k]
        if adapter.family == "jetmoe":
            block = layer.block
            sizes = [n if e == k else 0 for e in range(adapter.spec.num_experts)]
            gate, up = block.input_linear(x, sizes).chunk(2, dim=-1)
            return block.output_linear(block.activation(gate) * up, sizes)
        idx = torch.full((n, 1), k)
        return layer.experts(x, idx, torch.ones(n, 1)).reshape(n, d)


def _permuted(w: ExpertWeights, perm: torch.Tensor) -> ExpertWeights:
    biases = {b: None if getattr(w, b) is None else getattr(w, b)[perm].clone() for b in BIAS_TYPES}
    return ExpertWeights(w.act[perm].clone(), w.up[perm].clone(), w.down[perm].clone(), **biases)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_outputs_equal_the_familys_experts(family: str, loaded):
    adapter = get_adapter(loaded(family))
    d = adapter.hidden_size
    x = 4 * torch.randn(6, d, generator=torch.Generator().manual_seed(2))  # reach GLU limits
    for i in range(adapter.num_layers):
        w = adapter.expert_weights(i)
        assert w.act.shape == w.up.shape == w.down.shape and w.act.shape[2] == d
        outs, acts = adapter.expert_outputs(i, x, with_activations=True)
        assert outs.shape == (adapter.spec.num_experts, 6, d) and acts.shape[2] == w.act.shape[1]
        for k in range(adapter.spec.num_experts):
            torch.testing.assert_close(
                outs[k], family_expert(adapter, i, x, k), rtol=1e-5, atol=1e-5
            )
        # Write the experts back permuted: the family's module now computes the permutation.
        perm = torch.roll(torch.arange(adapter.spec.num_experts), 1)
        original = {t: v.clone() for t, v in w.as_dict().items()}
        adapter.set_expert_weights(i, _permuted(w, perm))
        for t, v in adapter.expert_weights(i).as_dict().items():
            torch.testing.assert_close(v, original[t][perm])
        for k in range(adapter.spec.num_experts):
            torch.testing.assert_close(
                family_expert(adapter, i, x, k), outs[perm[k]], rtol=1e-5, atol=1e-5
            )
        adapter.set_expert_weights(i, _permuted(adapter.expert_weights(i), perm.argsort()))
        torch.testing.assert_close(adapter.expert_outputs(i, x)[0], outs)


OLDER = {"rmoe", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}


def test_every_registered_family_is_tested():
    assert set(supported_families()) == set(FAMILIES) | OLDER


def test_gpt_oss_expert_function_and_layout(loaded):
    adapter = get_adapter(loaded("gpt_oss"))
    w = adapter.expert_weights(0)
    assert w.layout == "fused_transposed_interleaved" and w.has_bias
    experts = adapter.layers[0].experts
    torch.testing.assert_close(w.act[1], experts.gate_up_proj[1][:, 0::2].T)
    torch.testing.assert_close(w.up_bias[2], experts.gate_up_proj_bias[2][1::2])
    d = adapter.describe()
    assert d["expert_function"].startswith("alpha-silu GLU") and d["expert_biases"] is True
    # Matrices without biases (as the metrics copy them) still compute the model's experts.
    x = torch.randn(3, adapter.hidden_size)
    bare = ExpertWeights(w.act.float(), w.up.float(), w.down.float())
    torch.testing.assert_close(
        adapter.expert_outputs(0, x, weights=bare)[0], adapter.expert_outputs(0, x)[0]
    )


def test_llama4_weights_scale_inputs(loaded):
    adapter = get_adapter(loaded("llama4_text"))
    assert adapter.spec.weights_scale == "input" and adapter.spec.score == "sigmoid"
    layer = adapter.layers[0]
    x = torch.randn(5, adapter.hidden_size)
    with torch.no_grad(), adapter.capture(store_inputs=5) as cap:
        scores, _ = layer.router(x)
        routed = layer.experts(x.repeat(adapter.spec.num_experts, 1) * scores.T.reshape(-1, 1))
    lc = cap.layer(0)
    outs, _ = adapter.expert_outputs(0, x)
    rebuilt = torch.zeros_like(x)
    for slot in range(adapter.spec.top_k):  # y = sum_k E_k(w_k x)
        for t in range(5):
            e, wk = int(lc.topk_idx[t, slot]), float(lc.topk_weight[t, slot])
            rebuilt[t] += adapter.expert_outputs(0, wk * x[t : t + 1])[0][e, 0]
    torch.testing.assert_close(rebuilt, routed.view(-1, 5, x.shape[1]).sum(0), rtol=1e-4, atol=1e-5)
    assert outs.shape[0] == adapter.spec.num_experts


def test_non_gated_experts_are_refused_clearly():
    class UpDownExperts(nn.Module):
        has_gate = False
        gate_up_proj = torch.zeros(2, 8, 4)

    with pytest.raises(ValueError, match="non-gated experts"):
        _read_fused(UpDownExperts(), 4, None)


# --------------------------------------------------------------------------------------------
# rmoe analyze end to end
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    words = "router expert token layer gate neuron def return class import".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 10)) for _ in range(1500)]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(lines))
    return f"text:{path}"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "dbrx"])
def test_analyze_end_to_end(family: str, corpus, tmp_path: Path):
    from rmoe.analysis.run import analyze
    from rmoe.data import build_tokenizer

    path = tmp_path / family
    build(family, vocab=260).save_pretrained(path)
    build_tokenizer("bytes").save(path)
    out = tmp_path / "report"
    result = analyze(
        [path],
        data=corpus,
        tokens=256,
        out_dir=out,
        seq_len=64,
        batch_size=2,
        output_tokens=32,
        grad_batch_size=1,
        cache_dir=tmp_path / "cache",
        device="cpu",
    )
    data = json.loads((out / "metrics.json").read_text())
    (model,) = data["models"].values()
    assert model["adapter"]["family"] == family
    layers = model["routing"]["per_layer"]
    k = model["adapter"]["routing"]["top_k"]
    assert layers and all(sum(x["load"]["counts"]) == 256 * k for x in layers)
    assert all(x["dynamic"]["num_tokens"] == 32 for x in model["experts"]["per_layer"])
    assert (out / "report.html").is_file() and result["outputs"]["figures"]
