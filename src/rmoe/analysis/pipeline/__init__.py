"""The stages of ``rmoe analyze`` (composed by :func:`rmoe.analysis.run.analyze`).

* :mod:`~rmoe.analysis.pipeline.load` — a model through :func:`rmoe.loading.load_model`, its
  adapter and the analysed token windows;
* :mod:`~rmoe.analysis.pipeline.capture` — the forward pass inside the adapter's capture, with
  the loss from :func:`rmoe.evaluation.batch_losses`;
* :mod:`~rmoe.analysis.pipeline.metrics` — expert analyses, router gradients and the
  comparison of two models (routing statistics come from :mod:`rmoe.analysis.routing`);
* :mod:`~rmoe.analysis.pipeline.figures` — one function per figure, registered in ``FIGURES``;
* :mod:`~rmoe.analysis.pipeline.records` — the typed records the stages pass on, and their
  ``metrics.json`` layout.

The report (``metrics.json`` + ``report.html``) is written by :mod:`rmoe.analysis.report`.
"""
