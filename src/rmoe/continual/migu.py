"""MIGU: magnitude-based gradient masking of output rows (Du et al., arXiv 2406.17245).

For a linear map ``h = W x`` with ``W`` of shape ``[F_out, D_in]``, row ``W[i]`` produces output
unit ``h_i``. MIGU caches, during the forward pass, how large each output unit is, and after
backward zeroes the gradient of every row whose output magnitude is below the layer's quantile at
``ratio``. Only the rows with the largest outputs are updated (ratio 0.7: the top 30%). The masks
are recomputed at every optimizer step from the micro-batches of that step; nothing persists.

Facts taken from the paper notes (``shared/papers/migu_and_stability-gap.md``, part A):

- paper (A2): per token, ``n = |h| / ||h||_1`` over the output units, averaged over the tokens of
  the mini-batch; keep the rows whose ``n_i`` are among the top ones. Here: ``norm="l1"``, with
  padding tokens excluded when a token mask is set.
- released code (A3): ``sum |h|`` over all positions, padding included, summed over the
  gradient-accumulation micro-batches; ``keep = acc >= torch.quantile(acc, ratio)``; every shipped
  script uses ratio 0.7; the first task is trained unmasked; biases are never masked. Here:
  ``norm="raw"`` (with no token mask set it reproduces the code's statistic); biases are masked
  by default (``mask_bias=True``; set ``False`` for the code's behaviour); the first task is
  trained unmasked by constructing with ``enabled=False`` (or setting ``migu.enabled = False``).
- the released random control is a no-op in full fine-tuning (A3); :class:`RandomMask` here masks
  random rows at the same count.

Usage::

    migu = MIGU(model, ratio=0.7)                     # hooks every trainable nn.Linear
    for micro_batch in step_batches:                  # gradient accumulation is fine
        with migu.token_mask(micro_batch["attention_mask"]):  # optional: exclude padding
            loss = model(**micro_batch).loss / len(step_batches)
            scaler.scale(loss).backward()
    scaler.unscale_(opt)                              # if a GradScaler is used
    migu.apply_()                                     # mask .grad, reset the accumulators
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # clip norms see masked grads
    scaler.step(opt); scaler.update(); opt.zero_grad()

Which rows are kept. For a layer with ``n`` output units, :func:`num_kept_rows` gives
``k = n - ceil(ratio * (n - 1))``: the number of values ``>= torch.quantile(acc, ratio)`` (linear
interpolation) when the values are distinct, i.e. the released code's rule. Rows are chosen with
``topk``, so the count is exactly ``k`` even with ties (the code's ``>=`` keeps every tied row).
Examples: n=10, ratio=0.7 -> 3 kept; n=16 -> 5; n=64 -> 19; ratio=0 keeps all; ratio=1 keeps 1.

Mixed precision. Magnitudes are accumulated in float32 whatever the activation dtype, so the
hooks work under ``torch.autocast`` (bf16/fp16 outputs). :meth:`MIGU.apply_` edits
``param.grad`` in place, i.e. the gradient the optimizer steps, by multiplying masked rows by 0
(like the released code's ``grad *= mask``; ~15x faster on CPU than ``masked_fill_`` with a
broadcast mask). With a ``GradScaler``, call it after ``scaler.unscale_(opt)``. Masking the
still-scaled gradient is equally correct: a finite entry times 0 is 0, and stays 0 after
unscaling; an inf/NaN times 0 is NaN, so the scaler still sees the overflow and skips the step.
Without a scaler, a non-finite gradient in a masked row therefore stays non-finite (NaN) rather
than being cleaned to 0.

How optimizers move rows whose gradient is zero (why ``freeze_masked_rows`` exists). Zeroing
``W.grad[i]`` stops row ``i`` only for plain SGD without momentum and without weight decay.
Otherwise, for a masked row (``g = 0``) at step ``t`` with learning rate ``lr``:

- SGD, weight decay ``wd``: ``g`` becomes ``wd * w``, so ``w <- w - lr * wd * w``.
- SGD, momentum ``mu``: ``buf <- mu * buf``; ``w <- w - lr * buf``; ``buf`` is non-zero whenever
  the row received gradient in an earlier step.
- Adam/AdamW moments: ``m <- beta1 * m``, ``v <- beta2 * v``, and
  ``w <- w - lr * m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / (1 - beta1^t)``,
  ``v_hat = v / (1 - beta2^t)``: a row that was updated at an earlier step keeps moving, with a
  step that decays roughly like ``(beta1 / sqrt(beta2))^s`` after ``s`` masked steps. From a fresh
  optimizer (``m = v = 0``) the update of a masked row is exactly zero.
- AdamW decoupled weight decay: ``w <- w * (1 - lr * wd)`` every step, gradient or not.
- Adam with coupled L2 (``torch.optim.Adam(weight_decay=wd)``): ``g`` becomes ``wd * w``, which
  is then normalised by Adam: the masked row takes a full-size Adam step.

With ``freeze_masked_rows=True``, :meth:`MIGU.apply_` snapshots the masked rows (and bias
entries) and :meth:`MIGU.restore_` writes them back after ``optimizer.step()``; pass the optimizer
(``optimizer=`` or :meth:`MIGU.attach_optimizer`) to have ``restore_`` run from an optimizer
step post-hook. The rows then stay bit-exactly still. The optimizer state is not restored: the
moments of masked rows still decay (``m <- beta1 * m``, ``v <- beta2 * v``) and Adam's step count
advances, as they would under plain gradient masking.

Expert weights (3-D). rmoe's ``Experts`` (and any module exposing a *probe*, the contract in
:mod:`rmoe.continual.migu_stats`) are covered with no extra work: MIGU hooks every probe it
finds and masks, per expert ``e``, the rows ``W[e, i, :]`` (``out_dim=1``) or the columns
``W[e, :, i]`` (``out_dim=2``) of output units ``i`` whose average magnitude over the tokens
routed to ``e`` is below expert ``e``'s quantile. For modules that cannot be edited,
:meth:`MIGU.register_expert_weight` registers a Parameter with a ``capture_fn`` that extracts
``(h, expert_ids[, token_index])`` from a forward hook's ``(module, args, output)``, or returns a
``record`` function to call by hand.

Caveats: forwards run with gradients disabled (``torch.no_grad``, ``inference_mode``) are not
accumulated, so evaluation does not pollute the statistic; activation checkpointing re-runs the
forward with gradients enabled, which counts those tokens twice (the masks change only through
the token weighting). ``nn.MultiheadAttention.out_proj`` is an ``nn.Linear`` that MHA never calls
as a module, so it gets no statistic and is left unmasked. ``torch.compile``: construct MIGU before
compiling the model (checked with the eager and inductor backends: the same statistics); hooks
added to an already compiled model are not seen by the compiled graph. Whenever a covered weight
has a gradient but no statistic, :meth:`MIGU.apply_` leaves it unmasked and logs one warning
naming it.

Data parallelism (DDP). Each process sees only its shard of the batch, so without care every
process would mask different rows of the same (all-reduced) gradient and the replicas would
drift apart. When ``torch.distributed`` is initialised with more than one process,
:meth:`MIGU.apply_` first sums the accumulators (magnitudes, token counts, and whether a layer
ran) over the processes (``sync=True``, the default; one ``all_reduce`` of one flat tensor), so
every process keeps the same rows, the ones a single process would keep on the global batch.
Every process must call :meth:`MIGU.apply_` at the same step, as it does in a DDP loop.
:class:`RandomMask` needs no communication: seeded alike, every process draws the same rows.
FSDP-sharded gradients (DTensor) are untested.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from rmoe.continual.migu_stats import (
    NORMS,
    CaptureFn,
    CoveredWeight,
    TargetSpec,
    accumulate_dense,
    accumulate_expert,
    expert_weight,
    find_weights,
    matches,
    sum_over_processes,
)
from rmoe.modeling.experts import ExpertOutputProbe

logger = logging.getLogger(__name__)

__all__ = ["MIGU", "ExpertOutputProbe", "RandomMask", "num_kept_rows"]


def num_kept_rows(n: int, ratio: float) -> int:
    """Number of output rows left trainable out of ``n`` at masking ratio ``ratio``.

    ``k = n - ceil(ratio * (n - 1))``: the count of values ``>= torch.quantile(x, ratio)`` for
    ``n`` distinct values (the released MIGU code's rule). ``ratio`` is the masked fraction.
    """
    if n < 1:
        raise ValueError(f"num_kept_rows needs n >= 1 output units, got n={n}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1] (the masked fraction), got {ratio}")
    # The small epsilon keeps e.g. 0.7 * 10 = 7.000000000000001 from rounding up to 8.
    return n - math.ceil(ratio * (n - 1) - 1e-9)


class _RowMasker:
    """Shared machinery: target discovery, token mask, gradient masking, freezing, hooks."""

    _needs_stats = True  # False: no forward hooks (RandomMask)
    _norm = "raw"  # MIGU sets the instance's norm

    def __init__(
        self,
        model: nn.Module,
        ratio: float = 0.7,
        *,
        targets: TargetSpec = None,
        enabled: bool = True,
        mask_bias: bool = True,
        skip_frozen: bool = True,
        freeze_masked_rows: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(
                f"ratio must be in [0, 1]: the fraction of rows masked per layer "
                f"(0.7 updates the top 30%), got {ratio}"
            )
        if not (targets is None or callable(targets) or isinstance(targets, str | Sequence)):
            raise ValueError(
                "targets must be None, a predicate (name, module) -> bool, or glob patterns "
                f"such as ['*.mlp.*'], got {type(targets).__name__}"
            )
        self.model = model
        self.ratio = float(ratio)
        self.enabled = bool(enabled)
        self.mask_bias = bool(mask_bias)
        self.freeze_masked_rows = bool(freeze_masked_rows)
        self.last_masks: dict[str, Tensor] = {}
        self._targets: dict[str, CoveredWeight] = {}
        self._handles: list[RemovableHandle] = []
        self._snapshot: list[tuple[Tensor, Tensor, Tensor]] = []
        self._token_mask: Tensor | None = None
        self._warned: set[frozenset[str]] = set()
        self._target_spec = targets
        self._skip_frozen = bool(skip_frozen)
        self._discover()
        if not self._targets:
            raise ValueError(
                f"{type(self).__name__} found no layer to cover: no trainable nn.Linear or expert "
                f"probe matched targets={targets!r}; fix: widen `targets` (None covers every "
                "nn.Linear), or unfreeze the layers (skip_frozen=True skips requires_grad=False)"
            )
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ discovery and hooks
    def _keep(self, name: str, module: nn.Module, weight: Tensor) -> bool:
        if self._skip_frozen and not weight.requires_grad:
            return False
        return matches(self._target_spec, name, module)

    def _discover(self) -> None:
        for target, module in find_weights(self.model, self._keep):
            if target.is_expert:
                self._add_expert(target)
                if self._needs_stats:
                    hook = self._probe_hook(target)
                    self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            elif target.name not in self._targets:
                self._targets[target.name] = target
                if self._needs_stats:
                    self._handles.append(module.register_forward_hook(self._linear_hook(target)))

    def _add_expert(self, target: CoveredWeight) -> None:
        if target.name in self._targets:
            raise ValueError(f"expert weight {target.name!r} is already covered; register it once")
        self._targets[target.name] = target

    def register_expert_weight(
        self,
        param: nn.Parameter,
        out_dim: int,
        *,
        module: nn.Module | None = None,
        capture_fn: CaptureFn | None = None,
        name: str | None = None,
        bias: nn.Parameter | None = None,
    ) -> Callable[..., None]:
        """Cover a 3-D expert weight that has no probe.

        Args:
            param: ``[E, F_out, D_in]`` (``out_dim=1``) or ``[E, D_in, F_out]`` (``out_dim=2``).
            out_dim: dimension of ``param`` indexing output units.
            module: with ``capture_fn``, the module to put a forward hook on.
            capture_fn: ``(module, args, output) -> (h, expert_ids[, token_index])`` where
                ``h`` is ``[n, F_out]`` (the outputs of ``param``) and ``expert_ids`` ``[n]``;
                or ``h`` ``[E, C, F_out]`` with ``expert_ids=None``. It may recompute ``h``.
            name: key for ``last_masks``; defaults to the parameter's name in the model.
            bias: optional ``[E, F_out]`` bias masked with the same rows.

        Returns:
            ``record(h, expert_ids=None, token_index=None)``: feeds the accumulators by hand
            (a no-op when disabled or when gradients are off).
        """
        if name is None:
            name = next((n for n, p in self.model.named_parameters() if p is param), None)
            if name is None:
                raise ValueError(
                    "register_expert_weight: param is not a parameter of the model; fix: pass "
                    "name='...' explicitly"
                )
        if (module is None) != (capture_fn is None):
            raise ValueError(
                "register_expert_weight: pass both module and capture_fn (to install a forward "
                "hook) or neither (and call the returned record function yourself)"
            )
        target = expert_weight(name, param, out_dim, bias)
        self._add_expert(target)

        def record(
            h: Tensor, expert_ids: Tensor | None = None, token_index: Tensor | None = None
        ) -> None:
            if self._needs_stats and self.enabled and torch.is_grad_enabled():
                with torch.no_grad():
                    accumulate_expert(
                        target, h, expert_ids, token_index, self._token_mask, self._norm
                    )

        if module is not None and capture_fn is not None and self._needs_stats:

            def hook(mod: nn.Module, args: tuple, output: object) -> None:
                if self.enabled and torch.is_grad_enabled():
                    record(*capture_fn(mod, args, output))

            self._handles.append(module.register_forward_hook(hook))
        return record

    def _linear_hook(self, target: CoveredWeight) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self.enabled and torch.is_grad_enabled():
                with torch.no_grad():
                    accumulate_dense(target, output, self._token_mask, self._norm)

        return hook

    def _probe_hook(
        self, target: CoveredWeight
    ) -> Callable[[nn.Module, tuple, dict, Tensor], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if self.enabled and torch.is_grad_enabled():
                bound = dict(zip(("h", "expert_ids", "token_index"), args)) | kwargs
                with torch.no_grad():
                    accumulate_expert(
                        target,
                        bound["h"],
                        bound.get("expert_ids"),
                        bound.get("token_index"),
                        self._token_mask,
                        self._norm,
                    )

        return hook

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Run :meth:`restore_` after every ``optimizer.step()`` (for ``freeze_masked_rows``)."""
        handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore_())
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook this object installed (forward hooks and optimizer hooks)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> _RowMasker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ token mask
    def set_token_mask(self, mask: Tensor | None) -> None:
        """Count only the tokens where ``mask`` is non-zero (``[B, T]``, e.g. attention_mask).

        The mask stays in force until replaced or cleared with ``None``. A covered layer whose
        output has a different number of tokens than ``mask`` raises ``ValueError``.
        """
        if mask is None:
            self._token_mask = None
            return
        if not isinstance(mask, Tensor) or mask.dim() < 1:
            raise ValueError("token mask must be a tensor [B, T] (or [N]) of 0/1 values, or None")
        self._token_mask = mask.detach().reshape(-1).to(torch.float32)

    @property
    def token_mask_numel(self) -> int | None:
        """Number of tokens of the current token mask (``B*T``), or None when none is set."""
        return None if self._token_mask is None else int(self._token_mask.numel())

    @contextmanager
    def token_mask(self, mask: Tensor | None) -> Iterator[None]:
        """Context manager form of :meth:`set_token_mask`; restores the previous mask."""
        previous = self._token_mask
        self.set_token_mask(mask)
        try:
            yield
        finally:
            self._token_mask = previous

    def _sync_stats(self) -> None:
        """Combine the statistics of data-parallel processes before masking (MIGU overrides)."""

    # ------------------------------------------------------------------ masking
    def _keep_mask(self, target: CoveredWeight) -> Tensor | None:
        """Bool ``mask_shape()`` tensor of rows to keep, or ``None`` to leave the weight alone."""
        raise NotImplementedError

    def _topk_mask(self, scores: Tensor) -> Tensor:
        """Keep the ``num_kept_rows`` largest entries along the last dimension of ``scores``."""
        k = num_kept_rows(scores.shape[-1], self.ratio)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        return keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)

    @torch.no_grad()
    def apply_(self) -> dict[str, Tensor]:
        """Zero the gradient rows of every covered weight (and bias) outside the kept set.

        Call after backward (and after ``GradScaler.unscale_``) and before ``optimizer.step()``.
        Resets the accumulators. When disabled, only resets.

        Returns:
            ``{name: keep}`` with ``keep`` a bool ``[F_out]`` (linear) or ``[E, F_out]``
            (expert) tensor, True for rows whose gradient was left intact; also stored in
            ``last_masks``.
        """
        masks: dict[str, Tensor] = {}
        unobserved: list[str] = []
        self._snapshot = []
        if self.enabled:
            self._sync_stats()
            for target in self._targets.values():
                grad = target.weight.grad
                if grad is None:
                    continue
                keep = self._keep_mask(target)
                if keep is None:
                    unobserved.append(target.name)
                    continue
                keep = keep.to(grad.device)
                grad.mul_(target.weight_view(keep).to(grad.dtype))
                bias = target.bias if self.mask_bias else None
                if bias is not None and bias.grad is not None:
                    bias.grad.mul_(keep.to(bias.grad.dtype))
                if self.freeze_masked_rows:
                    # A full copy restored with torch.where: no host sync, any weight layout,
                    # ~10x faster on CPU than masked_select/masked_scatter_.
                    drop = ~target.weight_view(keep)
                    self._snapshot.append((target.weight, drop, target.weight.detach().clone()))
                    if bias is not None:
                        self._snapshot.append((bias, ~keep, bias.detach().clone()))
                masks[target.name] = keep
        if unobserved:
            self._warn_unobserved(unobserved)
        self.reset()
        self.last_masks = masks
        return masks

    def _warn_unobserved(self, names: list[str]) -> None:
        """Say once per set of names that weights with a gradient got no statistic."""
        key = frozenset(names)
        if key in self._warned:
            return
        self._warned.add(key)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        logger.warning(
            "MIGU: %d covered weight(s) have a gradient but no output statistic this step, so "
            "they were left unmasked: %s. Their forward hooks did not run: the weight was used "
            "outside its module's forward (functional calls, nn.MultiheadAttention.out_proj), "
            "the module runs under torch.compile (attach MIGU before compiling, or train "
            "uncompiled), or the forward ran under no_grad. Exclude them with `targets` to "
            "silence this.",
            len(names),
            shown,
        )

    @torch.no_grad()
    def restore_(self) -> None:
        """Write back the rows masked by the last :meth:`apply_` (``freeze_masked_rows``).

        Call after ``optimizer.step()``; runs automatically when an optimizer is attached.
        A no-op without a pending snapshot.
        """
        for param, drop, saved in self._snapshot:
            torch.where(drop, saved, param, out=param)
        self._snapshot = []

    def reset(self) -> None:
        """Clear the magnitude accumulators (done by :meth:`apply_`)."""
        for target in self._targets.values():
            target.reset()

    # ------------------------------------------------------------------ inspection
    @property
    def covered(self) -> list[str]:
        """Names of the covered weights (module names; parameter names for expert weights)."""
        return list(self._targets)

    def magnitudes(self) -> dict[str, Tensor]:
        """Mean magnitude per output unit since the last reset: ``[F_out]`` or ``[E, F_out]``.

        With ``norm="l1"`` this is the per-token L1-normalised magnitude averaged over counted
        tokens; with ``"raw"`` the mean ``|h|``. Layers without a forward are omitted.
        """
        out: dict[str, Tensor] = {}
        for name, t in self._targets.items():
            if t.seen and t.acc is not None:
                count = t.count.clamp_min(1.0)
                out[name] = t.acc / (count.unsqueeze(-1) if t.is_expert else count)
        return out


