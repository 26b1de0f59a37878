"""Where a student's single sampling step starts: the one-step start recorded with an export.

A student sampled in one step makes one call ``x = F(z_s, s)``. Which ``(z_s, s)`` it was
trained for is a fact of its training, and sampling it from anywhere else wastes it:

* ``{"timestep": top, "from": "noise"}``: pure noise at the top of the grid (distribution
  matching trained from noise; also what every CoDi student samples one step from);
* ``{"timestep": s, "from": "zero"}``: the zero latent noised to ``s``, ``z_s = s_s eps``
  (``--dmd-start-timestep`` on a condition that is not an image: edge, depth);
* ``{"timestep": s, "from": "input"}``: the condition's own image encoded and noised to ``s``,
  ``z_s = a_s z_img + s_s eps`` (``--dmd-start-timestep`` on sr, inpaint).

The export records it in ``condistill_config.json`` and in its scheduler's config
(``one_step_start``); :class:`~condistill.method.codi_scheduler.CoDiScheduler` starts a one-step
schedule there, and ``load_adapter`` returns an img2img pipeline for an ``input`` start.
Exports written before the dict form recorded the bare timestep of a ``--dmd-start-timestep`` run
(``normalize``). These are plain functions of JSON values: no state, no tensors.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ONE_STEP_FROM", "describe", "normalize", "problems", "trained_start"]

#: where a one-step start's latent comes from
ONE_STEP_FROM = ("noise", "zero", "input")

_WORDS = {"noise": "pure noise", "zero": "the zero latent", "input": "the input"}


def trained_start(loss: str, dmd_start_timestep: int, has_start_image: bool, grid_top: int) -> dict | None:
    """The one-step start a run trained for: distribution matching shapes its one-step outputs from
    pure noise at ``grid_top`` or, with ``dmd_start_timestep``, from the condition's image (``input``)
    or the zero latent noised there; a run without distribution matching was not trained for one
    step in particular (None: sampled like any other step count, from noise at the top)."""
    if loss not in ("codi+dmd", "dmd"):
        return None
    if not dmd_start_timestep:
        return {"timestep": int(grid_top), "from": "noise"}
    return {"timestep": int(dmd_start_timestep), "from": "input" if has_start_image else "zero"}


def normalize(value: Any, has_start_image: bool) -> Any:
    """The dict form of a recorded start: a bare timestep (written before the dict form, always by a
    ``--dmd-start-timestep`` run) becomes ``{"timestep": t, "from": "input" | "zero"}``; anything
    else is returned unchanged for :func:`problems` to judge."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"timestep": value, "from": "input" if has_start_image else "zero"}
    return value


def problems(value: Any, grid: Sequence[int] | None, has_start_image: bool | None) -> list[str]:
    """What is wrong with a recorded start (``[]`` when it can be sampled from), each as one phrase; a bare
    timestep is judged in its :func:`normalize` form.

    ``grid``: the training grid (ascending), None when unknown; ``has_start_image``: whether the
    condition is an image (None when unknown)."""
    value = normalize(value, bool(has_start_image))
    if value is None:
        return []
    if not isinstance(value, dict) or set(value) != {"timestep", "from"}:
        return ['must be null or {"timestep": <a grid timestep>, "from": "noise" | "zero" | "input"}']
    out = []
    timestep, source = value["timestep"], value["from"]
    if isinstance(timestep, bool) or not isinstance(timestep, int) or (grid is not None and timestep not in grid):
        points = f"{grid[0]}, {grid[1]}, ... {grid[-1]}" if grid is not None and len(grid) > 1 else "its points"
        out.append(f"timestep {timestep!r} must be a timestep of the training grid ({points})")
    if source not in ONE_STEP_FROM:
        out.append(f'from {source!r} must be one of {", ".join(map(repr, ONE_STEP_FROM))}')
    elif source == "noise" and grid is not None and timestep != grid[-1]:
        out.append(f"from 'noise' starts at the top of the grid ({grid[-1]}), not {timestep!r}")
    elif source == "input" and has_start_image is False:
        out.append("from 'input' needs a condition that is an image (sr, inpaint); this one is not")
    elif source == "zero" and has_start_image is True:
        out.append("from 'zero' is for conditions that are not images; this condition starts from 'input'")
    return out


def describe(value: dict | None) -> str:
    """The start in words, e.g. ``"the zero latent noised to t = 499"``."""
    if value is None:
        return "pure noise at the top of the grid (not trained for one step in particular)"
    if value["from"] == "noise":
        return f"pure noise at t = {value['timestep']}"
    return f"{_WORDS[value['from']]} noised to t = {value['timestep']}"
