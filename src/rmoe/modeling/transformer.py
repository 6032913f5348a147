"""The rmoe decoder, top to bottom: RMSNorm, RoPE, attention, decoder layer, model, LM head.

Shapes: B batch, T new positions, S = past + T key positions, D width, H query heads,
Hkv key/value heads, Dh head width, V vocabulary, N = B*T tokens, P router state width.

Data flow per layer (pre-norm):
    h = h + Attn(RMSNorm(h))
    x = RMSNorm(h)
    MoE layer:   routing = Router_i(x, state) ; h = h + Experts(x, routing) ; state = routing.state
    dense layer: h = h + MLP(x)                 ; state unchanged
The recurrent router's state (per token, over depth) is threaded explicitly through this loop,
starting from None (= h_0 = 0); it is never stored on a module and never recurrent over T.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..config import RMoEConfig
from .accounting import ROUTER_PARTS
from .experts import DenseMLP, OutputProjection
from .losses import training_loss
from .moe import GWPolicy, MoEBlock
from .outputs import _CACHE_FIELD, RMoECausalLMOutput, RMoEModelOutput
from .routing import RecurrentCell, build_router_cell, build_shared_router

try:  # transformers >= 5: the RoPE init functions read a config with this mixin's methods
    from transformers.modeling_rope_utils import RotaryEmbeddingConfigMixin as _RopeMixin
except ImportError:  # pragma: no cover - transformers 4.x
    _RopeMixin = object  # type: ignore[assignment,misc]

try:  # transformers >= 5: init functions that skip weights already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init  # type: ignore[assignment]

_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm: x / rms(x) * weight, computed in float32. x [..., D] -> [..., D]."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_parameters(self, ops, std: float, std_out: float, generator=None) -> None:
        """weight = 1."""
        ops.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables for positions [B, T] -> cos, sin [B, 1, T, Dh] (rotate-half layout).

    Computed on the fly (no buffers), so nothing needs re-initialising after loading.
    """
    inv_freq = 1.0 / (
        theta
        ** (
            torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
        )
    )
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class _RopeConfigView(_RopeMixin):
    """The attributes transformers' RoPE init functions read, taken from an `RMoEConfig`
    (transformers 5 reads `rope_parameters` with "rope_theta" inside; 4 reads `rope_scaling`
    and `rope_theta`)."""

    def __init__(self, config: RMoEConfig) -> None:
        params = {**config.rope_scaling, "rope_theta": float(config.rope_theta)}
        self.rope_parameters = params
        self.rope_scaling = params
        self.rope_theta = float(config.rope_theta)
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.max_position_embeddings = config.max_position_embeddings


def rope_frequencies(
    config: RMoEConfig, position_ids: torch.Tensor
) -> tuple[torch.Tensor, float] | None:
    """The scaled RoPE of `config.rope_scaling`: (inverse frequencies [Dh / 2] float32,
    attention scaling of cos and sin), from transformers' `ROPE_INIT_FUNCTIONS`; None for
    plain RoPE (`rope_cos_sin` with `rope_theta`). `position_ids` [B, T] gives the device and,
    for "longrope", the sequence length max(position_ids) + 1 that picks the short or long
    factors (one host sync), as transformers' own forward does."""
    if config.rope_scaling is None:
        return None
    rope_type = config.rope_scaling["rope_type"]
    seq_len = int(position_ids.max()) + 1 if rope_type == "longrope" else None
    init_fn = ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, scaling = init_fn(_RopeConfigView(config), position_ids.device, seq_len=seq_len)
    return inv_freq.to(device=position_ids.device, dtype=torch.float32), float(scaling)


