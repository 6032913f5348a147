"""Expert matrices in the canonical [E, F, D] orientation: reading them from any supported
layout, writing them back, and running every expert on every token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MATRIX_TYPES: tuple[str, ...] = ("act", "up", "down")
"""Canonical expert matrix names: act = gate_proj (W_act, Mixtral w1), up (w3), down (w2)."""

# Per-expert module names: (act, up, down).
_EXPERT_LINEAR_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


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
            "fused_transposed" ([E, D, 2F]), "separate" (gate/up/down 3-D tensors) or
            "modules" (one MLP module per expert).
    """

    act: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    shared: dict[str, torch.Tensor] | None = None
    layout: str = "separate"

    def as_dict(self) -> dict[str, torch.Tensor]:
        """{"act": [E, F, D], "up": [E, F, D], "down": [E, F, D]}."""
        return {"act": self.act, "up": self.up, "down": self.down}

    @property
    def num_experts(self) -> int:
        """E."""
        return int(self.act.shape[0])


def expert_forward(
    x: torch.Tensor,
    weights: ExpertWeights,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    experts: Sequence[int] | None = None,
    with_activations: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run every (or the listed) expert on every token, unweighted.

    E_n(x) = down_n(act_fn(act_n x) ⊙ up_n x), computed as batched matmuls in float32.

    Args:
        x: [N, D] MoE inputs.
        weights: the layer's :class:`ExpertWeights`.
        act_fn: the activation (SiLU for all supported families).
        experts: indices to run (default: all E).
        with_activations: also return a_n(x) = act_fn(act_n x).

    Returns:
        (outputs [E', N, D], activations [E', N, F] or None), E' = number of experts run.
    """
    sel = slice(None) if experts is None else torch.as_tensor(list(experts), dtype=torch.long)
    act, up, down = (w[sel].float() for w in (weights.act, weights.up, weights.down))
    xf = x.float().to(act.device)
    a = act_fn(torch.einsum("nd,efd->enf", xf, act))
    h = a * torch.einsum("nd,efd->enf", xf, up)
    out = torch.einsum("enf,efd->end", h, down)
    return out, (a if with_activations else None)


def _find_linear_triplet(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    for names in _EXPERT_LINEAR_NAMES:
        mods = [getattr(module, n, None) for n in names]
        if all(isinstance(m, nn.Module) and hasattr(m, "weight") for m in mods):
            return mods[0], mods[1], mods[2]
    return None


def _read_experts(experts: nn.Module, hidden_size: int) -> ExpertWeights:
    """Canonical [E, F, D] matrices from any supported expert container."""
    with torch.no_grad():
        gate_up = getattr(experts, "gate_up_proj", None)
        if isinstance(gate_up, torch.Tensor) and gate_up.ndim == 3:
            down = experts.down_proj
            if gate_up.shape[2] == hidden_size:  # [E, 2F, D], gate half first
                act, up = gate_up.detach().chunk(2, dim=1)
                return ExpertWeights(act, up, down.detach().transpose(1, 2), layout="fused")
            if gate_up.shape[1] == hidden_size:  # [E, D, 2F]; down already [E, F, D]
                act, up = gate_up.detach().chunk(2, dim=2)
                return ExpertWeights(
                    act.transpose(1, 2), up.transpose(1, 2), down.detach(), "fused_transposed"
                )
            raise ValueError(
                f"experts.gate_up_proj has shape {tuple(gate_up.shape)}, which matches neither "
                f"[E, 2F, D] nor [E, D, 2F] for D = {hidden_size}"
            )
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


def _write_experts(experts: nn.Module, w: ExpertWeights, layout: str) -> None:
    """Copy canonical matrices back into the model's own layout (inverse of _read_experts)."""
    with torch.no_grad():
        if layout == "fused":
            experts.gate_up_proj.copy_(torch.cat([w.act, w.up], dim=1))
            experts.down_proj.copy_(w.down.transpose(1, 2))
        elif layout == "fused_transposed":
            experts.gate_up_proj.copy_(torch.cat([w.act, w.up], dim=1).transpose(1, 2))
            experts.down_proj.copy_(w.down)
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
    """{"act", "up", "down"} -> [F_s, D] from a dense SwiGLU MLP, or None."""
    if module is None:
        return None
    trip = _find_linear_triplet(module)
    if trip is None:
        return None
    act, up, down = trip
    return {"act": act.weight.detach(), "up": up.weight.detach(), "down": down.weight.detach().T}
