"""`RMoEConfig`: the configuration of an rmoe decoder-only Mixture-of-Experts language model.

Every field is documented below, in the class docstring, next to its default. Field names
follow transformers' MoE conventions (Mixtral / Qwen2-MoE / OLMoE) wherever one exists.

The names accepted by `router_type`, `router_scorer`, `router_cell` and `experts_backend` are
those registered in `rmoe.registry` (by the classes and functions of `rmoe.modeling`);
validation reads the registry, so a new router is valid as soon as its class is registered.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .registry import (
    AUTO_BACKEND,
    BACKENDS,
    CELLS,
    GW_SELECTIONS,
    ROUTERS,
    SCORERS,
    check_choice,
)


def check_gw_policy(
    threshold: float | None, max_tokens_per_seq: int | None, selection: str
) -> None:
    """Raise ValueError unless (threshold, max_tokens_per_seq, selection) is a valid GW-MoE
    setting (see the GW-MoE fields of `RMoEConfig`; also checks `rmoe.modeling.moe.GWPolicy`)."""
    check_choice("gw_selection", selection, GW_SELECTIONS)
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(
            f"gw_entropy_threshold is on normalised entropy H/ln E and must be in [0, 1] "
            f"(or None to disable), got {threshold}"
        )
    if max_tokens_per_seq is not None and max_tokens_per_seq < 1:
        raise ValueError("gw_max_tokens_per_seq must be >= 1 or None")


class RMoEConfig(PretrainedConfig):
    r"""Configuration of an rmoe MoE decoder (pre-norm RMSNorm, RoPE, GQA attention, SwiGLU experts).

    Model shape
        vocab_size (int, 258): vocabulary size (256 bytes + 2 specials for the default byte tokenizer).
        hidden_size (int, 256): model width D.
        num_hidden_layers (int, 4): number of decoder layers L.
        num_attention_heads (int, 4): query heads.
        num_key_value_heads (int | None, None): key/value heads for grouped-query attention
            (None = num_attention_heads; must divide num_attention_heads).
        head_dim (int | None, None): per-head width (None = hidden_size // num_attention_heads).
        max_position_embeddings (int, 2048): longest sequence the model is meant for (RoPE has
            no hard limit; used by generation defaults and accounting).
        rope_theta (float, 10000.0): RoPE base.
        rms_norm_eps (float, 1e-6): epsilon of every RMSNorm.
        attention_dropout (float, 0.0): dropout on attention probabilities (training only).
        hidden_dropout (float, 0.0): dropout on attention and FFN outputs before the residual add.
        tie_word_embeddings (bool, False): share the input embedding and the LM head.
        initializer_range (float, 0.02): std of the normal init of linear, embedding and expert
            weights. Output projections (attention `o_proj`, expert and dense `down_proj`) use
            initializer_range / sqrt(2 * num_hidden_layers) (GPT-2 style residual scaling).
            Router projections and scorers use initializer_range; the shared recurrent cell uses
            PyTorch's default U(-1/sqrt(P), 1/sqrt(P)) (the paper's "standard init"); cosine/xmoe
            temperatures start at `router_temperature_init`; RMSNorm weights start at 1.

    Feed-forward / experts
        intermediate_size (int, 512): hidden width of the dense SwiGLU FFN used by `mlp_only_layers`.
        moe_intermediate_size (int, 256): hidden width F of each routed SwiGLU expert.
        num_experts (int, 8): routed experts per MoE layer E.
        num_experts_per_tok (int, 2): experts chosen per token K (top-k), 1 <= K <= E.
        norm_topk_prob (bool, True): renormalise the K selected probabilities to sum to one.
        num_shared_experts (int, 0): always-on shared experts per MoE layer (DeepSeekMoE style),
            implemented as one SwiGLU MLP of width num_shared_experts * shared_expert_intermediate_size
            added to the routed output.
        shared_expert_intermediate_size (int | None, None): width of each shared expert
            (None = moe_intermediate_size).
        mlp_only_layers (list[int], []): indices of layers that use a dense FFN instead of MoE.
            They pass the router state on unchanged.
        experts_backend (str, "auto"): dispatch implementation (`rmoe.registry.BACKENDS`):
            "loop" (reference), "sorted", "grouped_mm", or "auto": grouped_mm where the torch
            version/device/dtype support it (CUDA bf16 sm80+, CPU with torch >= 2.9), except
            on CPU when there are fewer token-expert assignments than experts (sorted);
            sorted everywhere else. See
            `rmoe.modeling.experts.auto_backend` and benchmarks/RESULTS.md.

    Routing
        router_type (str, "recurrent"): a name in `rmoe.registry.ROUTERS`: "linear" (SMoE: W x), "mlp" (2-layer GELU MLP),
            "cosine" (cosine to expert embeddings, learnable temperature), "xmoe" (down-project to
            `router_xmoe_dim`, L2-normalise, cosine, temperature), "random" (frozen random
            linear), "recurrent" (RMoE: per-layer projection D->P, one cell shared by all MoE
            layers carrying a per-token state over depth, per-layer scorer on the state).
        router_dim (int, 128): P, the recurrent router's state width.
        router_cell (str, "gru"): the shared cell (`rmoe.registry.CELLS`): "gru", "rnn" (tanh)
            or "lstm".
        router_scorer (str, "linear"): the recurrent router's per-layer scorer on h_i, a name in
            `rmoe.registry.SCORERS` that may score a state: "linear", "cosine" or "xmoe"
            ("xmoe" gives the paper's "XMoE + GRU"; "mlp" is only the plain "mlp" router's).
        router_pass_state (bool, True): pass the state from layer to layer. False = RMoE-NP: every
            layer starts from h_0 = 0 (same parameters and FLOPs).
        router_detach_state (bool, False): pass the state but stop its gradient.
        router_bias (bool, False): biases on router projections and linear scorers.
        router_mlp_hidden (int | None, None): hidden width of the "mlp" router (None = hidden_size).
        router_xmoe_dim (int, 16): low dimension of the "xmoe" router/scorer.
        router_temperature_init (float, 0.07): initial temperature of cosine/xmoe scorers
            (logits = cos / tau, tau learnable, clamped to >= 0.01).
        router_jitter (float, 0.0): multiplicative jitter on the router input in training,
            x * U(1 - eps, 1 + eps) (Switch Transformer); 0 = off.

    Losses
        router_aux_loss_coef (float, 0.01): weight of the Switch load-balancing loss. The loss is
            computed per MoE layer (f_e = share of the layer's top-k assignments to expert e,
            P_e = mean router probability of e; loss_l = E * sum_e f_e P_e, which is 1 under
            uniform routing) and averaged over MoE layers. Always computed in training.
        router_z_loss_coef (float, 0.0): weight of the router z-loss mean(logsumexp(logits)^2),
            averaged over MoE layers; 0 = not added (still reported).
        output_router_logits (bool, False): return each MoE layer's router logits.

    GW-MoE (arXiv 2406.12375; training mode only)
        gw_entropy_threshold (float | None, None): tokens whose normalised router entropy
            H / ln E exceeds this are "uncertain" and, in training only, get the dense mixture
            sum_e p_e E_e(x) over all experts instead of their top-k mix. None = off.
        gw_max_tokens_per_seq (int | None, None): at most this many uncertain tokens per sequence
            (the highest-entropy ones); None = no cap.
        gw_selection (str, "entropy"): "entropy" (GW-MoE) or "random": the control that
            broadcasts exactly as many tokens as "entropy" would, chosen uniformly at random.
        The model builds a `rmoe.modeling.GWPolicy` from these three fields; switching GW-MoE
        on for a fine-tuning run goes through `model.set_gw_policy(...)`, never through these
        fields (a saved config stays as it was).
    """

    model_type = "rmoe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 258,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        intermediate_size: int = 512,
        moe_intermediate_size: int = 256,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        norm_topk_prob: bool = True,
        num_shared_experts: int = 0,
        shared_expert_intermediate_size: int | None = None,
        mlp_only_layers: list[int] | None = None,
        experts_backend: str = "auto",
        router_type: str = "recurrent",
        router_dim: int = 128,
        router_cell: str = "gru",
        router_scorer: str = "linear",
        router_pass_state: bool = True,
        router_detach_state: bool = False,
        router_bias: bool = False,
        router_mlp_hidden: int | None = None,
        router_xmoe_dim: int = 16,
        router_temperature_init: float = 0.07,
        router_jitter: float = 0.0,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.0,
        output_router_logits: bool = False,
        gw_entropy_threshold: float | None = None,
        gw_max_tokens_per_seq: int | None = None,
        gw_selection: str = "entropy",
        use_cache: bool = True,
        pad_token_id: int | None = 257,
        bos_token_id: int | None = 256,
        eos_token_id: int | None = 256,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = (
            num_attention_heads if num_key_value_heads is None else num_key_value_heads
        )
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.initializer_range = initializer_range
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.num_shared_experts = num_shared_experts
        self.shared_expert_intermediate_size = (
            moe_intermediate_size
            if shared_expert_intermediate_size is None
            else shared_expert_intermediate_size
        )
        self.mlp_only_layers = sorted(int(i) for i in (mlp_only_layers or []))
        self.experts_backend = experts_backend
        self.router_type = router_type
        self.router_dim = router_dim
        self.router_cell = router_cell
        self.router_scorer = router_scorer
        self.router_pass_state = router_pass_state
        self.router_detach_state = router_detach_state
        self.router_bias = router_bias
        self.router_mlp_hidden = router_mlp_hidden if router_mlp_hidden is not None else hidden_size
        self.router_xmoe_dim = router_xmoe_dim
        self.router_temperature_init = router_temperature_init
        self.router_jitter = router_jitter
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.output_router_logits = output_router_logits
        self.gw_entropy_threshold = gw_entropy_threshold
        self.gw_max_tokens_per_seq = gw_max_tokens_per_seq
        self.gw_selection = gw_selection
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_rmoe()

    # -- derived -----------------------------------------------------------------------------
    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that hold an MoE block, in depth order."""
        dense = set(self.mlp_only_layers)
        return [i for i in range(self.num_hidden_layers) if i not in dense]

    def validate_rmoe(self) -> None:
        """Raise ValueError naming the first out-of-range or unknown field."""
        ROUTERS.lookup(self.router_type)
        CELLS.lookup(self.router_cell)
        SCORERS.lookup(self.router_scorer, where=lambda scorer: scorer.on_state)
        check_choice("experts_backend", self.experts_backend, (AUTO_BACKEND, *BACKENDS))
        check_choice("gw_selection", self.gw_selection, GW_SELECTIONS)
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "router_dim": self.router_dim,
            "router_mlp_hidden": self.router_mlp_hidden,
            "router_xmoe_dim": self.router_xmoe_dim,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts="
                f"{self.num_experts}; choose top-k <= number of experts"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"mlp_only_layers {bad} out of range; layers are 0..{self.num_hidden_layers - 1}"
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.router_jitter >= 1:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.router_temperature_init <= 0:
            raise ValueError("router_temperature_init must be > 0")
        check_gw_policy(self.gw_entropy_threshold, self.gw_max_tokens_per_seq, self.gw_selection)
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
