"""`RMoEConfig`: the configuration of an rmoe decoder-only Mixture-of-Experts language model.

Every field is documented below, in the class docstring, next to its default. Field names
follow transformers' MoE conventions (Mixtral / Qwen2-MoE / OLMoE) wherever one exists.

The names accepted by `router_type`, `router_scorer`, `router_cell`, `router_score_func`,
`router_aux_loss_type` and `experts_backend` are
those registered in `rmoe.registry` (by the classes and functions of `rmoe.modeling`);
validation reads the registry, so a new router is valid as soon as its class is registered.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .registry import (
    ACTIVATION_CHECKPOINTING,
    AUTO_BACKEND,
    BACKENDS,
    BALANCERS,
    CELLS,
    GW_SELECTIONS,
    ROUTER_INITS,
    ROUTERS,
    SCORE_FUNCS,
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
        attention_bias (bool, False): biases on the q_proj, k_proj and v_proj projections
            (Qwen2, Qwen2-MoE). Llama/Mistral's own `attention_bias` puts a bias on o_proj too:
            set `attention_out_bias` as well. Biases start at 0.
        attention_out_bias (bool, False): a bias on the attention output projection o_proj.
        qk_norm (str, "none"): RMSNorm (with `rms_norm_eps`) on queries and keys, before RoPE:
            "none"; "head" (Qwen3, Qwen3-MoE): one RMSNorm over head_dim applied to every head
            of q and of k, weights `attn.q_norm.weight` / `attn.k_norm.weight` [head_dim];
            "proj" (OLMoE): one RMSNorm over the whole q projection [H * head_dim] and one
            over the whole k projection [Hkv * head_dim], before splitting into heads.
        rope_scaling (dict | None, None): RoPE scaling in transformers' key names, e.g.
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}.
            The inverse frequencies and the attention scaling come from transformers' own
            `modeling_rope_utils.ROPE_INIT_FUNCTIONS`, so they equal the families'. Supported
            rope_type (`ROPE_SCALING_KEYS` lists each one's keys): "linear" (position
            interpolation), "llama3" (Llama 3.1), "yarn" (Qwen2.5/Qwen3, DeepSeek; cos and sin
            are multiplied by its attention factor) and "longrope" (Phi-3: the short or long
            factors, chosen per forward pass from the largest position id, as transformers
            does: a cached generation that crosses original_max_position_embeddings keeps its
            earlier keys' short-factor rotation, as in transformers). "dynamic" (dynamic NTK)
            is refused: transformers recomputes it from the longest sequence seen so far,
            state that rmoe's stateless RoPE does not keep.
            None or rope_type "default" = plain RoPE with `rope_theta` (stored as None); a
            "rope_theta" key must equal `rope_theta`; "type" is read as "rope_type". A
            `partial_rotary_factor` other than 1 is refused (rmoe rotates the whole head).
        hidden_dropout (float, 0.0): dropout on attention and FFN outputs before the residual add.
        tie_word_embeddings (bool, False): share the input embedding and the LM head.
        initializer_range (float, 0.02): std of the normal init of linear, embedding and expert
            weights. Output projections (attention `o_proj`, expert and dense `down_proj`) use
            initializer_range / sqrt(2 * num_hidden_layers) (GPT-2 style residual scaling).
            Router linear layers follow `router_init` (default: PyTorch's uniform); the shared
            recurrent cell uses
            PyTorch's default U(-1/sqrt(P), 1/sqrt(P)) (the paper's "standard init"); cosine/xmoe
            temperatures start at `router_temperature_init`; RMSNorm weights start at 1;
            biases (attention_bias, attention_out_bias) start at 0.

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
        shared_expert_gate (bool, False): Qwen2-MoE's sigmoid gate on the shared experts'
            output: shared(x) * sigmoid(x w_gate), w_gate = `moe.shared_expert_gate.weight`
            [1, D] (a Linear(D, 1) without bias, N(0, initializer_range) init). Needs
            num_shared_experts >= 1.
        mlp_only_layers (list[int], []): indices of layers that use a dense FFN instead of MoE
            (SwiGLU of width `intermediate_size`). They pass the router state on unchanged.
            The families' layer patterns map onto it: Qwen2-MoE / Qwen3-MoE's layer i is dense
            iff i is in their mlp_only_layers or (i + 1) % decoder_sparse_step != 0, so
            mlp_only_layers = sorted(set(mlp_only_layers) | {i : (i + 1) % step != 0});
            DeepSeek's first_k_dense_replace = k is mlp_only_layers = [0, ..., k - 1];
            Mixtral / OLMoE: []; a dense model (Llama, Mistral, Qwen2, Qwen3) before upcycling:
            every layer (with a router type that has no shared cell, e.g. "linear").
        experts_backend (str, "auto"): dispatch implementation (`rmoe.registry.BACKENDS`):
            "loop" (reference), "sorted", "grouped_mm", or "auto": grouped_mm where the torch
            version/device/dtype support it (CUDA bf16 sm80+, CPU with torch >= 2.9), except
            on CPU when there are fewer token-expert assignments than experts (sorted);
            sorted everywhere else. See
            `rmoe.modeling.experts.auto_backend` and benchmarks/RESULTS.md.
        activation_checkpointing (str, "none"): recompute activations in backward instead of
            storing them (training with gradients only; eval and no-grad forwards are unchanged):
            "none"; "moe": each MoE block (router, experts, shared experts) is recomputed;
            "layer": each whole decoder layer (attention + FFN/MoE) is recomputed. Both use
            torch's non-reentrant `torch.utils.checkpoint`, so gradients flow through every
            input, the recurrent router state passed from layer to layer included; the
            expert-load record of the aux-loss-free bias is taken once, outside the recomputed
            region. transformers' `model.gradient_checkpointing_enable()` switches on the
            "layer" mode too (it needs `use_reentrant=False`, its default).

    Routing
        router_type (str, "recurrent"): a name in `rmoe.registry.ROUTERS`: "linear" (SMoE: W x), "mlp" (2-layer GELU MLP),
            "cosine" (cosine to expert embeddings, learnable temperature), "xmoe" (down-project to
            `router_xmoe_dim`, L2-normalise, cosine, temperature), "random" (frozen random
            linear), "shared" (Omni-Router, arXiv 2507.05724: ONE linear router weight shared by
            every MoE layer, owned by the model as `router_shared`), "recurrent" (RMoE:
            per-layer projection D->P, one cell shared by all MoE layers carrying a per-token
            state over depth, per-layer scorer on the state).
        router_dim (int, 128): P, the recurrent router's state width.
        router_cell (str, "gru"): the shared cell (`rmoe.registry.CELLS`): "gru", "rnn" (tanh)
            or "lstm".
        router_cell_fused (bool, True): run the cell through torch's native cell op
            (`torch.gru_cell` / `rnn_tanh_cell` / `lstm_cell`: fewer kernels, fused gate math on
            CUDA) instead of its gate-by-gate reference (`RecurrentCell.reference_forward`).
            Equal up to float rounding (the native GRU writes h' = n + z (h - n)); False gives
            bit-for-bit the results of the code before this option.
        router_scorer (str, "linear"): the recurrent router's per-layer scorer on h_i, a name in
            `rmoe.registry.SCORERS` that may score a state: "linear", "cosine" or "xmoe"
            ("xmoe" gives the paper's "XMoE + GRU"; "mlp" is only the plain "mlp" router's).
        router_pass_state (bool, True): pass the state from layer to layer. False = RMoE-NP: every
            layer starts from h_0 = 0 (same parameters and FLOPs).
        router_detach_state (bool, False): pass the state but stop its gradient.
        router_share_proj (bool, False): "S-proj" (RMoE paper, section 5): one projector D->P
            shared by every MoE layer (owned by the model as `router_shared`) instead of one
            per layer. Routers with a cell only.
        router_base_linear (bool, False): the retrofit router: layer i's logits are
            W_i x_i + Scorer_i(h_i), W_i a per-layer Linear(D, E) without bias
            (`moe.router.base.weight` [E, D], `router_init`), added to the recurrent router's
            logits (before any logit residual). Routers with a cell only.
            `rmoe.training.surgery.retrofit_recurrent` turns a linear-router model into one
            with W_i = its router and Scorer_i = 0, so it starts as the same function.
        router_logit_residual (float, 0.0): alpha of the RMoE paper's "r-alpha" ablation: layer
            i's logits += alpha * layer i-1's (final) logits, before the score function
            (RealFormer-style residual; the paper uses 0.5 and 1; "NP + r-alpha" pairs it with
            router_pass_state=False). Any router; 0 = off. The carried state then ends with
            the layer's E logits.
        router_detach_residual (bool, False): "detach-r": the residual logits are detached (no
            gradient flows into the previous layer through them).
        router_score_func (str, "softmax"): `rmoe.registry.SCORE_FUNCS`: "softmax" over all
            experts, or "sigmoid" (DeepSeek-V3, arXiv 2412.19437: per-expert sigmoid, top-k,
            the selected scores renormalised when `norm_topk_prob`). Balance losses, entropies
            and GW-MoE read the scores normalised to sum to one.
        router_scale (float, 1.0): routed scaling factor multiplying the combine weights
            (DeepSeek-V3 uses 2.5 with 256 experts, top-8).
        router_init (str, "uniform"): init of the router's linear layers (projections, linear
            and MLP scorers, the shared router weight, the XMoE down-projection): "uniform"
            (PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and
            bias; what the RMoE paper's enwik8 code uses) or "normal" (N(0, router_init_std),
            zero biases: the paper's 0.91B setting and rmoe's default before the cpu-study-a
            measurement). Default "uniform" because in cpu-study-a (experiments/RESULTS.md) it
            was the setting chosen on valid for both SMoE and RMoE: the N(0, 0.02) chain makes
            the recurrent router's initial logits about 16x flatter than a linear router's.
        router_init_std (float | None, None): std of the "normal" router init (None =
            initializer_range).
        router_bias (bool, False): biases on router projections and linear scorers.
        router_mlp_hidden (int | None, None): hidden width of the "mlp" router (None = hidden_size).
        router_xmoe_dim (int, 16): low dimension of the "xmoe" router/scorer.
        router_temperature_init (float, 0.07): initial temperature of cosine/xmoe scorers
            (logits = cos / tau, tau learnable, clamped to >= 0.01).
        router_jitter (float, 0.0): multiplicative jitter on the router input in training,
            x * U(1 - eps, 1 + eps) (Switch Transformer); 0 = off.

    Balancing and capacity
        router_aux_loss_coef (float, 0.01): weight of the balance loss (0 = not added, still
            reported). Computed per MoE layer, averaged over MoE layers; always in training.
        router_aux_loss_type (str, "switch"): the balance loss, `rmoe.registry.BALANCERS`:
            "switch" (Switch Transformer, per micro-batch: f_e = share of the layer's top-k
            assignments to expert e, P_e = mean router probability of e, loss = E * sum_e f_e
            P_e, 1 under uniform routing); "sequence" (DeepSeek-V3's complementary
            sequence-wise loss: the same per sequence, then the mean over sequences); "global"
            (Qiu et al., arXiv 2501.11873: f from the counts all-reduced over data-parallel
            ranks and accumulated over the optimizer step's micro-batches so far, P local;
            exact for the global batch after the step's last micro-batch, see
            `rmoe.modeling.balancing.GlobalBalance`).
        router_expert_bias (bool, False): auxiliary-loss-free balancing (Wang et al., arXiv
            2408.15664; DeepSeek-V3): a per-layer expert bias b [E] (a float32 buffer saved with
            the model, never trained) added to the scores for choosing the top-k only, never to
            the combine weights; after each optimizer step b += rate * sign(mean load - load)
            from the step's loads (summed over accumulation, all-reduced over ranks), see
            `rmoe.modeling.balancing`. Combine with router_aux_loss_coef=0 (pure loss-free) or a
            small "sequence" loss (DeepSeek-V3: 1e-4).
        router_bias_update_rate (float, 0.001): the bias update speed gamma (DeepSeek-V3: 1e-3).
        capacity_factor (float | None, None): Switch/GShard capacity in training: each expert
            takes at most ceil(capacity_factor * N * K / E) of a micro-batch's N*K assignments,
            the highest-scoring ones; a dropped assignment contributes zero (the residual
            stream carries the token). None = dropless. rmoe's dispatch still runs a dropped
            assignment, with weight 0: the capacity changes the model, not its compute, and
            the FLOP accounting counts K experts per token either way.
        eval_capacity_factor (float | None, None): the same outside training mode (evaluation,
            generation); None = dropless.
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
    # a plain field here: shadows transformers 5's deprecated `rope_scaling` property (an alias
    # of `rope_parameters`), so the value is stored, saved and loaded as this config's own
    rope_scaling = None

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
        attention_bias: bool = False,
        attention_out_bias: bool = False,
        qk_norm: str = "none",
        rope_scaling: dict[str, Any] | None = None,
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
        shared_expert_gate: bool = False,
        mlp_only_layers: list[int] | None = None,
        experts_backend: str = "auto",
        activation_checkpointing: str = "none",
        router_type: str = "recurrent",
        router_dim: int = 128,
        router_cell: str = "gru",
        router_cell_fused: bool = True,
        router_scorer: str = "linear",
        router_pass_state: bool = True,
        router_detach_state: bool = False,
        router_bias: bool = False,
        router_mlp_hidden: int | None = None,
        router_xmoe_dim: int = 16,
        router_temperature_init: float = 0.07,
        router_jitter: float = 0.0,
        router_share_proj: bool = False,
        router_base_linear: bool = False,
        router_logit_residual: float = 0.0,
        router_detach_residual: bool = False,
        router_score_func: str = "softmax",
        router_scale: float = 1.0,
        router_init: str = "uniform",
        router_init_std: float | None = None,
        router_aux_loss_coef: float = 0.01,
        router_aux_loss_type: str = "switch",
        router_expert_bias: bool = False,
        router_bias_update_rate: float = 0.001,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
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
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.qk_norm = qk_norm
        self.rope_scaling = _normalize_rope_scaling(rope_scaling, rope_theta)
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
        self.shared_expert_gate = shared_expert_gate
        self.mlp_only_layers = sorted(int(i) for i in (mlp_only_layers or []))
        self.experts_backend = experts_backend
        self.activation_checkpointing = activation_checkpointing
        self.router_type = router_type
        self.router_dim = router_dim
        self.router_cell = router_cell
        self.router_cell_fused = router_cell_fused
        self.router_scorer = router_scorer
        self.router_pass_state = router_pass_state
        self.router_detach_state = router_detach_state
        self.router_bias = router_bias
        self.router_mlp_hidden = router_mlp_hidden if router_mlp_hidden is not None else hidden_size
        self.router_xmoe_dim = router_xmoe_dim
        self.router_temperature_init = router_temperature_init
        self.router_jitter = router_jitter
        self.router_share_proj = router_share_proj
        self.router_base_linear = router_base_linear
        self.router_logit_residual = router_logit_residual
        self.router_detach_residual = router_detach_residual
        self.router_score_func = router_score_func
        self.router_scale = router_scale
        self.router_init = router_init
        self.router_init_std = router_init_std
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_aux_loss_type = router_aux_loss_type
        self.router_expert_bias = router_expert_bias
        self.router_bias_update_rate = router_bias_update_rate
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
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
        check_choice(
            "activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING
        )
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
        self._validate_router_options()
        self._validate_architecture_options()
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def _validate_router_options(self) -> None:
        """The score function, balancing, capacity and router-init fields."""
        check_choice("router_score_func", self.router_score_func, SCORE_FUNCS)
        check_choice("router_aux_loss_type", self.router_aux_loss_type, BALANCERS)
        check_choice("router_init", self.router_init, ROUTER_INITS)
        if self.router_share_proj and not ROUTERS.lookup(self.router_type).uses_cell:
            cell_routers = list(ROUTERS.names(lambda cls: cls.uses_cell))
            raise ValueError(
                f"router_share_proj shares the recurrent projector; router_type="
                f"{self.router_type!r} has none (use one of {cell_routers})"
            )
        for name in ("router_logit_residual", "router_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.router_scale <= 0:
            raise ValueError(f"router_scale must be > 0, got {self.router_scale}")
        if self.router_init_std is not None and self.router_init_std <= 0:
            raise ValueError(f"router_init_std must be > 0 or None, got {self.router_init_std}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None = dropless), got {value}")

    def _validate_architecture_options(self) -> None:
        """The attention, shared-expert-gate and retrofit-router options of the families."""
        check_choice("qk_norm", self.qk_norm, QK_NORMS)
        for name in ("attention_bias", "attention_out_bias", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.shared_expert_gate and self.num_shared_experts < 1:
            raise ValueError(
                "shared_expert_gate gates the shared experts' output and needs "
                f"num_shared_experts >= 1, got {self.num_shared_experts} (Qwen2-MoE: 1)"
            )
        if self.router_base_linear and not ROUTERS.lookup(self.router_type).uses_cell:
            cell_routers = list(ROUTERS.names(lambda cls: cls.uses_cell))
            raise ValueError(
                f"router_base_linear adds a linear base to the recurrent router's logits; "
                f"router_type={self.router_type!r} has no recurrent stage (use one of "
                f"{cell_routers})"
            )
        check_rope_scaling(self.rope_scaling, self.head_dim)


QK_NORMS = ("none", "head", "proj")
"""`RMoEConfig.qk_norm` choices: none, per-head (Qwen3), over the whole projection (OLMoE)."""

ROPE_SCALING_KEYS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "linear": (frozenset({"factor"}), frozenset()),
    "llama3": (
        frozenset({"factor", "low_freq_factor", "high_freq_factor"}),
        frozenset({"original_max_position_embeddings"}),
    ),
    "yarn": (
        frozenset({"factor"}),
        frozenset(
            {
                "original_max_position_embeddings",
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
            }
        ),
    ),
    "longrope": (
        frozenset({"short_factor", "long_factor"}),
        frozenset({"factor", "attention_factor", "original_max_position_embeddings"}),
    ),
}
"""Supported `rope_scaling` rope_type -> (required keys, optional keys), besides "rope_type"
(transformers' names; "original_max_position_embeddings" defaults, as in transformers, to
`max_position_embeddings`)."""


def _normalize_rope_scaling(value: Any, rope_theta: float) -> dict[str, Any] | None:
    """`rope_scaling` as stored: None for plain RoPE (None or rope_type "default"), else a
    dict with "rope_type" first (from "rope_type" or the legacy "type") and no "rope_theta"
    (which must equal `rope_theta`: transformers 5's `rope_parameters` carry it). Other keys
    are kept as given; `check_rope_scaling` validates them."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            f"rope_scaling must be a dict like {{'rope_type': 'linear', 'factor': 2.0}} or "
            f"None, got {value!r}"
        )
    rest = dict(value)
    theta = rest.pop("rope_theta", rope_theta)
    if theta != rope_theta:
        raise ValueError(
            f"rope_scaling rope_theta={theta} differs from the config's rope_theta={rope_theta}; "
            "set the rope_theta field (and leave rope_theta out of rope_scaling)"
        )
    rope_type = rest.pop("rope_type", None)
    legacy = rest.pop("type", None)
    rope_type = rope_type if rope_type is not None else legacy
    if rope_type is None:
        raise ValueError(
            f"rope_scaling needs a 'rope_type' (one of {['default', *ROPE_SCALING_KEYS]}), got "
            f"{value!r}"
        )
    if rope_type == "default":
        return None
    return {"rope_type": rope_type, **rest}