def scaled_rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables from given inverse frequencies [Dh / 2] for positions [B, T] -> cos, sin
    [B, 1, T, Dh], both multiplied by `scaling` (transformers' attention scaling)."""
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, Dh] rotated by cos/sin [B, 1, T, Dh]."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and RoPE, through
    `F.scaled_dot_product_attention`; keys/values go through the KV cache when given.

    Options (`RMoEConfig`): `attention_bias` (q/k/v biases), `attention_out_bias` (o_proj
    bias), `qk_norm` ("head": `q_norm` / `k_norm` RMSNorm [Dh] on every head; "proj": RMSNorm
    [H * Dh] / [Hkv * Dh] on the whole projections), applied before RoPE. The q/k norms exist
    only when `qk_norm` is not "none" (so default models build exactly the modules they did).
    """

    def __init__(self, config: RMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.qk_norm = config.qk_norm
        d, qd, kvd = config.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, qd, bias=bias)
        self.k_proj = nn.Linear(d, kvd, bias=bias)
        self.v_proj = nn.Linear(d, kvd, bias=bias)
        self.o_proj = OutputProjection(qd, d, bias=config.attention_out_bias)
        if self.qk_norm != "none":
            head = self.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if head else qd, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if head else kvd, config.rms_norm_eps)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, H, T, Dh], k and v [B, Hkv, T, Dh], q and k normalised by
        `qk_norm` (RoPE not applied yet)."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = v.view(b, t, self.n_kv, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """x [B, T, D]; attn_mask [B, 1, T, S] bool (True = attend) or None for plain causal."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        is_causal = attn_mask is None and past == 0 and t > 1
        if attn_mask is None and past > 0 and t > 1:  # chunked prefill without padding
            attn_mask = _causal_mask(b, t, past, None, x.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _causal_mask(
    b: int, t: int, past: int, padding: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask (True = attend): key j visible to query i iff j <= past + i and
    key j is not padding. Fully masked rows (padding queries) attend to everything so SDPA never
    produces NaN; their outputs are ignored."""
    s = past + t
    q_pos = torch.arange(t, device=device)[:, None] + past
    k_pos = torch.arange(s, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(b, 1, t, s)
    if padding is not None:
        mask = mask & padding[:, None, None, -s:].bool()
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


def _positions_and_masks(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    b: int,
    t: int,
    past: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """From the [B, S] padding mask (or None), S = past + T: position ids [B, T] (given, from
    the mask, or past + arange(T)), the [B, 1, T, S] attention mask (None without padding: the
    fast causal path) and the [B, T] token mask of real tokens (None without padding)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be a 2-D [batch, past + seq] padding mask, got shape "
            f"{tuple(attention_mask.shape)}"
        )
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: use the fast causal path
    if position_ids is None:
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -t:]
        else:
            position_ids = torch.arange(past, past + t, device=device)[None].expand(b, t)
    if attention_mask is None:
        return position_ids, None, None
    attn_mask = _causal_mask(b, t, past, attention_mask, device)
    return position_ids, attn_mask, attention_mask[:, -t:].bool()


