"""rmoe models in the transformers ``Trainer``, with the routing visible.

The plain ``Trainer`` logs one number, the combined loss. :class:`RMoETrainer` (or
:class:`RoutingLoggingMixin` in front of your own ``Trainer`` subclass) adds, at every logging
step, what rmoe's own trainer logs:

* ``lm_loss``, ``aux_loss`` (the balance loss, unscaled) and ``z_loss``, averaged over the
  micro-batches since the last log (the ``loss`` the Trainer logs stays its own);
* per MoE layer ``i``, from the last micro-batch before the log:
  ``layer_load_cv/layer<i>``, ``layer_max_violation/layer<i>``, ``layer_entropy/layer<i>``,
  ``layer_aux/layer<i>``, ``layer_dropped/layer<i>``, ``layer_logit_std/layer<i>`` and, for
  routers with an aux-loss-free expert bias, ``layer_bias_range/layer<i>`` (definitions:
  :func:`rmoe.analysis.routing.training_log_stats`). One scalar per key, so TensorBoard and W&B
  group them by layer.

It also installs rmoe's router step on the Trainer's optimizer (an optimizer-step pre-hook, like
rmoe's trainer): the expert biases of ``router_expert_bias`` routers move once per optimizer step
from the loads of all its micro-batches, and the global balance loss's step buffers reset. With a
plain ``Trainer`` the biases would never move.

Evaluation: in eval mode an rmoe model's ``loss`` is the LM loss alone (router losses join the
loss in training mode only), so ``eval_loss`` is the LM cross-entropy and
``math.exp(eval_loss)`` is the perplexity.

Example::

    from transformers import TrainingArguments
    from rmoe.integrations.trainer import RMoETrainer

    trainer = RMoETrainer(model=model, args=TrainingArguments("out", logging_steps=10),
                          train_dataset=train_ds, eval_dataset=eval_ds)
    trainer.train()          # logs loss, lm_loss, aux_loss, z_loss, layer_load_cv/layer0, ...
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

_LOSS_KEYS = ("lm_loss", "aux_loss", "z_loss")


class RoutingMeter:
    """Sums of the router-side losses since the last log, and the last routing statistics.

    Losses stay on their device as detached tensors (no host sync per micro-batch).
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._routing: dict[str, list[float]] | None = None

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self._sums, self._count, self._routing = {}, 0, None

    def add(self, outputs: Any) -> None:
        """Record one training micro-batch's ``lm_loss``, ``aux_loss`` and ``z_loss`` (scalars
        on the model's output; a missing one is skipped)."""
        for key in _LOSS_KEYS:
            value = _get(outputs, key)
            if value is None:
                continue
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1

    def set_routing(self, stats: dict[str, list[float]]) -> None:
        """Keep the per-layer statistics of the latest micro-batch that asked for them."""
        self._routing = stats

    def pop(self) -> dict[str, float]:
        """The logged values (means of the losses; per-layer statistics flattened to
        ``layer_<key>/layer<i>``); resets the meter."""
        out: dict[str, float] = {}
        if self._count:
            for key, total in self._sums.items():
                out[key] = round(float(total) / self._count, 6)
        for key, values in (self._routing or {}).items():
            for i, v in enumerate(values):
                out[f"layer_{key}/layer{i}"] = round(float(v), 6)
        self.reset()
        return out


def _get(outputs: Any, key: str) -> Any:
    if isinstance(outputs, dict):
        return outputs.get(key)
    return getattr(outputs, key, None)


def _rmoe_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The rmoe model inside ``model`` (DDP / accelerate / PEFT wrappers), or None."""
    for module in model.modules():
        if getattr(getattr(module, "config", None), "model_type", None) == "rmoe":
            return module
    return None


class _RouterStepCallback(TrainerCallback):
    """Installs rmoe's router step on the Trainer's optimizer once it exists."""

    def __init__(self, trainer: RoutingLoggingMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: D102
        self.trainer._attach_router_step()


class RoutingLoggingMixin:
    """Put in front of ``transformers.Trainer`` (or a subclass of it) to log rmoe's router
    losses and per-layer routing statistics and to run the expert-bias update per optimizer
    step. ``class MyTrainer(RoutingLoggingMixin, MyBaseTrainer): ...``. Models that are not
    rmoe models are trained as the base Trainer would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._routing_meter = RoutingMeter()
        self._router_step_handle = None
        self.add_callback(_RouterStepCallback(self))

    def _attach_router_step(self) -> None:
        from rmoe.training.step import attach_router_step

        target = _rmoe_model(self.model)
        if target is None or self.optimizer is None:
            return
        if self._router_step_handle is not None:
            self._router_step_handle.remove()
        # accelerate wraps the optimizer; the hook belongs on the torch optimizer it steps
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self._router_step_handle = attach_router_step(target, optimizer)

    def _logs_routing_next(self) -> bool:
        """Whether the micro-batch being computed belongs to a step the Trainer will log."""
        args, state = self.args, self.state
        if str(getattr(args, "logging_strategy", "steps")).endswith("no"):
            return False
        upcoming = state.global_step + 1
        if args.logging_first_step and upcoming == 1:
            return True
        steps = state.logging_steps or args.logging_steps
        return bool(steps) and upcoming % max(int(steps), 1) == 0

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """The base Trainer's loss; in training it also records the router losses and, on a
        micro-batch of a logged step, the per-layer routing statistics."""
        target = _rmoe_model(model) if model.training else None
        want_routing = target is not None and self._logs_routing_next()
        if want_routing:
            inputs = {**inputs, "output_routing": True}
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if target is not None:
            self._routing_meter.add(outputs)
            routing = _get(outputs, "routing")
            if want_routing and routing:
                self._routing_meter.set_routing(_routing_stats(target, routing))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the router values to a training log (one that carries ``loss``)."""
        if "loss" in logs:
            logs.update(self._routing_meter.pop())
        super().log(logs, *args, **kwargs)


def _routing_stats(model: torch.nn.Module, routing: Any) -> dict[str, list[float]]:
    from rmoe.analysis.routing import training_log_stats
    from rmoe.modeling.balancing import bias_routers

    biases = [r.expert_bias for r in bias_routers(model)] or None
    if biases is not None and len(biases) != len(routing):
        biases = None
    return training_log_stats(routing, biases)


class RMoETrainer(RoutingLoggingMixin, Trainer):
    """``transformers.Trainer`` that logs rmoe's router losses and per-layer routing metrics
    and runs the expert-bias update once per optimizer step (see the module docstring)."""
