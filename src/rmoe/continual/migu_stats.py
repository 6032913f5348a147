"""What MIGU covers and what it measures: the covered weights, how they are found, and the
output-magnitude statistic accumulated from forward hooks (:mod:`rmoe.continual.migu` masks with
it).

Covered weights (:class:`CoveredWeight`): every trainable ``nn.Linear`` (``[F_out, D_in]``,
statistic ``[F_out]``) and every 3-D expert weight found through a *probe* (statistic
``[E, F_out]``, one row of output units per expert). :func:`find_weights` walks a model for both.

Expert weights (3-D). A module that stores its experts as ``[E, ...]`` Parameters (not
``nn.Linear``) plugs in without importing MIGU, through a probe: a child module with attributes

- ``migu_param: str`` -- name of the Parameter on the probe's parent module, shape
  ``[E, F_out, D_in]`` (``migu_out_dim = 1``) or ``[E, D_in, F_out]`` (``migu_out_dim = 2``);
- ``migu_out_dim: int`` -- 1 or 2, the dimension of that Parameter that indexes output units;
- ``migu_bias: str | None`` (optional) -- name of an ``[E, F_out]`` bias Parameter on the parent,

which the parent calls in its forward as ``h = probe(h, expert_ids, token_index)`` with

- ``h``: ``[n, F_out]`` -- the outputs of that weight for the ``n`` dispatched (token, expert)
  rows, before any activation; or ``[E, C, F_out]`` (per-expert batches, ``expert_ids=None``);
- ``expert_ids``: ``[n]`` long in ``[0, E)`` -- the expert of each row;
- ``token_index``: ``[n]`` long in ``[0, B*T)`` or ``None`` -- the flattened token of each row,
  used only to look up the token mask (without it, every row counts).

The probe returns ``h`` unchanged; :class:`ExpertOutputProbe` (defined in
``rmoe.modeling.experts``) is the reference implementation. rmoe's ``Experts`` owns three
(``gate_probe``, ``up_probe``, ``down_probe``) and calls them from every dispatch backend on the
rows it actually computed, so MIGU covers rmoe's expert weights with no extra work: the statistic
costs an ``abs``, a row sum and an ``index_add_`` per weight, not a recomputation.

The statistic (:func:`accumulate_dense`, :func:`accumulate_expert`): per output unit, the sum
over counted tokens of ``|h|`` (``norm="raw"``) or of ``|h| / ||h||_1`` (``norm="l1"``), in
float32 whatever the activation dtype, with the number of counted tokens beside it; a token mask
(``[B*T]`` float, 0 = padding) weights the tokens. :func:`sum_over_processes` adds up the
statistics of data-parallel processes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "NORMS",
    "CaptureFn",
    "CoveredWeight",
    "TargetSpec",
    "accumulate_dense",
    "accumulate_expert",
    "expert_weight",
    "find_weights",
    "matches",
    "sum_over_processes",
]

TargetSpec = Callable[[str, nn.Module], bool] | Sequence[str] | str | None
"""Which layers to cover: a predicate ``(name, module) -> bool``, glob pattern(s) on the name, or
``None`` for all. ``name`` is the module name for ``nn.Linear`` layers and the full parameter name
(e.g. ``"layers.0.moe.experts.w1"``) for expert weights."""

CaptureFn = Callable[[nn.Module, tuple, object], tuple]
"""``capture_fn(module, args, output) -> (h, expert_ids) | (h, expert_ids, token_index)``."""

NORMS = ("l1", "raw")
"""Magnitude statistics: ``l1`` (paper, per-token L1-normalised), ``raw`` (released code)."""


@dataclass
class CoveredWeight:
    """One covered weight: a ``[F_out, D_in]`` linear weight or an ``[E, ...]`` expert weight."""

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    out_dim: int  # dimension of ``weight`` that indexes output units
    acc: Tensor | None = None  # float32 [F_out] or [E, F_out]: summed token magnitudes
    count: Tensor | None = None  # float32 [] or [E]: tokens accumulated
    seen: bool = False  # whether a forward fed the accumulators since the last reset

    @property
    def is_expert(self) -> bool:
        return self.weight.dim() == 3

    @property
    def out_features(self) -> int:
        return self.weight.shape[self.out_dim]

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0] if self.is_expert else 1

    def mask_shape(self) -> tuple[int, ...]:
        """``[F_out]`` for a linear weight, ``[E, F_out]`` for an expert weight."""
        if self.is_expert:
            return (self.num_experts, self.out_features)
        return (self.out_features,)

    def weight_view(self, keep: Tensor) -> Tensor:
        """Reshape a ``mask_shape()`` mask so that it broadcasts against ``weight``."""
        if not self.is_expert:
            return keep.unsqueeze(1)  # [F_out, 1]
        if self.out_dim == 1:
            return keep.unsqueeze(2)  # [E, F_out, 1]
        return keep.unsqueeze(1)  # [E, 1, F_out]

    def buffers(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The accumulator and token count on ``device`` (made on first use); marks ``seen``."""
        if self.acc is None or self.acc.device != device:
            self.acc = torch.zeros(self.mask_shape(), dtype=torch.float32, device=device)
            count_shape = (self.num_experts,) if self.is_expert else ()
            self.count = torch.zeros(count_shape, dtype=torch.float32, device=device)
        self.seen = True
        return self.acc, self.count

    def reset(self) -> None:
        if self.acc is not None:
            self.acc.zero_()
            self.count.zero_()
        self.seen = False