class MIGU(_RowMasker):
    """Magnitude-based gradient updating: keep the gradient rows with the largest outputs.

    Every argument after ``ratio`` is keyword-only.

    Args:
        model: any ``nn.Module``; the hooks are placed on its submodules at construction.
        ratio: fraction of rows masked per layer (and per expert); 0.7 updates the top 30%.
            :func:`num_kept_rows` gives the exact count.
        targets: which layers to cover (see :data:`TargetSpec`); default every trainable
            ``nn.Linear`` (including LoRA's inner ``lora_A`` / ``lora_B``) and every expert probe.
        norm: ``"l1"`` (paper: per-token ``|h| / ||h||_1``, averaged over tokens) or ``"raw"``
            (released code: summed ``|h|``).
        enabled: when False the hooks do nothing and :meth:`apply_` only resets (first task).
        mask_bias: also zero the bias gradient of masked output units.
        skip_frozen: leave out weights with ``requires_grad=False`` at construction (e.g. LoRA's
            frozen base layers), saving their hook cost.
        freeze_masked_rows: keep masked rows bit-exactly still through weight decay and
            momentum (snapshot in :meth:`apply_`, write-back in :meth:`restore_`).
        optimizer: optimizer whose ``step`` triggers :meth:`restore_` (with freezing).
        sync: under ``torch.distributed`` with more than one process, sum the statistics over
            the processes in :meth:`apply_` so that every process masks the same rows (see the
            module docstring); a no-op in a single process.
        process_group: the group to sum over (default: the whole world).
    """

    def __init__(
        self,
        model: nn.Module,
        ratio: float = 0.7,
        *,
        targets: TargetSpec = None,
        norm: str = "l1",
        enabled: bool = True,
        mask_bias: bool = True,
        skip_frozen: bool = True,
        freeze_masked_rows: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        sync: bool = True,
        process_group: object | None = None,
    ) -> None:
        self.sync = bool(sync)
        self._process_group = process_group
        if norm not in NORMS:
            raise ValueError(
                f"norm must be one of {NORMS} ('l1': paper, per-token L1-normalised; "
                f"'raw': released code, summed |h|), got {norm!r}"
            )
        self._norm = norm
        super().__init__(
            model,
            ratio,
            targets=targets,
            enabled=enabled,
            mask_bias=mask_bias,
            skip_frozen=skip_frozen,
            freeze_masked_rows=freeze_masked_rows,
            optimizer=optimizer,
        )

    @property
    def norm(self) -> str:
        return self._norm

    def _sync_stats(self) -> None:
        """Sum the statistics over the data-parallel processes (see :func:`sum_over_processes`)."""
        if self.sync:
            sum_over_processes(list(self._targets.values()), self._process_group)

    def _keep_mask(self, target: CoveredWeight) -> Tensor | None:
        if not target.seen or target.acc is None:
            return None  # no forward this step: its gradient is zero or stale; leave it alone
        return self._topk_mask(target.acc)


