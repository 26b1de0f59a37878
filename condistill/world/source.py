"""The ``synthetic`` data source: the embedded world's procedural scenes as a data source.

``open_source("synthetic")``, ``open_source("synthetic:heldout")`` and
``open_source("synthetic:train:5000")`` (split and number of scenes) open a
:class:`SyntheticSource`. :mod:`condistill.data` does not import this module at load time:
``open_source`` imports it by name the first time it meets a ``synthetic`` spec
(``condistill.data.sources.PACKAGED_KINDS``), and importing it registers the ``synthetic`` prefix with the one
:func:`~condistill.data.sources.register_source_kind` call at the bottom of this module.
"""
from __future__ import annotations

from typing import Any

from condistill.data.sources import DataSource, RecordSequenceSource, construct_source, register_source_kind
from condistill.world.scenes import SPLITS, SyntheticScenes

__all__ = ["SyntheticSource", "open_synthetic"]


class SyntheticSource(RecordSequenceSource):
    """The built-in procedural scenes (caption, exact depth, object masks, attributes).

    Args:
        split: ``"train"`` or ``"heldout"`` (disjoint random streams).
        size: number of scenes (default: ``SyntheticScenes``' default).
        resolution: side length (at least 16).
        seed: scene ``i`` is a pure function of ``(seed, split, i)``.
    """

    def __init__(self, split: str = "train", size: int | None = None, resolution: int = 64, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; expected one of {sorted(SPLITS)}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive int (number of scenes), got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        kwargs: dict[str, Any] = {"split": split, "resolution": resolution, "seed": seed}
        if size is not None:
            kwargs["size"] = size
        scenes = SyntheticScenes(**kwargs)
        self.split, self.seed = split, seed
        super().__init__(
            scenes, resolution, name=f"SyntheticSource(split={split!r}, size={len(scenes)}, seed={seed})"
        )

    def _key(self, index: int) -> str:
        return f"synthetic-{self.split}-{self.seed}-{index:07d}"


def _parse_synthetic(spec: str) -> dict[str, Any]:
    parts = spec.split(":")
    if len(parts) > 3:
        raise ValueError(f"bad synthetic spec {spec!r}; use 'synthetic', 'synthetic:<split>' or 'synthetic:<split>:<size>'")
    out: dict[str, Any] = {}
    if len(parts) >= 2 and parts[1]:
        out["split"] = parts[1]
    if len(parts) == 3:
        try:
            out["size"] = int(parts[2])
        except ValueError:
            raise ValueError(f"bad synthetic spec {spec!r}: size {parts[2]!r} is not an integer (e.g. 'synthetic:train:5000')") from None
    return out


def open_synthetic(spec: str, *, resolution: int, split: str, options: dict[str, Any]) -> DataSource:
    """Open the spec ``synthetic``, ``synthetic:<split>`` or ``synthetic:<split>:<size>``.

    This is the opener registered for the ``synthetic`` prefix. A split written in the
    spec wins over ``split``; a size written in the spec and a different ``size`` in
    ``options`` is an error. The other ``options`` go to :class:`SyntheticSource`.

    Raises:
        ValueError: a malformed spec, a clash between the spec and ``options``, or an
            option :class:`SyntheticSource` does not take.
    """
    options = dict(options)
    parsed = _parse_synthetic(spec)
    for name, value in parsed.items():
        if name in options and options[name] != value:
            raise ValueError(f"{name} is given twice: {value!r} in the spec {spec!r} and {options[name]!r} as an option")
        options.pop(name, None)
    fixed = {"split": split, **parsed, "resolution": resolution}
    return construct_source(SyntheticSource, options, **fixed)


register_source_kind("synthetic", open_synthetic)
