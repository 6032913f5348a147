"""rmoe with the tools researchers already use.

Modules (each imports its third-party library lazily, so ``import rmoe`` never needs them):

* :mod:`rmoe.integrations.lm_eval` — lm-evaluation-harness: an ``LM`` wrapper around a loaded
  rmoe model, the built-in offline tasks, and the runner behind ``rmoe eval --tasks``
  (``pip install 'rmoe[eval]'``).
* :mod:`rmoe.integrations.trainer` — the transformers ``Trainer``: a callback that logs the LM
  loss, the router losses and the per-layer routing metrics.
* :mod:`rmoe.integrations.peft` — LoRA targets for an rmoe model (attention, experts through
  ``target_parameters``, the router only when asked).
* :mod:`rmoe.integrations.export` — writing a linear-router rmoe model as a native transformers
  checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) behind ``rmoe export``.
"""