def _non_reentrant(fn: Callable) -> Callable:
    """`fn` (a checkpoint function), after checking it is not torch's reentrant checkpoint:
    the reentrant one returns only tensors and drops the gradient of inputs it is not given
    positionally, so the layer's outputs and the router state's gradient need the other."""
    keywords = getattr(fn, "keywords", None) or {}
    if keywords.get("use_reentrant") is True:
        raise ValueError(
            "rmoe's activation checkpointing needs use_reentrant=False (the layer returns the "
            "router state and the MoE outputs); call gradient_checkpointing_enable() without "
            "gradient_checkpointing_kwargs or with {'use_reentrant': False}"
        )
    return fn


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention, then an MoE block (or a dense FFN).

    `gradient_checkpointing` (from `activation_checkpointing == "layer"`, or transformers'
    `gradient_checkpointing_enable()`, which also sets `_gradient_checkpointing_func`): in
    training with gradients the whole layer is recomputed in backward; the non-reentrant
    checkpoint keeps the gradient flowing into h and the incoming router state, and the MoE
    block's expert-load record is taken once, outside the recomputed region.
    """

    def __init__(self, config: RMoEConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = layer_idx not in set(config.mlp_only_layers)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            self.moe = MoEBlock(config)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, residual_out=True)
        self.drop = nn.Dropout(config.hidden_dropout)
        self.gradient_checkpointing = config.activation_checkpointing == "layer"
        self._gradient_checkpointing_func: Callable = functools.partial(
            checkpoint, use_reentrant=False
        )

    def forward(
        self,
        h: torch.Tensor,
        *,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: Cache | None,
        router_state: torch.Tensor | None,
        router_cell: RecurrentCell | None,
        router_shared: nn.Module | None = None,
        token_mask: torch.Tensor | None,
        compute_losses: bool,
    ):
        """One layer.

        Args:
            h: [B, T, D] the residual stream entering the layer.
            cos, sin: [B, 1, T, Dh] RoPE tables.
            attn_mask: [B, 1, T, S] bool (True = attend), or None for plain causal attention.
            cache: the KV cache, or None.
            router_state: [N, state_dim] the router state from the previous MoE layer, or None.
            router_cell: the model's shared recurrent cell, or None.
            router_shared: the model's module shared by every layer's router, or None.
            token_mask: [B, T] True for real tokens, or None.
            compute_losses: compute the MoE block's balance and z losses.

        Returns:
            (h [B, T, D], router state for the next layer, MoEOutput | None for a dense layer).
        """
        args = (h, cos, sin, attn_mask, cache, router_state, router_cell, router_shared)
        args += (token_mask, compute_losses)
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return self._layer(*args, record_load=True)
        fn = _non_reentrant(self._gradient_checkpointing_func)
        h, state, out = fn(self._layer, *args, False)
        if out is not None:
            self.moe.record_routing(out.routing, token_mask)
        return h, state, out

    def _layer(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: Cache | None,
        router_state: torch.Tensor | None,
        router_cell: RecurrentCell | None,
        router_shared: nn.Module | None,
        token_mask: torch.Tensor | None,
        compute_losses: bool,
        record_load: bool,
    ):
        """`forward`'s computation (what a layer checkpoint recomputes), positional arguments;
        `record_load`: let the MoE block record its expert loads."""
        h = h + self.drop(self.attn(self.input_norm(h), cos, sin, attn_mask, cache))
        x = self.ffn_norm(h)
        if not self.is_moe:
            return h + self.drop(self.mlp(x)), router_state, None
        out = self.moe(
            x,
            state=router_state,
            cell=router_cell,
            token_mask=token_mask,
            compute_losses=compute_losses,
            shared=router_shared,
            record_load=record_load,
        )
        return h + self.drop(out.hidden), out.routing.state, out


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class RMoEPreTrainedModel(PreTrainedModel):
    """Weight initialisation and transformers plumbing shared by the rmoe models."""

    config_class = RMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # the "layer" mode, see DecoderLayer
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True
    # the aux-loss-free expert bias stays float32 when loading in another dtype (buffer name)
    _keep_in_fp32_modules_strict = ["expert_bias"]

    def _init_weights(self, module: nn.Module) -> None:
        """Documented in `RMoEConfig.initializer_range`."""
        self._init_module(module, _init, None)

    def _init_module(self, module: nn.Module, ops, generator: torch.Generator | None) -> None:
        """Initialise `module`'s own parameters with the init functions `ops` (torch.nn.init or
        transformers.initialization), drawing from `generator` (None = the global RNG).

        A module that owns parameters itself (experts, norms, the recurrent cell, cosine
        scorers, residual output projections) says how in its `init_parameters(ops, std,
        std_out, generator)`; plain nn.Linear / nn.Embedding get N(0, std) (and zero biases).
        std = initializer_range, std_out = std / sqrt(2 * num_hidden_layers).
        """
        cfg = self.config
        std = cfg.initializer_range
        std_out = std / math.sqrt(2 * cfg.num_hidden_layers)
        own = getattr(module, "init_parameters", None)
        if own is not None:
            own(ops, std, std_out, generator=generator)
        elif isinstance(module, nn.Linear):
            ops.normal_(module.weight, mean=0.0, std=std, generator=generator)
            if module.bias is not None:
                ops.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            ops.normal_(module.weight, mean=0.0, std=std, generator=generator)

    @property
    def gw_policy(self) -> GWPolicy:
        """The GW-MoE policy the MoE blocks use now (the config's unless `set_gw_policy`)."""
        for module in self.modules():
            if isinstance(module, MoEBlock):
                return module.gw_policy
        return GWPolicy.from_config(self.config)

    def set_gw_policy(self, policy: GWPolicy | None) -> None:
        """Use `policy` for GW-MoE in every MoE block; None = back to the config's policy.

        The config is not touched (a saved config stays as it was)."""
        if policy is None:
            policy = GWPolicy.from_config(self.config)
        if not isinstance(policy, GWPolicy):
            raise ValueError(f"set_gw_policy takes a GWPolicy or None, got {policy!r}")
        for module in self.modules():
            if isinstance(module, MoEBlock):
                module.gw_policy = policy

    @torch.no_grad()
    def init_weights_seeded(self, seed: int) -> None:
        """Re-initialise every weight from two private random streams: one for the routers
        (router modules and the shared recurrent cell), one for everything else, each consumed
        in module-name order. Models that differ only in the router therefore get identical
        non-router weights for the same seed, whatever their routers draw."""
        g_main = torch.Generator().manual_seed(int(seed))
        g_router = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919)
        for name, module in self.named_modules():
            is_router = any(f".{r}." in f".{name}." for r in ROUTER_PARTS)
            device_ok = all(p.device.type == "cpu" for p in module.parameters(recurse=False))
            if not device_ok:
                raise ValueError(
                    "init_weights_seeded must run before the model is moved to a device"
                )
            self._init_module(module, nn.init, g_router if is_router else g_main)
        if self.config.tie_word_embeddings and hasattr(self, "tie_weights"):
            self.tie_weights()


