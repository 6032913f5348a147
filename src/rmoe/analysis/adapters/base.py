"""The adapter interface over one model's MoE layers (:class:`MoEAdapter`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rmoe.analysis.adapters.capture import MoELayer, RoutingCapture
from rmoe.analysis.adapters.spec import (
    RoutingDecision,
    RoutingSpec,
    route,
)
from rmoe.analysis.adapters.weights import (
    BIAS_TYPES,
    GLU,
    MATRIX_TYPES,
    ExpertWeights,
    _read_experts,
    _read_mlp,
    _write_experts,
    expert_forward,
)

# Names under which the experts interface passes (hidden_states, top_k_index, top_k_weights).
_DISPATCH_KWARGS = (
    ("hidden_states", "x"),
    ("top_k_index", "router_indices", "selected_experts", "topk_indices"),
    ("top_k_weights", "routing_weights", "router_scores", "topk_weights"),
)

# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The decoder layers: ``model.model.layers``, ``model.layers`` or (DBRX)
    ``model.transformer.blocks``."""
    for owner, name in ((getattr(model, "model", None), "layers"), (model, "layers")):
        layers = getattr(owner, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    blocks = getattr(getattr(model, "transformer", None), "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return blocks
    raise ValueError(
        f"{type(model).__name__} has no decoder layers at model.model.layers or model.layers; "
        "pass a causal LM such as MixtralForCausalLM or RMoEForCausalLM"
    )


class MoEAdapter:
    """Base adapter. Subclasses set :attr:`family` and implement :meth:`_find_layers`,
    :meth:`_spec` and, if their router does not return ``(logits, weights, indices)``,
    :meth:`parse_router_output`; a family whose experts are not SwiGLU overrides
    :meth:`_glu`, one with its own expert layout :meth:`_read_expert_weights` and
    :meth:`_write_expert_weights`."""

    family: str = ""
    """The family's name: the ``model_type`` it was chosen for when the class serves several."""
    model_types: ClassVar[tuple[str, ...]] = ()
    experts_transposed: ClassVar[bool | None] = None
    """Orientation of a fused ``gate_up_proj`` the experts module does not declare
    (``is_transposed``): True = [E, D, 2F], False = [E, 2F, D], None = from the shapes."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        model_type = getattr(self.config, "model_type", None)
        if model_type in self.model_types:
            self.family = str(model_type)
        self.hidden_size = int(self.config.hidden_size)
        self.layers: list[MoELayer] = self._find_layers()
        if not self.layers:
            raise ValueError(
                f"found no MoE layers in {type(model).__name__} ({self.family}); every decoder "
                "layer is dense"
            )
        self.spec: RoutingSpec = self._spec()
        self.act_fn: Callable[[torch.Tensor], torch.Tensor] = self._act_fn()
        self.glu: GLU = self._glu()
        self._layouts: dict[int, str] = {}

    # -- to implement ----------------------------------------------------------------------
    def _find_layers(self) -> list[MoELayer]:
        raise NotImplementedError

    def _spec(self) -> RoutingSpec:
        raise NotImplementedError

    def _act_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return F.silu

    def _glu(self) -> GLU:
        """The experts' gated unit: SwiGLU with :attr:`act_fn` unless a family says otherwise."""
        return GLU(self.act_fn)

    def _read_expert_weights(self, layer: MoELayer) -> ExpertWeights:
        """Canonical routed-expert matrices of one layer (shared experts are added after)."""
        return _read_experts(layer.experts, self.hidden_size, self.experts_transposed)

    def _write_expert_weights(self, layer: MoELayer, weights: ExpertWeights, layout: str) -> None:
        """Inverse of :meth:`_read_expert_weights`."""
        _write_experts(layer.experts, weights, layout)

    # -- public interface ------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of MoE layers L."""
        return len(self.layers)

    @property
    def layer_indices(self) -> list[int]:
        """Decoder-layer index of each MoE layer."""
        return [layer.layer_index for layer in self.layers]

    def _layer(self, i: int) -> MoELayer:
        if not 0 <= i < self.num_layers:
            raise ValueError(f"MoE layer {i} is out of range; this model has {self.num_layers}")
        return self.layers[i]

    def router_weight(self, i: int) -> torch.Tensor:
        """[E, R] the rows that score the experts at MoE layer ``i`` (see ``router_space``)."""
        return self._layer(i).router.weight.detach()

    def router_bias(self, i: int) -> torch.Tensor | None:
        """[E] the bias of the router's linear map (GPT-OSS), else None."""
        return None

    def score_correction_bias(self, i: int) -> torch.Tensor | None:
        """[E] the selection bias of MoE layer ``i`` (DeepSeek-V3), else None."""
        b = getattr(self._layer(i).router, "e_score_correction_bias", None)
        return b.detach().float() if isinstance(b, torch.Tensor) else None

    def router_logits(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """[N, E] float32 router logits of MoE inputs x [N, D] (linear routers)."""
        w, b = self.router_weight(i), self.router_bias(i)
        x = x.reshape(-1, x.shape[-1]).float()
        return F.linear(x, w.float(), None if b is None else b.float().to(w.device))

    def route(self, i: int, logits: torch.Tensor) -> RoutingDecision:
        """:func:`route` with this model's spec and layer ``i``'s bias."""
        return route(logits, self.spec, self.score_correction_bias(i))

    def expert_weights(self, i: int) -> ExpertWeights:
        """Canonical expert matrices of MoE layer ``i`` (views of the model's weights: do not
        modify in place; use :meth:`set_expert_weights`)."""
        layer = self._layer(i)
        w = self._read_expert_weights(layer)
        w.shared = _read_mlp(layer.shared)
        self._layouts[i] = w.layout
        return w

    def set_expert_weights(self, i: int, weights: ExpertWeights) -> None:
        """Write canonical matrices back into the model's own layout at MoE layer ``i``."""
        current = self.expert_weights(i)
        for name in MATRIX_TYPES:
            got, want = getattr(weights, name).shape, getattr(current, name).shape
            if got != want:
                raise ValueError(f"{name} has shape {tuple(got)}; layer {i} needs {tuple(want)}")
        self._write_expert_weights(self._layer(i), weights, current.layout)

    def expert_outputs(
        self,
        i: int,
        x: torch.Tensor,
        with_activations: bool = False,
        weights: ExpertWeights | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every routed expert of MoE layer ``i`` on inputs x [N, D], computed with this
        family's expert function (:attr:`glu`, biases): outputs [E, N, D] and, if asked, gate
        activations [E, N, F] (see :func:`expert_forward`).

        ``weights`` replaces the model's matrices; when it carries no biases (a copy of the
        matrices alone) the model's own biases are used, so the result is still the model's
        expert function."""
        w = weights if weights is not None else self.expert_weights(i)
        if weights is not None and not weights.has_bias:
            own = self._read_expert_weights(self._layer(i))
            if own.has_bias:
                w = ExpertWeights(
                    w.act, w.up, w.down, w.shared, w.layout, *(getattr(own, b) for b in BIAS_TYPES)
                )
        with torch.no_grad():
            return expert_forward(x, w, with_activations=with_activations, glu=self.glu)

    def parse_experts_input(
        self, i: int, args: tuple, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden_states [N, D], top_k_index [N, K], top_k_weights [N, K]) from a call of
        MoE layer ``i``'s experts module (the transformers-5 experts interface)."""
        found = list(args[:3])
        for names in _DISPATCH_KWARGS[len(found) :]:
            found.append(next((kwargs[n] for n in names if n in kwargs), None))
        if any(not isinstance(t, torch.Tensor) for t in found):
            raise ValueError(
                f"the experts module of MoE layer {i} was called without (hidden_states, "
                "top_k_index, top_k_weights); this family does not use the experts interface"
            )
        x, idx, weight = found
        return x, idx.reshape(-1, idx.shape[-1]), weight.reshape(-1, idx.shape[-1])

    def parse_router_output(
        self, i: int, output: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(logits [N, E], chosen indices [N, K] or None, weights [N, K] or None) from what the
        router module returned."""
        if isinstance(output, torch.Tensor):
            return output, None, None
        if isinstance(output, (tuple, list)) and len(output) >= 3:
            return output[0], output[2], output[1]
        raise ValueError(
            f"router of MoE layer {i} returned {type(output).__name__}; expected logits or "
            "(logits, weights, indices)"
        )

    def parse_dropped(self, i: int, output: Any) -> torch.Tensor | None:
        """[N, K] bool, True for the assignments a capacity limit dropped (same order as the
        indices of :meth:`parse_router_output`), or None for a dropless router."""
        return None

    def router_parameters(self, i: int) -> list[nn.Parameter]:
        """Trainable parameters of MoE layer ``i``'s router."""
        return [p for p in self._layer(i).router.parameters() if p.requires_grad]

    def shared_router_parameters(self) -> list[nn.Parameter]:
        """Trainable router parameters shared by all layers (rmoe's recurrent cell or shared
        router module), else []."""
        return []

    def capture(self, store_inputs: int = 0, store_outputs: bool = False) -> RoutingCapture:
        """A :class:`RoutingCapture` for this model (use with ``with``)."""
        return RoutingCapture(self, store_inputs, store_outputs)

    def describe(self) -> dict:
        """JSON-ready summary: family, layers, spec, expert shapes and layout."""
        w = self.expert_weights(0)
        return {
            "family": self.family,
            "model_type": getattr(self.config, "model_type", None),
            "num_moe_layers": self.num_layers,
            "moe_layer_indices": self.layer_indices,
            "routing": self.spec.to_dict(),
            "expert_shape": {"E": w.num_experts, "F": int(w.act.shape[1]), "D": self.hidden_size},
            "shared_expert_width": None if w.shared is None else int(w.shared["act"].shape[0]),
            "expert_layout": w.layout,
            "expert_function": self.glu.describe(),
            "expert_biases": w.has_bias,
            "router_space": self.layers[0].router_space,
        }
