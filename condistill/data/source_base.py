"""What every data source kind shares: the base classes, the spec forms, caption cells.

The source kinds (:mod:`condistill.data.folder`, :mod:`condistill.data.hf_datasets`,
:mod:`condistill.data.hf_streaming`, :mod:`condistill.data.webdataset`, and
``condistill.world.source``) import their base classes from here, and
:mod:`condistill.data.sources` (``open_source`` and the registry of spec prefixes) imports the
kinds: the imports go one way, so no module needs a deferred import to break a cycle.
:mod:`condistill.data.sources` re-exports :class:`DataSource`, :class:`IndexedSource` and
:data:`SPEC_FORMS` under their old names.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from condistill.data.images import key_rng
from condistill.data.record import Record
from condistill.data.skips import SkipItem, SourceStats

__all__ = ["SPEC_FORMS", "DataSource", "IndexedSource", "ShardedSource", "caption_from_cell"]

SPEC_FORMS = (
    "'synthetic', 'synthetic:heldout', 'synthetic:train:5000' (split and size), "
    "a folder of images (png/jpg/jpeg/webp/bmp/tif, captions in name.txt or metadata.jsonl), "
    "a folder written by datasets' save_to_disk, "
    "webdataset .tar shards (a path, a glob, or a brace pattern like 'shard-{000..003}.tar'), "
    "or a Hugging Face dataset id such as 'user/name' (read from the local cache when HF_HUB_OFFLINE=1)"
)


def caption_from_cell(value: Any, seed: int, key: str) -> str:
    """Normalise a caption cell: ``None`` -> ``""``, a list -> one entry chosen per (seed, key)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    if isinstance(value, (list, tuple)):
        options = [str(v).strip() for v in value if v is not None and str(v).strip()]
        if not options:
            return ""
        return options[int(key_rng(seed, key).integers(len(options)))]
    return str(value).strip()


class DataSource(abc.ABC):
    """An iterable of :class:`Record` at a fixed square ``resolution``.

    Iterating yields every usable record once; unusable items are skipped and counted in
    :attr:`stats`. If a full pass yields nothing, iteration raises
    :class:`~condistill.data.skips.EmptySourceError` explaining what was skipped and why.

    Attributes:
        resolution: side length of every yielded image.
        stats: conversion and skip counts (:class:`SourceStats`).
    """

    def __init__(self, resolution: int, name: str):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.resolution = resolution
        self.stats = SourceStats(name=name)

    @property
    def name(self) -> str:
        """A short description of the source, used in messages."""
        return self.stats.name

    #: skip (as ``missing_conditioning``) every record without a control image (``Record.conditioning``): set by
    #: :func:`~condistill.data.sources.open_source` for a condition that takes the data's own control images
    require_conditioning: bool = False

    def observe_decode(self, key: str, decode: Callable[[], tuple[Record, Any]]) -> Record | None:
        """``decode()`` -> ``(record, conversions)``, counted in :attr:`stats` under ``key``; ``None`` when it skips.

        A :class:`~condistill.data.skips.SkipItem` raised by ``decode`` is counted as that item's skip.
        """
        try:
            record, conversions = decode()
            if self.require_conditioning and record.conditioning is None:
                raise SkipItem("missing_conditioning", "the item has no control image")
        except SkipItem as exc:
            self.stats.observe(key, skipped=exc)
            return None
        self.stats.observe(key, conversions)
        return record

    def __repr__(self) -> str:
        return f"<{self.name}, resolution={self.resolution}>"

    def __iter__(self) -> Iterator[Record]:
        yielded = 0
        for record in self._iter_records():
            yielded += 1
            yield record
        if yielded == 0:
            raise self.stats.empty_error(self._empty_hint())

    @abc.abstractmethod
    def _iter_records(self) -> Iterator[Record]:
        """Yield usable records, counting every item in ``self.stats``."""

    def _empty_hint(self) -> str:
        return ""


class IndexedSource(DataSource):
    """A sized source with random access: ``len(source)`` items, ``source.load(i)``.

    ``len`` counts candidate items; an item that turns out unusable is skipped
    (:meth:`load` returns ``None``) and counted in :attr:`stats`.
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of candidate items."""

    @abc.abstractmethod
    def _key(self, index: int) -> str:
        """The stable key of item ``index`` (known without decoding it)."""

    @abc.abstractmethod
    def _load(self, index: int) -> tuple[Record, list[str]]:
        """Decode item ``index``; return ``(record, conversions)`` or raise :class:`SkipItem`."""

    def load(self, index: int) -> Record | None:
        """Load item ``index`` (negative counts from the end).

        Returns:
            The record, or ``None`` if the item is unusable (the reason is counted in
            :attr:`stats`).

        Raises:
            IndexError: if ``index`` is out of range.
        """
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} with {n} items")
        return self.observe_decode(self._key(index), lambda: self._load(index))

    def _iter_records(self) -> Iterator[Record]:
        for index in range(len(self)):
            record = self.load(index)
            if record is not None:
                yield record


class ShardedSource(DataSource):
    """A stream-only source read shard by shard (tar shards, ``datasets`` streams).

    A subclass sets :attr:`shards` (names) and implements :meth:`shard_samples` and
    :meth:`decode_sample`; iterating reads the shards in order, and
    :class:`~condistill.data.streaming.StreamingConditionDataset` hands them to its streams.
    """

    shards: list[str]

    @abc.abstractmethod
    def shard_samples(self, shard: str, report: bool = True) -> Iterator[tuple[str, Any]]:
        """Yield ``(key, raw sample)`` for each sample of ``shard``, in order, nothing decoded."""

    @abc.abstractmethod
    def decode_sample(self, shard: str, key: str, raw: Any) -> Record | None:
        """The record of one raw sample, or ``None`` when it is unusable (counted in :attr:`stats`)."""

    def count_samples(self, shard: str) -> int:
        """How many samples :meth:`shard_samples` yields for ``shard`` (read, not decoded)."""
        return sum(1 for _ in self.shard_samples(shard, report=False))

    def _iter_records(self) -> Iterator[Record]:
        for shard in self.shards:
            for key, raw in self.shard_samples(shard):
                record = self.decode_sample(shard, key, raw)
                if record is not None:
                    yield record

    def _empty_hint(self) -> str:
        return f"Shards read: {len(self.shards)}."
