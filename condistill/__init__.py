"""condistill: single-stage conditional distillation of latent diffusion models.

Public API (imported lazily, so ``import condistill`` stays fast):

- :func:`load_adapter` - a stock diffusers pipeline with a distilled adapter and the few-step scheduler.
- :func:`distill` - run one distillation (what the recipes call).
- :class:`DistillConfig` - the validated options of a run.
- :class:`CoDiScheduler` - the few-step diffusers scheduler on the training grid.
- :func:`load_base`, :func:`get_condition`, :func:`open_source`.
"""
from __future__ import annotations

import importlib

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("condistill")
except Exception:  # running from a source tree that was never installed
    __version__ = "0.3.0"

_EXPORTS = {
    "load_adapter": "condistill.pipeline",
    "distill": "condistill.training.loop",
    "DistillConfig": "condistill.config",
    "CoDiScheduler": "condistill.method.codi_scheduler",
    "load_base": "condistill.frozen",
    "get_condition": "condistill.conditions",
    "open_source": "condistill.data.sources",
    "push_to_hub": "condistill.publish.push",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'condistill' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
