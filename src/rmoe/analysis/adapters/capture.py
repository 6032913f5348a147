"""References to a model's MoE layers and the forward-hook capture of their routing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rmoe.analysis.adapters.spec import (
    RoutingSpec,
    _normalise,
    _scores,
    _selection_scores,
    route,
)
from rmoe.analysis.adapters.weights import ExpertWeights

if TYPE_CHECKING:
    from rmoe.analysis.adapters.base import MoEAdapter


# --------------------------------------------------------------------------------------------
# layers and capture
# --------------------------------------------------------------------------------------------


@dataclass
class MoELayer:
    """References to one MoE layer's modules.

    Attributes:
        index: position among the model's MoE layers (0-based).
        layer_index: index of the decoder layer that holds it.
        block: the MoE block (its input is the normalised FFN input x [B, T, D]).
        router: the module that scores the experts (forward hooks go here).
        experts: the routed-experts container.
        shared: the shared-expert MLP, or None.
        shared_gate: the shared expert's gate (Qwen2-MoE), or None.
        router_space: what the router rows live in ("model width D", "router state P", ...).
        capture_at: where the capture reads the model's choice of experts: "router" (its
            output, or :func:`route` of its logits) or "experts" (the transformers-5 experts
            interface: a pre-hook on ``experts`` sees ``(hidden_states [N, D], top_k_index
            [N, K], top_k_weights [N, K])`` exactly as the model dispatches them).
    """

    index: int
    layer_index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None = None
    shared_gate: nn.Module | None = None
    router_space: str = "model width D"
    capture_at: str = "router"


@dataclass
class LayerCapture:
    """What :class:`RoutingCapture` recorded for one MoE layer, tokens concatenated in order.

    Attributes:
        layer: MoE layer index; ``layer_index``: its decoder layer.
        logits: [N, E] float32 router logits.
        topk_idx: [N, K] int64 the experts the model chose, highest selection score first.
        topk_weight: [N, K] float32 the model's combine weights, same order (Llama 4: the scales
            of the expert inputs, see :attr:`RoutingSpec.weights_scale`).
        inputs: [n, D] float32 MoE inputs of the first n tokens (``store_inputs``), or None.
        expert_outputs: [E, n, D] every expert's unweighted output on ``inputs``, or None.
        activations: [E, n, F] intermediate activations act_fn(W_act x) on ``inputs``, or None.
        dropped: [N, K] bool, True for the assignments (same order as ``topk_idx``) that a
            capacity limit dropped (their combine weight is 0); None for a dropless router.
    """

    layer: int
    layer_index: int
    spec: RoutingSpec = field(repr=False)
    bias: torch.Tensor | None = field(repr=False)
    logits: torch.Tensor = field(repr=False)
    topk_idx: torch.Tensor = field(repr=False)
    topk_weight: torch.Tensor = field(repr=False)
    inputs: torch.Tensor | None = field(default=None, repr=False)
    expert_outputs: torch.Tensor | None = field(default=None, repr=False)
    activations: torch.Tensor | None = field(default=None, repr=False)
    dropped: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        """N."""
        return int(self.logits.shape[0])

    @property
    def dropped_share(self) -> float | None:
        """Share of the N*K assignments the capacity dropped (None for a dropless router)."""
        return None if self.dropped is None else float(self.dropped.float().mean())

    @property
    def scores(self) -> torch.Tensor:
        """[N, E] raw router scores (softmax or sigmoid of the logits), for rank analyses."""
        return _scores(self.logits, self.spec)

    @property
    def probs(self) -> torch.Tensor:
        """[N, E] scores normalised to sum to 1 (the router's softmax for softmax routers)."""
        s = self.scores
        return s if self.spec.score == "softmax" else _normalise(s)


class RoutingCapture:
    """Forward hooks on every router of a model; use as a context manager (see module doc).

    Each forward pass inside the ``with`` block appends its tokens; :meth:`layer` returns them
    concatenated. The model's own choice of experts is recorded (sorted by selection score):
    for layers captured at the experts (:attr:`MoELayer.capture_at`), the indices and weights
    the model passes to its experts module, with the logits from the router's output;
    otherwise the router's output, or, when a router returns only logits, :func:`route`.

    Args:
        adapter: the model's adapter.
        store_inputs: keep the MoE inputs x of the first this many tokens (0 = none).
        store_outputs: also run every expert on the kept inputs and keep outputs [E, n, D] and
            activations [E, n, F] (memory: E·n·(D + F) floats per layer).
    """

    def __init__(self, adapter: MoEAdapter, store_inputs: int = 0, store_outputs: bool = False):
        if store_inputs < 0:
            raise ValueError(f"store_inputs must be >= 0; got {store_inputs}")
        if store_outputs and store_inputs == 0:
            raise ValueError("store_outputs needs store_inputs > 0 (the tokens to run experts on)")
        self.adapter = adapter
        self.store_inputs = store_inputs
        self.store_outputs = store_outputs
        self._handles: list[Any] = []
        self._records: list[dict[str, list[torch.Tensor]]] = []
        self._stored: list[int] = []
        self._capacity: list[bool] = []
        self._weights: dict[int, ExpertWeights] = {}
        self.clear()

    def clear(self) -> None:
        """Forget everything recorded so far."""
        n = self.adapter.num_layers
        self._records = [
            {k: [] for k in ("logits", "idx", "weight", "dropped", "inputs", "outputs", "acts")}
            for _ in range(n)
        ]
        self._stored = [0] * n
        self._capacity = [False] * n  # a batch of the layer was routed with a capacity
        self._pending: list[torch.Tensor | None] = [None] * n  # router logits awaiting dispatch

    def __enter__(self) -> RoutingCapture:
        if self._handles:
            raise RuntimeError("this capture is already active")
        for layer in self.adapter.layers:
            self._handles.append(
                layer.router.register_forward_hook(self._make_hook(layer.index), with_kwargs=True)
            )
            if layer.capture_at == "experts":
                self._handles.append(
                    layer.experts.register_forward_pre_hook(
                        self._make_dispatch_hook(layer.index), with_kwargs=True
                    )
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.adapter.layers[i].capture_at == "experts":
                logits = self.adapter.parse_router_output(i, output)[0]
                self._pending[i] = (
                    logits.detach().float().reshape(-1, self.adapter.spec.num_experts)
                )
                return
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            logits, idx, weight = self.adapter.parse_router_output(i, output)
            self._record(i, x, logits, idx, weight, self.adapter.parse_dropped(i, output))

        return hook

    def _make_dispatch_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x, idx, weight = self.adapter.parse_experts_input(i, args, kwargs)
            x = x.reshape(-1, x.shape[-1])
            logits = self._pending[i]
            self._pending[i] = None
            if logits is None or logits.shape[0] != x.shape[0]:
                logits = self.adapter.router_logits(i, x)
            self._record(i, x, logits, idx, weight, None)

        return hook

    @torch.no_grad()
    def _record(
        self,
        i: int,
        x: torch.Tensor | None,
        logits: torch.Tensor,
        idx: torch.Tensor | None,
        weight: torch.Tensor | None,
        dropped: torch.Tensor | None,
    ) -> None:
        """Append one batch of MoE layer ``i``: logits [N, E], chosen experts and weights
        [N, K] (None: reproduce them with :func:`route`), dropped [N, K] or None."""
        adapter = self.adapter
        logits = logits.detach().float().reshape(-1, adapter.spec.num_experts)
        bias = adapter.score_correction_bias(i)
        if idx is None:
            decision = route(logits, adapter.spec, bias)
            idx, weight = decision.topk_idx, decision.topk_weight
        else:
            idx = idx.detach().reshape(logits.shape[0], -1).long()
            weight = weight.detach().float().reshape(idx.shape)
            sel = _selection_scores(_scores(logits, adapter.spec), adapter.spec, bias)
            order = sel.gather(1, idx).argsort(dim=1, descending=True, stable=True)
            idx, weight = idx.gather(1, order), weight.gather(1, order)
            if dropped is not None:
                dropped = dropped.detach().reshape(idx.shape).gather(1, order)
        rec = self._records[i]
        rec["logits"].append(logits.cpu())
        rec["idx"].append(idx.cpu())
        rec["weight"].append(weight.float().cpu())
        self._capacity[i] = self._capacity[i] or dropped is not None
        rec["dropped"].append(
            torch.zeros(idx.shape, dtype=torch.bool) if dropped is None else dropped.bool().cpu()
        )
        room = self.store_inputs - self._stored[i]
        if room > 0 and x is not None:
            xs = x.detach().reshape(-1, x.shape[-1])[:room].float()
            self._stored[i] += xs.shape[0]
            rec["inputs"].append(xs.cpu())
            if self.store_outputs:
                if i not in self._weights:
                    self._weights[i] = adapter.expert_weights(i)
                out, acts = adapter.expert_outputs(
                    i, xs, with_activations=True, weights=self._weights[i]
                )
                rec["outputs"].append(out.cpu())
                rec["acts"].append(acts.cpu())  # type: ignore[union-attr]

    @property
    def num_layers(self) -> int:
        """Number of MoE layers hooked."""
        return self.adapter.num_layers

    def layer(self, i: int) -> LayerCapture:
        """The recording of MoE layer ``i`` (raises if nothing was captured)."""
        rec = self._records[i]
        if not rec["logits"]:
            raise ValueError(
                f"nothing was captured for MoE layer {i}; run the model inside `with capture:`"
            )

        def cat(key: str, dim: int = 0) -> torch.Tensor | None:
            return torch.cat(rec[key], dim=dim) if rec[key] else None

        return LayerCapture(
            layer=i,
            dropped=cat("dropped") if self._capacity[i] else None,
            layer_index=self.adapter.layers[i].layer_index,
            spec=self.adapter.spec,
            bias=self.adapter.score_correction_bias(i),
            logits=cat("logits"),  # type: ignore[arg-type]
            topk_idx=cat("idx"),  # type: ignore[arg-type]
            topk_weight=cat("weight"),  # type: ignore[arg-type]
            inputs=cat("inputs"),
            expert_outputs=cat("outputs", 1),
            activations=cat("acts", 1),
        )

    @property
    def layers(self) -> list[LayerCapture]:
        """:meth:`layer` for every MoE layer."""
        return [self.layer(i) for i in range(self.num_layers)]

    def __iter__(self) -> Iterator[LayerCapture]:
        return iter(self.layers)