class RMoEModel(RMoEPreTrainedModel):
    """Embeddings, the decoder stack with the shared recurrent router cell, the final norm."""

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # ONE cell shared by every MoE layer's router (None unless router_type="recurrent"),
        # and the router module every layer shares (Omni-Router's weight, S-proj), or None.
        self.router_cell = build_router_cell(config)
        self.router_shared = build_shared_router(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_routing: bool = False,
        output_hidden_states: bool | None = None,
        compute_router_losses: bool | None = None,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> RMoEModelOutput:
        """Run the decoder.

        Args:
            input_ids: [B, T] token ids (or `inputs_embeds` [B, T, D]).
            attention_mask: [B, S] 1 for real tokens, 0 for padding (S = past + T), or None.
            position_ids: [B, T]; default: from the attention mask, else past + arange(T).
            cache / past_key_values: a transformers `Cache` (either name).
            use_cache: create and fill a `DynamicCache` when none is given.
            output_router_logits: return every MoE layer's logits [N, E].
            output_routing: return every MoE layer's `RoutingResult` (probabilities, chosen
                experts, weights, router state) — for analysis; costs nothing extra otherwise.
            output_hidden_states: return the hidden state entering each layer and the final one.
            compute_router_losses: compute aux/z losses (default: in training mode).
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        output_router_logits = (
            cfg.output_router_logits if output_router_logits is None else output_router_logits
        )
        if compute_router_losses is None:
            compute_router_losses = self.training
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = h.shape
        past = cache.get_seq_length() if cache is not None else 0

        position_ids, attn_mask, token_mask = _positions_and_masks(
            attention_mask, position_ids, b, t, past, h.device
        )
        scaled = rope_frequencies(cfg, position_ids)
        if scaled is None:
            cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)
        else:
            cos, sin = scaled_rope_cos_sin(position_ids, *scaled, h.dtype)

        state = None  # h_0 = 0: the first MoE layer's router starts from zeros
        hidden_states = [] if output_hidden_states else None
        moe_outs = []
        for layer in self.layers:
            if hidden_states is not None:
                hidden_states.append(h)
            h, state, moe_out = layer(
                h,
                cos=cos,
                sin=sin,
                attn_mask=attn_mask,
                cache=cache,
                router_state=state,
                router_cell=self.router_cell,
                router_shared=self.router_shared,
                token_mask=token_mask,
                compute_losses=compute_router_losses,
            )
            if moe_out is not None:
                moe_outs.append(moe_out)
        h = self.norm(h)
        if hidden_states is not None:
            hidden_states.append(h)

        aux = z = None
        if compute_router_losses and moe_outs:
            aux = torch.stack([o.aux_loss for o in moe_outs]).mean()
            z = torch.stack([o.z_loss for o in moe_outs]).mean()
        return RMoEModelOutput(
            last_hidden_state=h,
            **{_CACHE_FIELD: cache},
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            router_logits=tuple(o.routing.logits for o in moe_outs)
            if output_router_logits
            else None,
            routing=tuple(o.routing for o in moe_outs) if output_routing else None,
            aux_loss=aux,
            z_loss=z,
            gw_tokens=sum(o.gw_tokens for o in moe_outs),
        )


class RMoEForCausalLM(RMoEPreTrainedModel, GenerationMixin):
    """`RMoEModel` with a language-modelling head; works with `generate` and the Auto classes."""

    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_V5 else ["lm_head.weight"]
    )
    # `loss` is a mean per micro-batch (no `num_items_in_batch`): transformers' Trainer must
    # divide it by the accumulation steps itself, which it skips for models whose forward
    # takes **kwargs unless told otherwise.
    accepts_loss_kwargs = False

    def __init__(self, config: RMoEConfig) -> None:
        super().__init__(config)
        self.model = RMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_routing: bool = False,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> RMoECausalLMOutput:
        """Logits, and the loss when `labels` [B, T] are given (shifted inside, -100 ignored,
        transformers' convention). Router losses (`aux_loss`, `z_loss`) are computed in
        training, with labels, or when router logits are requested, but `loss` includes them
        (`lm_loss + aux_coef * aux + z_coef * z`) only in training mode: in eval mode `loss`
        is the LM loss, so an `eval_loss` (transformers' Trainer) gives the true perplexity.
        See `RMoEModel.forward` for the other arguments. `logits_to_keep` > 0 computes logits
        for the last that many positions only."""
        cfg = self.config
        want_router = (
            cfg.output_router_logits if output_router_logits is None else output_router_logits
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=want_router,
            output_routing=output_routing,
            output_hidden_states=output_hidden_states,
            compute_router_losses=self.training or labels is not None or want_router,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)

        loss = lm_loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            shift_labels = labels[:, 1:].to(logits.device)
            lm_loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
            )
            loss = lm_loss
            if self.training:  # router losses join the loss in training only (see docstring)
                z = out.z_loss if out.aux_loss is not None else None
                loss = training_loss(
                    lm_loss, out.aux_loss, z, cfg.router_aux_loss_coef, cfg.router_z_loss_coef
                )
        return RMoECausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=out.aux_loss,
            z_loss=out.z_loss,
            logits=logits,
            **{_CACHE_FIELD: out[_CACHE_FIELD] if _CACHE_FIELD in out else None},
            hidden_states=out.hidden_states,
            router_logits=out.router_logits,
            routing=out.routing,
            gw_tokens=out.gw_tokens,
        )
