"""Expert matrices in the canonical [E, F, D] orientation: reading them from any supported
layout, writing them back, the expert's gated unit (:class:`GLU`), and running every expert
on every token (:func:`expert_forward`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

MATRIX_TYPES: tuple[str, ...] = ("act", "up", "down")
"""Canonical expert matrix names: act = gate_proj (W_act, Mixtral w1), up (w3), down (w2)."""

BIAS_TYPES: tuple[str, ...] = ("act_bias", "up_bias", "down_bias")
"""Canonical expert bias names (GPT-OSS): [E, F], [E, F] and [E, D]."""

# Per-expert module names: (act, up, down).
_EXPERT_LINEAR_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# Dense MLPs whose gate and up projections are one linear [2F, D], gate half first: (in, out).
_FUSED_MLP_NAMES = (("input_linear", "output_linear"), ("gate_up_proj", "down_proj"))


# --------------------------------------------------------------------------------------------
# the expert function
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GLU:
    """The gated unit between an expert's two input projections and its down projection.

    With g = W_act x (+ b_act) and u = W_up x (+ b_up), both [..., F]::

        a = act_fn(min(g, limit))                   (no clamp when ``limit`` is None)
        h = a * (clamp(u, -limit, limit) + up_offset)

    SwiGLU (Mixtral, Qwen, DeepSeek, ...) is ``GLU(F.silu)``; GPT-OSS is
    ``GLU(alpha_silu(1.702), limit=7.0, up_offset=1.0)``.

    Attributes:
        act_fn: the activation of the gate branch.
        limit: clamp of the pre-activations (gate from above, up on both sides), or None.
        up_offset: added to the (clamped) up branch (GPT-OSS: 1).
        name: short description for reports.
    """

    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu
    limit: float | None = None
    up_offset: float = 0.0
    name: str = field(default="swiglu", compare=False)

    def __call__(self, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, a) from gate and up pre-activations g, u [..., F]; both [..., F]."""
        if self.limit is not None:
            g = g.clamp(max=self.limit)
            u = u.clamp(min=-self.limit, max=self.limit)
        a = self.act_fn(g)
        return a * (u + self.up_offset if self.up_offset else u), a

    def describe(self) -> str:
        """E.g. "swiglu" or "alpha-silu GLU (limit 7, up + 1)"."""
        extras = []
        if self.limit is not None:
            extras.append(f"limit {self.limit:g}")
        if self.up_offset:
            extras.append(f"up + {self.up_offset:g}")
        return self.name + (f" ({', '.join(extras)})" if extras else "")


def alpha_silu(alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """g -> g * sigmoid(alpha * g) (GPT-OSS's gate activation; alpha = 1 is SiLU)."""

    def act(g: torch.Tensor) -> torch.Tensor:
        return g * torch.sigmoid(alpha * g)

    return act


# --------------------------------------------------------------------------------------------
# expert matrices
# --------------------------------------------------------------------------------------------


@dataclass
class ExpertWeights:
    """One MoE layer's expert matrices in the canonical orientation (one row per neuron).

    Attributes:
        act: [E, F, D] gate projection (W_act; ``gate_proj``, Mixtral ``w1``).
        up: [E, F, D] up projection (``up_proj``, ``w3``).
        down: [E, F, D] down projection transposed (``down_proj``, ``w2``, stored as [E, D, F]).
        shared: {"act", "up", "down"} -> [F_s, D] for the layer's shared expert(s) (the
            concatenation of all shared experts, as the models run them), or None.
        layout: how the model stores them: "fused" (gate_up_proj [E, 2F, D]),
            "fused_transposed" ([E, D, 2F]), either with "_interleaved" (gate and up columns
            alternate, GPT-OSS), "separate" (gate/up/down 3-D tensors), "modules" (one MLP
            module per expert), or a family's own ("dbrx", "jetmoe").
        act_bias, up_bias: [E, F] biases of the gate and up projections, or None.
        down_bias: [E, D] bias of the down projection, or None.
    """

    act: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    shared: dict[str, torch.Tensor] | None = None
    layout: str = "separate"
    act_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        """{"act": [E, F, D], "up": [E, F, D], "down": [E, F, D]}."""
        return {"act": self.act, "up": self.up, "down": self.down}

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.act.shape[0])

    @property
    def has_bias(self) -> bool:
        """True when any projection has a bias."""
        return any(getattr(self, b) is not None for b in BIAS_TYPES)

    def to(self, dtype: torch.dtype) -> ExpertWeights:
        """Detached copies of every matrix, bias and shared matrix in ``dtype``."""

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype)

        return ExpertWeights(
            *(cast(getattr(self, t)) for t in MATRIX_TYPES),  # type: ignore[misc]
            shared=None if self.shared is None else {k: cast(v) for k, v in self.shared.items()},  # type: ignore[misc]
            layout=self.layout,
            **{b: cast(getattr(self, b)) for b in BIAS_TYPES},
        )


