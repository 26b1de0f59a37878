"""Conditions from other packages, without touching condistill.

* **Installed**: a package declares its :class:`~condistill.conditions.Condition` subclass in the entry-point
  group :data:`ENTRY_POINT_GROUP` (``name = "package.module:Class"``, the name being the class's ``name``).
  Looking up an unknown condition name (training, evaluation, ``load_adapter``, the model card) loads the
  installed entry point of that name and registers its class. This is the only way a name recorded in an
  export resolves to code: nothing named in a downloaded config is ever imported.
* **On the command line, for training**: ``condistill train package.module:Class`` imports that module and
  registers the class (:func:`import_condition`); its export records only the class's ``name``, so loading it
  elsewhere needs the package installed with its entry point.
"""
from __future__ import annotations

import importlib

__all__ = ["ENTRY_POINT_GROUP", "entry_point_names", "load_entry_point", "import_condition"]

ENTRY_POINT_GROUP = "condistill.conditions"


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def entry_point_names() -> list[str]:
    """The condition names installed packages declare (not loaded)."""
    return sorted(_entry_points())


def _register(cls, where: str, name: str | None = None) -> str:
    from condistill.conditions.condition import Condition, register_condition

    if not (isinstance(cls, type) and issubclass(cls, Condition)):
        raise TypeError(f"{where} is not a condistill Condition subclass (got {cls!r}).")
    if name is not None and cls.name != name:
        raise ValueError(f"{where} declares the condition {name!r} but its class is named {cls.name!r}; the entry "
                         "point's name must be the class's name.")
    register_condition(cls)
    return cls.name


def load_entry_point(name: str) -> bool:
    """Load and register the installed condition ``name``; ``False`` when no installed package declares it."""
    ep = _entry_points().get(name)
    if ep is None:
        return False
    _register(ep.load(), f"entry point {name} = {ep.value} (group {ENTRY_POINT_GROUP})", name)
    return True


def import_condition(spec: str) -> str:
    """Import ``package.module:Class``, register the class and return its condition name (training only).

    Raises:
        ValueError: ``spec`` is not ``module:Class``, or the module or class cannot be found.
    """
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"{spec!r}: name a condition class as package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{spec!r}: cannot import {module_name} ({error}); is it on PYTHONPATH or installed?") from None
    if not hasattr(module, class_name):
        raise ValueError(f"{spec!r}: {module_name} has no {class_name}")
    return _register(getattr(module, class_name), spec)
