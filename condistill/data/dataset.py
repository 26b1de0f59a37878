"""The torch ``Dataset`` the training loop reads: image tensor + condition tensor + caption."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from condistill.data.skips import EmptySourceError, SourceStats
from condistill.data.record import Record
from condistill.data.sources import DataSource, IndexedSource, RecordSequenceSource
from condistill.seeding import derive_seed

__all__ = ["ConditionDataset", "DATA_EVENTS_KEY", "build_item", "check_condition", "collate", "image_to_tensor"]

#: The batch entry :meth:`ConditionDataset.collate` adds: the source's data events (new items
#: seen, skips) from the process that built the batch, for :mod:`condistill.data.report`.
DATA_EVENTS_KEY = "data_events"


def image_to_tensor(image) -> torch.Tensor:
    """An RGB ``PIL.Image`` as ``float32 [3, H, W]`` in ``[-1, 1]`` (the VAE's input range)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


def check_condition(condition: Any) -> int:
    """The channel count ``C`` of ``condition``, after checking it is a usable condition object.

    Raises:
        TypeError: ``condition`` is not callable or has no positive int ``channels``.
    """
    channels = getattr(condition, "channels", None)
    if not callable(condition) or isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise TypeError(
            "condition must be a callable object with a positive int attribute `channels` and "
            f"__call__(record, seed) -> tensor [C, H, W]; got {type(condition).__name__} (channels={channels!r})"
        )
    return channels


class ConditionDataset(Dataset):
    """Pairs each record's image with the condition computed from it.

    ``dataset[i]`` is a dict:

    * ``pixel_values``: ``float32 [3, H, W]`` in ``[-1, 1]``;
    * ``conditioning``: ``float32 [C, H, W]`` in ``[0, 1]``, ``condition(record, seed=s)``
      with ``s = derive_seed(seed, i)``, so item ``i`` is identical on every access, in
      every worker and every run with the same ``seed``;
    * ``caption``: ``str`` (may be empty);
    * ``key``: ``str``, the record's key (or ``str(i)``).

    Sources with random access (synthetic scenes, image folders, ``datasets``) are read
    item by item on access. An item the source skips (e.g. a corrupt file) is replaced by
    the next usable item (wrapping around), deterministically; ``source.stats`` counts it.
    Stream-only sources (tar shards, plain iterables of records) are read into memory
    once, on first access.

    Skips made in a DataLoader worker are counted in that worker's copy of ``source.stats``
    only. Use :meth:`collate` as the loader's ``collate_fn`` after :meth:`track_events`: each
    batch then carries (under :data:`DATA_EVENTS_KEY`) the observations made while it was
    built, in whichever process built it, for the main process to count.

    Args:
        source: a :class:`~condistill.data.sources.DataSource`, a sequence of
            :class:`Record` (e.g. ``SyntheticScenes``), or an iterable of records.
        condition: callable with ``channels: int`` and
            ``__call__(record, seed) -> Tensor [C, H, W]`` in ``[0, 1]``.
        resolution: expected image side; defaults to the source's. A
            ``DataSource`` opened at another resolution is an error; plain records are
            resized to it.
        seed: base of the per-item condition seeds.
    """

    def __init__(
        self,
        source: DataSource | Sequence[Record] | Iterable[Record],
        condition: Any,
        resolution: int | None = None,
        seed: int = 0,
    ):
        self.channels = check_condition(condition)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(source, DataSource):
            if resolution is not None and resolution != source.resolution:
                raise ValueError(
                    f"{source.name} was opened at resolution {source.resolution} but the dataset asks for "
                    f"{resolution}; open the source with resolution={resolution}"
                )
            resolution = source.resolution
        else:
            if resolution is None:
                raise ValueError("resolution is required when source is not a DataSource (it has no resolution)")
            if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
                source = RecordSequenceSource(source, resolution)
            elif not isinstance(source, Iterable):
                raise TypeError(f"source must be a DataSource or an iterable of Record, got {type(source).__name__}")
        self.source = source
        self.condition = condition
        self.resolution = int(resolution)
        self.seed = seed
        self._records: list[Record] | None = None  # materialised stream-only sources
        self._substitute: dict[int, int] = {}  # skipped index -> index used instead

    # ------------------------------------------------------------------ records
    def _materialise(self) -> list[Record]:
        if self._records is None:
            records = []
            for record in self.source:
                if not isinstance(record, Record):
                    raise TypeError(f"the source yielded a {type(record).__name__}, not a Record")
                records.append(record)
            if not records:
                stats = getattr(self.source, "stats", None)
                raise stats.empty_error() if stats is not None else EmptySourceError("the data source yielded no records")
            self._records = records
        return self._records

    def __len__(self) -> int:
        if isinstance(self.source, IndexedSource):
            return len(self.source)
        return len(self._materialise())

    def record(self, index: int) -> Record:
        """The (sanitised) record behind item ``index``."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        if not isinstance(self.source, IndexedSource):
            return self._materialise()[index]
        start = self._substitute.get(index, index)
        for step in range(n):
            candidate = (start + step) % n
            record = self.source.load(candidate)
            if record is not None:
                if candidate != index:
                    self._substitute[index] = candidate
                return record
        raise self.source.stats.empty_error()

    # ------------------------------------------------------------------ data events
    @property
    def stats(self) -> SourceStats | None:
        """The source's :class:`SourceStats` (``None`` for a plain iterable of records)."""
        return getattr(self.source, "stats", None)

    def track_events(self) -> None:
        """Queue every new observation of the source so that :meth:`collate` can hand it over."""
        if self.stats is not None:
            self.stats.open_outbox()

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """:func:`collate`, plus ``batch[DATA_EVENTS_KEY]``: the source events queued in this process
        since the last batch (empty unless :meth:`track_events` was called).

        A DataLoader worker fetches a batch's items and collates them in the same process, on the
        same copy of the dataset, so a batch carries exactly the observations its items caused.
        """
        batch = collate(items)
        batch[DATA_EVENTS_KEY] = self.stats.drain() if self.stats is not None else []
        return batch

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += len(self)
        return build_item(self.record(index), self.condition, self.resolution, derive_seed(self.seed, index),
                          str(index), self.channels)


def build_item(record: Record, condition: Any, resolution: int, seed: int, fallback_key: str,
               channels: int | None = None) -> dict[str, Any]:
    """One dataset item (the dict :class:`ConditionDataset` documents) from a sanitised record.

    ``conditioning`` is ``condition(record, seed=seed)``, checked (shape ``[C, resolution,
    resolution]``, float, values in ``[0, 1]``) and clamped; ``key`` is the record's key, else
    ``fallback_key``. :class:`ConditionDataset` and the streaming dataset build items here.
    """
    channels = check_condition(condition) if channels is None else channels
    if record.image.mode != "RGB" or record.image.size != (resolution, resolution):
        raise ValueError(
            f"record {record.key!r} has a {record.image.mode} {record.image.size} image; expected RGB "
            f"{resolution}x{resolution} (sources return sanitised images; check the source)"
        )
    conditioning = condition(record, seed=seed)
    _check_conditioning(conditioning, condition, (channels, resolution, resolution), record)
    return {
        "pixel_values": image_to_tensor(record.image),
        "conditioning": conditioning.to(torch.float32).clamp_(0.0, 1.0),
        "caption": record.caption or "",
        "key": record.key or fallback_key,
    }


def _check_conditioning(tensor: Any, condition: Any, expected: tuple[int, int, int], record: Record) -> None:
    name = type(condition).__name__
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"condition {name} returned a {type(tensor).__name__}, expected a torch.Tensor")
    if tuple(tensor.shape) != expected:
        raise ValueError(f"condition {name} returned shape {tuple(tensor.shape)} for {record.key!r}; expected {expected}")
    if not torch.is_floating_point(tensor):
        raise ValueError(f"condition {name} returned dtype {tensor.dtype}; expected a float tensor in [0, 1]")
    lo, hi = float(tensor.min()), float(tensor.max())
    if lo < -1e-4 or hi > 1 + 1e-4 or not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"condition {name} returned values in [{lo:.4g}, {hi:.4g}] for {record.key!r}; expected [0, 1]")


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack :class:`ConditionDataset` items into a batch.

    Returns:
        ``pixel_values`` ``[B, 3, H, W]``, ``conditioning`` ``[B, C, H, W]``,
        ``caption`` and ``key`` as lists of ``B`` strings (the same keys as the items, as
        ``torch.utils.data.default_collate`` would give).
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "conditioning": torch.stack([item["conditioning"] for item in batch]),
        "caption": [item["caption"] for item in batch],
        "key": [item["key"] for item in batch],
    }