def matches(spec: TargetSpec, name: str, module: nn.Module) -> bool:
    """Whether ``spec`` (see :data:`TargetSpec`) selects the weight ``name`` of ``module``."""
    if spec is None:
        return True
    if callable(spec):
        return bool(spec(name, module))
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def expert_weight(
    name: str, weight: nn.Parameter, out_dim: int, bias: nn.Parameter | None
) -> CoveredWeight:
    """A checked :class:`CoveredWeight` for a 3-D expert weight (and its ``[E, F_out]`` bias)."""
    if weight.dim() != 3:
        raise ValueError(
            f"expert weight {name!r} must be 3-D [E, F_out, D_in] or [E, D_in, F_out], "
            f"got shape {tuple(weight.shape)}; fix: register 2-D weights as nn.Linear"
        )
    if out_dim not in (1, 2):
        raise ValueError(
            f"expert weight {name!r}: out_dim must be 1 ([E, F_out, D_in]) or "
            f"2 ([E, D_in, F_out]), got {out_dim}"
        )
    target = CoveredWeight(name, weight, bias, out_dim=out_dim)
    if bias is not None and tuple(bias.shape) != target.mask_shape():
        raise ValueError(
            f"expert bias of {name!r} must have shape [E, F_out]={target.mask_shape()}, "
            f"got {tuple(bias.shape)}"
        )
    return target


