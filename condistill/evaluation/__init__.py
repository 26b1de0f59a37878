"""Evaluation: ``condistill eval`` (:mod:`~condistill.evaluation.evaluate`), the metrics it reports
(:mod:`~condistill.evaluation.metrics`) and the optional third-party ones (LPIPS, Inception FID)."""
