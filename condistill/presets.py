"""Named starting points of the per-condition recipes (``condistill train CONDITION --preset P``).

A preset is a partial :class:`~condistill.config.DistillConfig`; options given on the command
line override it. ``cpu-demo`` (the default) uses the embedded tiny teacher and the synthetic
scenes and finishes on a laptop CPU; ``sd15-gpu`` is the starting point for Stable Diffusion 1.5 and
``sdxl-gpu`` for SDXL (docs/sdxl.md).
The ``_help`` entry of a preset is its one-line description in ``--help``.

Each condition class owns its recipe (``description``, ``presets``, built from the shared option sets
here: :data:`CPU`, :data:`SD15_GPU`, :data:`SDXL_GPU`, :data:`GUIDED`); :data:`RECIPES` reads them from
the registry.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["RECIPES", "DEFAULT_PRESET", "recipe_description", "presets_for", "condition_names", "CPU", "SD15_GPU", "SDXL_GPU",
           "GUIDED"]

DEFAULT_PRESET = "cpu-demo"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"

CPU = dict(batch_size=16, learning_rate=1e-3, ema_decay=0.9, checkpoint_every=100, threads=0)
SD15_GPU = dict(base=SD15, resolution=512, batch_size=8, learning_rate=1e-5, ema_decay=0.999, max_steps=10000,
                 mixed_precision="fp16", gradient_checkpointing=True, checkpoint_every=1000, validate_every=500)
# SDXL at its native 1024 px: bf16 (its VAE overflows in fp16), checkpointing, a smaller batch
SDXL_GPU = dict(SD15_GPU, base=SDXL, resolution=1024, batch_size=4, mixed_precision="bf16")
GUIDED = dict(guidance_min=1.0, guidance_max=4.0)

#: the built-in conditions' recipes first, in this order; other registered conditions with presets follow
RECIPE_ORDER = ("edge", "depth", "sr", "inpaint")


class _Recipes(Mapping):
    """condition -> (what the condition is, {preset name: options}), read from the registered condition classes
    (their ``description`` and ``presets``) when asked, so a condition registered later has its recipe too."""

    def _table(self) -> dict[str, tuple[str, dict[str, dict[str, Any]]]]:
        from condistill.conditions import available_conditions, condition_class

        names = [n for n in RECIPE_ORDER if n in available_conditions()]
        names += [n for n in available_conditions() if n not in RECIPE_ORDER]
        return {n: (condition_class(n).description, condition_class(n).presets) for n in names
                if condition_class(n).presets}

    def __getitem__(self, condition: str):
        return self._table()[condition]

    def __iter__(self):
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


RECIPES = _Recipes()


def _recipe(condition: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """The recipe of ``condition``; a registered condition without presets trains from condistill's defaults."""
    if condition in RECIPES:
        return RECIPES[condition]
    from condistill.conditions import condition_class

    try:
        cls = condition_class(condition)
    except ValueError:
        raise ValueError(f"no recipe for condition {condition!r}; choose one of {sorted(RECIPES)}") from None
    return (cls.description or f"the {condition} condition of {cls.__module__}.{cls.__qualname__}.",
            {DEFAULT_PRESET: {"_help": "condistill's defaults (this condition has no presets of its own)"}})


def condition_names() -> list[str]:
    """Every registered or installed condition, those with a recipe first in the recipes' order."""
    from condistill.conditions import available_conditions

    return [*RECIPES, *(name for name in available_conditions() if name not in RECIPES)]


def presets_for(condition: str) -> dict[str, dict[str, Any]]:
    """The presets of ``condition``'s recipe."""
    return _recipe(condition)[1]


def recipe_description(condition: str) -> str:
    """The first lines of ``condistill train CONDITION --help``."""
    return f"Distil a frozen text-to-image teacher into a few-step {condition} model. {_recipe(condition)[0]}"