def _probe_weight(model: nn.Module, name: str, probe: nn.Module) -> tuple[str, nn.Module, Tensor]:
    """``(parameter name, parent module, weight)`` of the expert weight a probe names."""
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    pname = f"{parent_name}.{probe.migu_param}" if parent_name else probe.migu_param
    weight = getattr(parent, probe.migu_param, None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(
            f"expert probe {name!r} names migu_param={probe.migu_param!r}, which is "
            f"not a Parameter of its parent module {parent_name!r}; fix: set "
            "migu_param to the attribute name of the [E, ...] expert weight"
        )
    return pname, parent, weight


def find_weights(
    model: nn.Module, keep: Callable[[str, nn.Module, Tensor], bool]
) -> Iterator[tuple[CoveredWeight, nn.Module]]:
    """The weights of ``model`` to cover, each with the module whose forward hook measures it.

    Yields ``(weight, nn.Linear)`` for linear layers and ``(weight, probe)`` for expert weights,
    in module order, for those where ``keep(name, module, weight)`` is true.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if keep(name, module, module.weight):
                yield CoveredWeight(name, module.weight, module.bias, out_dim=0), module
        elif hasattr(module, "migu_param") and hasattr(module, "migu_out_dim"):
            pname, parent, weight = _probe_weight(model, name, module)
            bias_name = getattr(module, "migu_bias", None)
            bias = getattr(parent, bias_name) if bias_name else None
            if keep(pname, parent, weight):
                yield expert_weight(pname, weight, module.migu_out_dim, bias), module


def _abs_f32(x: Tensor) -> Tensor:
    """``|x|`` in float32 (``abs`` is exact in any float dtype, so take it before casting)."""
    return x.abs().to(torch.float32)


def _token_weights(a: Tensor, tok: Tensor | None, norm: str) -> Tensor | None:
    """Per-row weights of ``a`` ``[n, F_out]``: the token mask, times ``1 / ||a_row||_1`` for
    ``l1``; None when every row counts once."""
    if norm != "l1":
        return tok
    inv = a.sum(dim=1).clamp_min_(torch.finfo(torch.float32).tiny).reciprocal_()
    return inv if tok is None else inv * tok


def accumulate_dense(
    target: CoveredWeight, output: Tensor, token_mask: Tensor | None, norm: str
) -> None:
    """Add one forward's ``[..., F_out]`` output of a linear layer to its accumulator.

    ``token_mask``: ``[N]`` float (N = the output's number of tokens) or None.
    """
    if not isinstance(output, Tensor) or output.shape[-1] != target.out_features:
        raise ValueError(
            f"layer {target.name!r}: expected an output tensor [..., {target.out_features}], "
            f"got {getattr(output, 'shape', type(output).__name__)}"
        )
    a = _abs_f32(output.detach().reshape(-1, target.out_features))  # [N, F_out]
    acc, count = target.buffers(a.device)
    tok = None
    if token_mask is not None:
        if token_mask.numel() != a.shape[0]:
            raise ValueError(
                f"token mask has {token_mask.numel()} tokens but layer {target.name!r} produced "
                f"{a.shape[0]}; fix: set a mask matching this batch's [B, T], clear it with "
                "set_token_mask(None), or exclude the layer via `targets`"
            )
        tok = token_mask.to(a.device)  # [N]
    weights = _token_weights(a, tok, norm)
    if weights is None:
        acc += a.sum(dim=0)
    else:
        acc.addmv_(a.t(), weights)
    count += a.shape[0] if tok is None else tok.sum()


def _expert_rows(
    target: CoveredWeight, h: Tensor, expert_ids: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(h [n, F_out], expert_ids [n])`` from per-row or per-expert ``[E, C, F_out]`` outputs."""
    num_experts, f_out = target.num_experts, target.out_features
    if h.dim() == 3:
        if h.shape[0] != num_experts or h.shape[2] != f_out or expert_ids is not None:
            raise ValueError(
                f"expert weight {target.name!r}: per-expert outputs must be "
                f"[E={num_experts}, C, F_out={f_out}] with expert_ids=None, got "
                f"{tuple(h.shape)}"
            )
        expert_ids = torch.arange(num_experts, device=h.device).repeat_interleave(h.shape[1])
        h = h.reshape(-1, f_out)
    if h.dim() != 2 or h.shape[1] != f_out or expert_ids is None:
        raise ValueError(
            f"expert weight {target.name!r}: expected h [n, F_out={f_out}] with expert_ids "
            f"[n], got h {tuple(h.shape)} and expert_ids "
            f"{None if expert_ids is None else tuple(expert_ids.shape)}"
        )
    if expert_ids.shape != (h.shape[0],):
        raise ValueError(
            f"expert weight {target.name!r}: expert_ids must be [n={h.shape[0]}], got "
            f"{tuple(expert_ids.shape)}"
        )
    return h, expert_ids


def accumulate_expert(
    target: CoveredWeight,
    h: Tensor,
    expert_ids: Tensor | None,
    token_index: Tensor | None,
    token_mask: Tensor | None,
    norm: str,
) -> None:
    """Add ``[n, F_out]`` expert outputs (rows tagged by ``expert_ids``) to ``[E, F_out]``.

    ``token_mask`` ``[B*T]`` is looked up at ``token_index`` ``[n]`` (both needed to weight).
    """
    h, expert_ids = _expert_rows(target, h, expert_ids)
    a = _abs_f32(h.detach())  # [n, F_out]
    acc, count = target.buffers(a.device)
    ids = expert_ids.to(device=a.device, dtype=torch.long)
    tok = None
    if token_mask is not None and token_index is not None:
        tok = token_mask.to(a.device)[token_index.to(a.device, torch.long)]  # [n]
    weights = _token_weights(a, tok, norm)
    if weights is not None:
        a.mul_(weights.unsqueeze(1))  # a is a fresh tensor (abs), safe to scale in place
    acc.index_add_(0, ids, a)
    count.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32) if tok is None else tok)


@torch.no_grad()
def sum_over_processes(targets: Sequence[CoveredWeight], group: object | None = None) -> None:
    """Sum every target's accumulator, token count and seen flag over the processes of
    ``group`` (a no-op unless ``torch.distributed`` runs with more than one process).

    One ``all_reduce`` of one flat float32 tensor on the first covered weight's device. Every
    process holds the same targets in the same order (same model), so the layout matches.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size(group) < 2:
        return
    device = targets[0].weight.device
    parts: list[Tensor] = []
    seen = [t.seen for t in targets]
    for t in targets:
        acc, count = t.buffers(t.acc.device if t.acc is not None else device)
        parts += [acc.reshape(-1).to(device), count.reshape(-1).to(device)]
    parts.append(torch.tensor(seen, dtype=torch.float32, device=device))
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for t in targets:
        for buf in (t.acc, t.count):
            n = buf.numel()
            buf.copy_(flat[offset : offset + n].view_as(buf))
            offset += n
    for t, any_seen in zip(targets, flat[offset:].tolist(), strict=True):
        t.seen = any_seen > 0
