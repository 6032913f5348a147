"""Parameter and FLOP accounting from a config (router included), checked against real models.

FLOPs count matrix multiplications only, as 2 x multiply-adds, for one token's forward pass;
elementwise work (activations, norms, softmax, the cell's gates) is left out, as is the
embedding lookup. Attention's score and value products use the average causal context
(seq_len + 1) / 2. A training step costs about 3x the forward FLOPs.

Router cost per MoE layer (multiply-adds per token), with D width, E experts, P state width:
    linear / random   D*E
    shared            D*E                  (one weight for all layers: D*E parameters once)
    mlp               D*Hm + Hm*E
    cosine            D*E
    xmoe              D*r + r*E            (r = router_xmoe_dim)
    recurrent         D*P + G*2*P^2 + scorer(P)   (G = 3 gru, 1 rnn, 4 lstm; the cell's
                      input and hidden products are both counted, also for h_0 = 0, so RMoE,
                      RMoE-NP and detached RMoE cost the same; S-proj counts the projector's
                      parameters once and its multiply-adds per layer)
    recurrent + base  the above + D*E      (router_base_linear: the retrofit's W_i x_i)
Score functions, the expert bias (a buffer, not a parameter), the logit residual and capacity
add no matmuls and no parameters. Attention biases and q/k norms add parameters but no matmuls;
the shared experts' sigmoid gate (`shared_expert_gate`) adds D parameters and D multiply-adds
per MoE layer (counted with the shared experts).
Each registered router class gives its own count (`Router.layer_counts`, from its scorer's
`Scorer.counts`, and `Router.shared_counts` for the module all layers share), and each cell
class its own (`RecurrentCell.counts`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ..config import RMoEConfig
from ..registry import CELLS, ROUTERS


@dataclass
class ModelCounts:
    """Parameter and FLOP counts of one configuration.

    Attributes:
        total_params: every parameter (embeddings, frozen router weights included).
        active_params: parameters used per token (K of E routed experts).
        router_params: all routers' parameters, including the shared recurrent cell and the
            router module shared by all layers.
        expert_params: routed experts' parameters (all E, all layers).
        embedding_params: input embedding + LM head (once if tied).
        forward_flops_per_token: 2 x matmul multiply-adds per token, forward pass.
        router_flops_per_token: the router's share of `forward_flops_per_token`.
        breakdown: FLOPs per token by part (attention, attention_core, experts, shared,
            dense_ffn, router, lm_head).
        seq_len: context length used for attention FLOPs.
    """

    total_params: int
    active_params: int
    router_params: int
    expert_params: int
    embedding_params: int
    forward_flops_per_token: int
    router_flops_per_token: int
    seq_len: int
    breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain dict (JSON-ready)."""
        return asdict(self)


def router_layer_counts(cfg: RMoEConfig) -> tuple[int, int]:
    """(parameters, multiply-adds per token) of ONE MoE layer's router, excluding the shared cell
    (asks the registered router class, `Router.layer_counts`)."""
    return ROUTERS.lookup(cfg.router_type).layer_counts(cfg)


def cell_counts(cfg: RMoEConfig) -> tuple[int, int]:
    """(parameters, multiply-adds per token per MoE layer) of the shared recurrent cell; (0, 0)
    for routers without one (asks the registered cell class, `RecurrentCell.counts`)."""
    if not ROUTERS.lookup(cfg.router_type).uses_cell:
        return 0, 0
    return CELLS.lookup(cfg.router_cell).counts(cfg.router_dim)


def attention_extra_params(cfg: RMoEConfig) -> int:
    """Parameters of ONE layer's attention besides its four projection weights: the q/k/v
    biases (`attention_bias`), the o_proj bias (`attention_out_bias`) and the q/k RMSNorm
    weights (`qk_norm`: 2 * Dh per head-wise norm, H * Dh + Hkv * Dh over the projections)."""
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    n = qd + 2 * kvd if cfg.attention_bias else 0
    n += cfg.hidden_size if cfg.attention_out_bias else 0
    if cfg.qk_norm == "head":
        n += 2 * cfg.head_dim
    elif cfg.qk_norm == "proj":
        n += qd + kvd
    return n


