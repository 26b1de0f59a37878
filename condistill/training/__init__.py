"""Training: the loop (:mod:`~condistill.training.loop`), the per-step objective built once from
the config (:mod:`~condistill.training.objective`), the EMA and resumable checkpoints."""