def expert_forward(
    x: torch.Tensor,
    weights: ExpertWeights,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    experts: Sequence[int] | None = None,
    with_activations: bool = False,
    glu: GLU | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run every (or the listed) expert on every token, unweighted.

    E_n(x) = down_n h + b_down with (h, a) = glu(act_n x + b_act, up_n x + b_up); for the
    default ``glu`` (SwiGLU with ``act_fn``) this is down_n(act_fn(act_n x) ⊙ up_n x). Batched
    matmuls in float32; biases only where ``weights`` has them.

    Args:
        x: [N, D] MoE inputs.
        weights: the layer's :class:`ExpertWeights`.
        act_fn: the gate activation of the default SwiGLU (ignored when ``glu`` is given).
        experts: indices to run (default: all E).
        with_activations: also return the gate activations a_n(x).
        glu: the family's gated unit (:class:`GLU`); default ``GLU(act_fn)``.

    Returns:
        (outputs [E', N, D], activations [E', N, F] or None), E' = number of experts run.
    """
    unit = glu if glu is not None else GLU(act_fn)
    sel = slice(None) if experts is None else torch.as_tensor(list(experts), dtype=torch.long)
    act, up, down = (w[sel].float() for w in (weights.act, weights.up, weights.down))
    xf = x.float().to(act.device)
    g = torch.einsum("nd,efd->enf", xf, act)
    u = torch.einsum("nd,efd->enf", xf, up)
    if weights.act_bias is not None:
        g = g + weights.act_bias[sel].float()[:, None, :]
    if weights.up_bias is not None:
        u = u + weights.up_bias[sel].float()[:, None, :]
    h, a = unit(g, u)
    out = torch.einsum("enf,efd->end", h, down)
    if weights.down_bias is not None:
        out = out + weights.down_bias[sel].float()[:, None, :]
    return out, (a if with_activations else None)


# --------------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------------


def _find_linear_triplet(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    for names in _EXPERT_LINEAR_NAMES:
        mods = [getattr(module, n, None) for n in names]
        if all(isinstance(m, nn.Module) and hasattr(m, "weight") for m in mods):
            return mods[0], mods[1], mods[2]
    return None


def _fused_is_transposed(gate_up: torch.Tensor, hidden_size: int, hint: bool | None) -> bool:
    """Whether a fused gate_up tensor is [E, D, 2F] (True) or [E, 2F, D] (False)."""
    if hint is not None:
        return bool(hint)
    if gate_up.shape[2] == hidden_size:
        return False
    if gate_up.shape[1] == hidden_size:
        return True
    raise ValueError(
        f"experts.gate_up_proj has shape {tuple(gate_up.shape)}, which matches neither "
        f"[E, 2F, D] nor [E, D, 2F] for D = {hidden_size}"
    )


def _split_gate_up(t: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, 2F, ...] -> (gate, up) [E, F, ...]: halves, or alternating rows when interleaved."""
    return (t[:, 0::2], t[:, 1::2]) if interleaved else tuple(t.chunk(2, dim=1))  # type: ignore[return-value]


def _join_gate_up(act: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Inverse of :func:`_split_gate_up`: (gate, up) [E, F, ...] -> [E, 2F, ...]."""
    if not interleaved:
        return torch.cat([act, up], dim=1)
    return torch.stack([act, up], dim=2).reshape(act.shape[0], -1, *act.shape[2:])


def _read_fused(experts: nn.Module, hidden_size: int, transposed: bool | None) -> ExpertWeights:
    """The transformers-5 experts interface: ``gate_up_proj`` ([E, 2F, D], or [E, D, 2F] when
    ``is_transposed``; gate/up halves, or alternating when not ``is_concatenated``),
    ``down_proj`` ([E, D, F] or [E, F, D]) and optional ``*_bias`` tensors."""
    if getattr(experts, "has_gate", True) is False:
        raise ValueError(
            f"{type(experts).__name__} has non-gated experts (up and down projections only); "
            "the analyses need gated (act/up/down) experts"
        )
    gate_up = experts.gate_up_proj.detach()
    t = _fused_is_transposed(gate_up, hidden_size, getattr(experts, "is_transposed", transposed))
    interleaved = getattr(experts, "is_concatenated", True) is False
    act, up = _split_gate_up(gate_up.transpose(1, 2) if t else gate_up, interleaved)
    down = experts.down_proj.detach()
    w = ExpertWeights(act, up, down if t else down.transpose(1, 2))
    w.layout = "fused" + ("_transposed" if t else "") + ("_interleaved" if interleaved else "")
    bias = getattr(experts, "gate_up_proj_bias", None)
    if isinstance(bias, torch.Tensor):
        w.act_bias, w.up_bias = _split_gate_up(bias.detach(), interleaved)
    bias = getattr(experts, "down_proj_bias", None)
    if isinstance(bias, torch.Tensor):
        w.down_bias = bias.detach()
    if w.act.shape[2] != hidden_size or w.down.shape != w.act.shape:
        raise ValueError(
            f"experts.gate_up_proj {tuple(gate_up.shape)} and down_proj "
            f"{tuple(experts.down_proj.shape)} do not give [E, F, D] matrices for D = {hidden_size}"
        )
    return w


def _read_experts(
    experts: nn.Module, hidden_size: int, transposed: bool | None = None
) -> ExpertWeights:
    """Canonical [E, F, D] matrices from any supported expert container (``transposed``: the
    fused layout's orientation when the container does not say, None = from the shapes)."""
    with torch.no_grad():
        gate_up = getattr(experts, "gate_up_proj", None)
        if isinstance(gate_up, torch.Tensor) and gate_up.ndim == 3:
            return _read_fused(experts, hidden_size, transposed)
        gate = getattr(experts, "gate_proj", None)
        if isinstance(gate, torch.Tensor) and gate.ndim == 3:  # rmoe: [E, F, D], down [E, D, F]
            return ExpertWeights(
                gate.detach(),
                experts.up_proj.detach(),
                experts.down_proj.detach().transpose(1, 2),
                layout="separate",
            )
        if isinstance(experts, (nn.ModuleList, list, tuple)) or hasattr(experts, "__iter__"):
            triplets = [_find_linear_triplet(m) for m in experts]
            if triplets and all(t is not None for t in triplets):
                act = torch.stack([t[0].weight.detach() for t in triplets])
                up = torch.stack([t[1].weight.detach() for t in triplets])
                down = torch.stack([t[2].weight.detach().T for t in triplets])
                return ExpertWeights(act, up, down, layout="modules")
    raise ValueError(
        f"cannot read expert weights from {type(experts).__name__}: expected fused "
        "gate_up_proj/down_proj tensors, 3-D gate_proj/up_proj/down_proj tensors, or a list of "
        "MLPs with gate_proj/up_proj/down_proj (or w1/w3/w2) linears"
    )


def _write_fused(experts: nn.Module, w: ExpertWeights, layout: str) -> None:
    """Inverse of :func:`_read_fused` (biases only where both sides have them)."""
    interleaved = "interleaved" in layout
    gate_up = _join_gate_up(w.act, w.up, interleaved)
    transposed = "transposed" in layout
    experts.gate_up_proj.copy_(gate_up.transpose(1, 2) if transposed else gate_up)
    experts.down_proj.copy_(w.down if transposed else w.down.transpose(1, 2))
    if w.act_bias is not None and w.up_bias is not None:
        if isinstance(getattr(experts, "gate_up_proj_bias", None), torch.Tensor):
            experts.gate_up_proj_bias.copy_(_join_gate_up(w.act_bias, w.up_bias, interleaved))
    if w.down_bias is not None and isinstance(
        getattr(experts, "down_proj_bias", None), torch.Tensor
    ):
        experts.down_proj_bias.copy_(w.down_bias)


def _write_experts(experts: nn.Module, w: ExpertWeights, layout: str) -> None:
    """Copy canonical matrices back into the model's own layout (inverse of _read_experts)."""
    with torch.no_grad():
        if layout.startswith("fused"):
            _write_fused(experts, w, layout)
        elif layout == "separate":
            experts.gate_proj.copy_(w.act)
            experts.up_proj.copy_(w.up)
            experts.down_proj.copy_(w.down.transpose(1, 2))
        elif layout == "modules":
            for e, module in enumerate(experts):
                act, up, down = _find_linear_triplet(module)  # type: ignore[misc]
                act.weight.copy_(w.act[e])
                up.weight.copy_(w.up[e])
                down.weight.copy_(w.down[e].T)
        else:  # pragma: no cover - layouts come from _read_experts
            raise ValueError(f"unknown expert layout {layout!r}")


def _read_mlp(module: nn.Module | None) -> dict[str, torch.Tensor] | None:
    """{"act", "up", "down"} -> [F_s, D] from a dense gated MLP (separate gate/up/down
    linears, or one fused gate-up linear [2F_s, D], gate half first), or None."""
    if module is None:
        return None
    trip = _find_linear_triplet(module)
    if trip is not None:
        act, up, down = trip
        return {
            "act": act.weight.detach(),
            "up": up.weight.detach(),
            "down": down.weight.detach().T,
        }
    for fused, out in _FUSED_MLP_NAMES:
        a, b = getattr(module, fused, None), getattr(module, out, None)
        if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
            act, up = a.weight.detach().chunk(2, dim=0)
            return {"act": act, "up": up, "down": b.weight.detach().T}
    return None