def count_config(cfg: RMoEConfig, seq_len: int | None = None) -> ModelCounts:
    """Analytic parameter and FLOP counts for `cfg` (see module docstring)."""
    seq_len = seq_len or cfg.max_position_embeddings
    d, v = cfg.hidden_size, cfg.vocab_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    n_moe = len(cfg.moe_layer_indices)
    n_dense = cfg.num_hidden_layers - n_moe
    e, k, f = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    shared_f = cfg.num_shared_experts * cfg.shared_expert_intermediate_size

    emb = v * d if cfg.tie_word_embeddings else 2 * v * d
    attn_p = d * qd + 2 * d * kvd + qd * d  # weights (matmuls)
    attn_extra = attention_extra_params(cfg)  # biases, q/k norms (no matmuls)
    norms = 2 * d * cfg.num_hidden_layers + d
    expert_p = n_moe * e * 3 * d * f
    gate_p = d if cfg.shared_expert_gate else 0  # Qwen2-MoE's shared-expert gate [1, D]
    shared_exp_p = n_moe * (3 * d * shared_f + gate_p)
    dense_p = n_dense * 3 * d * cfg.intermediate_size
    r_layer_p, r_layer_m = router_layer_counts(cfg)
    cell_p, cell_m = cell_counts(cfg)
    shared_p = ROUTERS.lookup(cfg.router_type).shared_counts(cfg)[0]
    router_p = n_moe * r_layer_p + cell_p + shared_p
    total = (
        emb
        + cfg.num_hidden_layers * (attn_p + attn_extra)
        + norms
        + expert_p
        + shared_exp_p
        + dense_p
        + router_p
    )
    active = total - expert_p + n_moe * k * 3 * d * f

    ctx = (seq_len + 1) / 2
    breakdown = {
        "attention": 2 * cfg.num_hidden_layers * attn_p,
        "attention_core": int(2 * 2 * cfg.num_hidden_layers * qd * ctx),
        "experts": 2 * n_moe * k * 3 * d * f,
        "shared": 2 * n_moe * (3 * d * shared_f + gate_p),
        "dense_ffn": 2 * n_dense * 3 * d * cfg.intermediate_size,
        "router": 2 * n_moe * (r_layer_m + cell_m),
        "lm_head": 2 * d * v,
    }
    return ModelCounts(
        total_params=total,
        active_params=active,
        router_params=router_p,
        expert_params=expert_p,
        embedding_params=emb,
        forward_flops_per_token=sum(breakdown.values()),
        router_flops_per_token=breakdown["router"],
        seq_len=seq_len,
        breakdown=breakdown,
    )


ROUTER_PARTS = ("router", "router_cell", "router_shared")
"""Module names that hold router parameters: each layer's `router`, the model's shared
recurrent cell and its module shared by all layers' routers."""


def is_router_parameter(name: str) -> bool:
    """Whether the parameter (or buffer) called `name` (as in `named_parameters`) belongs to a
    router: an MoE layer's router, the shared recurrent cell or the shared router module."""
    return any(f".{part}." in f".{name}" for part in ROUTER_PARTS)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Count a built model's parameters by part (shared tensors counted once).

    Returns dict with total, trainable, router (router modules, the shared cell and the
    shared router module), experts.
    """
    seen: set[int] = set()
    out = {"total": 0, "trainable": 0, "router": 0, "experts": 0}
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        out["total"] += n
        if p.requires_grad:
            out["trainable"] += n
        if is_router_parameter(name):
            out["router"] += n
        elif ".experts." in f".{name}":
            out["experts"] += n
    # frozen parameters (random router) are still parameters
    return out


def count_model(model: nn.Module, seq_len: int | None = None) -> ModelCounts:
    """`count_config` for a model's config (`model.config`)."""
    return count_config(model.config, seq_len)


def flops_per_token(cfg: RMoEConfig, seq_len: int | None = None) -> int:
    """Forward FLOPs per token (2 x multiply-adds, matmuls only)."""
    return count_config(cfg, seq_len).forward_flops_per_token