def check_rope_scaling(scaling: dict[str, Any] | None, head_dim: int) -> None:
    """Raise ValueError unless `scaling` (a normalised `RMoEConfig.rope_scaling`) is a
    supported RoPE scaling for heads of width `head_dim` (see `ROPE_SCALING_KEYS`)."""
    if scaling is None:
        return
    rope_type = scaling["rope_type"]
    if rope_type == "dynamic":
        raise ValueError(
            "rope_scaling rope_type 'dynamic' (dynamic NTK) is not supported: transformers "
            "recomputes its frequencies from the longest sequence seen so far, state that "
            "rmoe's stateless RoPE does not keep; use one of "
            f"{list(ROPE_SCALING_KEYS)} or None"
        )
    check_choice("rope_scaling rope_type", rope_type, ["default", *ROPE_SCALING_KEYS])
    required, optional = ROPE_SCALING_KEYS[rope_type]
    keys = set(scaling) - {"rope_type", "partial_rotary_factor"}
    missing, unknown = sorted(required - keys), sorted(keys - required - optional)
    if missing or unknown:
        raise ValueError(
            f"rope_scaling {rope_type!r}: missing keys {missing}, unknown keys {unknown}; it "
            f"takes {sorted(required)} and optionally {sorted(optional)}"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(
            "rope_scaling partial_rotary_factor must be 1 (rmoe applies RoPE to the whole "
            f"head), got {scaling['partial_rotary_factor']}"
        )
    numbers = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
    for name in numbers:
        value = scaling.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and value > 0):
            raise ValueError(f"rope_scaling {name} must be a number > 0, got {value!r}")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("rope_scaling llama3 needs high_freq_factor > low_freq_factor")
    for name in ("short_factor", "long_factor"):
        if name in scaling and len(scaling[name]) != head_dim // 2:
            raise ValueError(
                f"rope_scaling longrope {name} needs head_dim / 2 = {head_dim // 2} values, "
                f"got {len(scaling[name])}"
            )
