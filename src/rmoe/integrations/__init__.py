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
  checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) behind ``rmoe export``.
* :mod:`rmoe.integrations.importing` — ``rmoe import``: transformers MoE checkpoints (Mixtral,
  OLMoE, Qwen2-MoE, Qwen3-MoE) as rmoe models with the same logits, optionally with the
  recurrent router retrofitted (identical at the start).
* :mod:`rmoe.integrations.upcycle` — ``rmoe upcycle``: dense Llama / Mistral / Qwen2 / Qwen3
  checkpoints as MoE models (expert copies: the dense function at the start; or a neuron split).
* :mod:`rmoe.integrations.families` / :mod:`~rmoe.integrations.tables` — the one two-way table
  per family (rmoe key <-> transformers key, layouts, config fields, requirements) that export,
  import and upcycle all read; :mod:`~rmoe.integrations.checkpoints` — safetensors reading and
  atomic output folders shared by them.
* :mod:`rmoe.integrations.lm_eval_model` / :mod:`~rmoe.integrations.lm_eval_tasks` — the
  lm_eval ``LM`` wrapper and the built-in task data (``lm_eval`` re-exports both).
"""