class RandomMask(_RowMasker):
    """Control for MIGU: mask uniformly random rows, the same number per layer (and expert).

    Same constructor and methods as :class:`MIGU` minus ``norm`` plus ``seed`` (keyword-only,
    like every argument after ``ratio``); installs no forward hooks
    (``set_token_mask`` and expert ``record`` functions are accepted and ignored). Every covered
    weight with a gradient is masked at each :meth:`apply_`; masks are redrawn per call from a
    private ``torch.Generator`` seeded with ``seed``.
    """

    _needs_stats = False

    def __init__(
        self,
        model: nn.Module,
        ratio: float = 0.7,
        *,
        seed: int = 0,
        targets: TargetSpec = None,
        enabled: bool = True,
        mask_bias: bool = True,
        skip_frozen: bool = True,
        freeze_masked_rows: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        self._generator = torch.Generator().manual_seed(int(seed))
        super().__init__(
            model,
            ratio,
            targets=targets,
            enabled=enabled,
            mask_bias=mask_bias,
            skip_frozen=skip_frozen,
            freeze_masked_rows=freeze_masked_rows,
            optimizer=optimizer,
        )

    def _keep_mask(self, target: CoveredWeight) -> Tensor:
        scores = torch.rand(target.mask_shape(), generator=self._generator)
        return self._topk_mask(scores)
