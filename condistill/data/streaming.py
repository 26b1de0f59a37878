"""Training data larger than memory: :class:`StreamingConditionDataset`, a torch ``IterableDataset``.

Stream-only sources (webdataset ``.tar`` shards, ``datasets`` opened with ``streaming=True``,
plain iterables of records) are read as they are consumed, never held in memory. The loop asks
:func:`is_streaming` which dataset a source needs.

How the stream is made, for a run with ``world_size`` processes and ``W`` DataLoader workers
(``W = 1`` for ``num_workers=0``), ``S = world_size * W`` streams:

* **shards to streams**: epoch ``e`` orders the shards by a permutation seeded by
  ``(seed, e)``; stream ``s`` reads shards ``order[s], order[s + S], ...``. With fewer shards
  than streams, every stream reads every shard and keeps the samples at positions
  ``p = s (mod S)`` of the epoch (a log line says so); a plain iterable is one shard.
* **shuffle**: each stream passes its samples, still encoded (tar members, ``datasets`` rows),
  through a buffer of ``shuffle_buffer`` samples seeded by ``(seed, e, S, s)``: once full, each new
  sample replaces a randomly drawn one, which goes out; at the end of the epoch the rest goes
  out in a seeded order. So each stream yields each of its samples once per epoch.
* **infinite**: epochs follow each other; the loop reads as many batches as it needs.
* **unusable samples** (a corrupt image) are counted in the source's stats and replaced by the
  next usable sample of the same stream, so stream position ``p`` is always raw sample ``p``
  (what makes resuming exact).
* **conditions**: the condition of a sample is computed with :func:`item_seed` of the run's seed
  and the sample's identity ``"<shard file name>::<key>"``, so a sample gets the same condition in
  every epoch, stream and run with the same seed, whichever position it is read at.
* **batches and resume**: the DataLoader takes batch ``i`` from worker ``i % W``. With
  ``start_micro_step = M``, loader worker ``w`` plays the part worker ``(M + w) % W`` had in an
  uninterrupted run and first passes over the :func:`batches_before` batches that worker already
  produced (whole epochs by counting samples, the rest of an epoch by reading the samples
  without decoding them). The loader then yields exactly the batches an uninterrupted loader
  yields from micro-batch ``M`` on. The stream depends on the seed, the rank, the world size and
  the worker count: resume with the same ones.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from condistill.data.dataset import DATA_EVENTS_KEY, build_item, check_condition, collate
from condistill.data.images import fit_record
from condistill.data.record import Record
from condistill.data.skips import EmptySourceError, SourceStats
from condistill.data.source_base import DataSource, IndexedSource
from condistill.seeding import derive_seed, numpy_rng

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "StreamingConditionDataset", "batches_before", "is_streaming", "item_seed"]

logger = logging.getLogger(__name__)

#: Samples held (encoded) by each stream's shuffle buffer unless told otherwise.
DEFAULT_SHUFFLE_BUFFER = 1000
_SHARD_ORDER_SALT = 0x53484F  # "SHO"
_SHUFFLE_SALT = 0x535546  # "SUF"
#: A stream that reads this many epochs in a row without one usable sample stops.
_MAX_UNUSABLE_EPOCHS = 3


def is_streaming(source: Any) -> bool:
    """True when ``source`` can only be read as a stream (use :class:`StreamingConditionDataset`).

    Stream-only: tar shards, ``datasets`` opened with ``streaming=True``, any other
    :class:`DataSource` without random access, plain iterables of records. Random access
    (``ConditionDataset``): :class:`IndexedSource` (synthetic, image folders, ``datasets``
    files and ``save_to_disk`` folders, which ``datasets`` memory-maps) and sequences.
    """
    if isinstance(source, IndexedSource):
        return False
    if isinstance(source, DataSource):
        return True
    if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
        return False
    return isinstance(source, Iterable) and not isinstance(source, (str, bytes))


def item_seed(seed: int, item_id: str) -> int:
    """The condition seed of the streamed sample ``item_id`` (``"<shard file name>::<key>"``)."""
    digest = int.from_bytes(hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest(), "big")
    return derive_seed(seed, digest)


def batches_before(start_micro_step: int, role: int, num_workers: int) -> int:
    """How many batches loader worker ``role`` of ``num_workers`` produced before micro-batch ``start_micro_step``
    (the DataLoader takes batch ``i`` from worker ``i % num_workers``)."""
    return max(0, -(-(start_micro_step - role) // num_workers))


class _Shards:
    """A source read shard by shard (``shards``, ``shard_samples``, ``count_samples``, ``decode_sample``)."""

    def __init__(self, source: DataSource):
        self.source = source
        self.names = list(source.shards)
        self.stats = source.stats

    def samples(self, j: int) -> Iterator[tuple[str, Any]]:
        return self.source.shard_samples(self.names[j])

    def count(self, j: int) -> int:
        return self.source.count_samples(self.names[j])

    def decode(self, j: int, key: str, raw: Any) -> Record | None:
        return self.source.decode_sample(self.names[j], key, raw)


class _Records:
    """Any re-iterable of records (a ``DataSource`` without shards, a generator-backed collection) as one shard."""

    def __init__(self, records: Iterable[Record], resolution: int):
        if iter(records) is records:
            raise TypeError(f"a one-shot iterator ({type(records).__name__}) cannot be read again each epoch; pass a "
                            "re-iterable collection of records (a list, a DataSource, an object with __iter__)")
        self.records, self.resolution = records, resolution
        self.names = ["records"]
        self.stats = getattr(records, "stats", None)

    def samples(self, j: int) -> Iterator[tuple[str, Any]]:
        for position, record in enumerate(self.records):
            yield (getattr(record, "key", "") or f"#{position}"), record

    def count(self, j: int) -> int:
        return sum(1 for _ in self.records)

    def decode(self, j: int, key: str, record: Any) -> Record | None:
        if not isinstance(record, Record):
            raise TypeError(f"the source yielded a {type(record).__name__}, not a Record")
        record, _ = fit_record(record, self.resolution)
        return record if record.key else replace(record, key=key)


class StreamingConditionDataset(IterableDataset):
    """Source + condition -> an endless, shuffled, resumable stream of training items.

    Items are those of :class:`~condistill.data.dataset.ConditionDataset` (``pixel_values``,
    ``conditioning``, ``caption``, ``key``); the condition seed is :func:`item_seed` of the
    sample's identity (see the module docstring for the whole stream). Read it with
    ``DataLoader(ds, batch_size=batch_size, num_workers=W, collate_fn=ds.collate)``; its batch
    ``i`` is micro-batch ``start_micro_step + i`` of the run.

    Args:
        source: tar shards (:class:`~condistill.data.webdataset.WebDatasetSource`), a streamed
            ``datasets`` source, another stream-only :class:`DataSource`, or a re-iterable of
            :class:`Record`.
        condition: callable with ``channels`` and ``__call__(record, seed) -> [C, H, W]``.
        resolution: image side; ``None`` takes the source's (required for plain records).
        seed: the run's seed (shard order, shuffle, condition seeds).
        batch_size: items per micro-batch (what the DataLoader is given).
        rank, world_size: this process among the run's processes.
        start_micro_step: the first micro-batch this loader yields (``0`` for a fresh run).
        shuffle_buffer: samples each stream buffers for shuffling (``1`` keeps the read order).
    """

    def __init__(
        self,
        source: DataSource | Iterable[Record],
        condition: Any,
        resolution: int | None,
        seed: int,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_micro_step: int = 0,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ):
        self.channels = check_condition(condition)
        for name, value, low in (("seed", seed, 0), ("batch_size", batch_size, 1), ("rank", rank, 0),
                                 ("world_size", world_size, 1), ("start_micro_step", start_micro_step, 0),
                                 ("shuffle_buffer", shuffle_buffer, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        if not is_streaming(source):
            raise TypeError(f"{getattr(source, 'name', type(source).__name__)} has random access; read it with "
                            "ConditionDataset (is_streaming(source) tells which one a source needs)")
        if isinstance(source, DataSource):
            if resolution is not None and resolution != source.resolution:
                raise ValueError(f"{source.name} was opened at resolution {source.resolution} but the dataset asks for "
                                 f"{resolution}; open the source with resolution={resolution}")
            resolution = source.resolution
        elif resolution is None:
            raise ValueError("resolution is required when source is not a DataSource (it has no resolution)")
        has_shards = all(hasattr(source, a) for a in ("shards", "shard_samples", "count_samples", "decode_sample"))
        self._reader = _Shards(source) if has_shards else _Records(source, int(resolution))
        self.source, self.condition, self.resolution, self.seed = source, condition, int(resolution), seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start_micro_step, self.shuffle_buffer = start_micro_step, shuffle_buffer
        self._counts: dict[int, int] = {}  # samples per shard, counted only to pass over epochs on resume

    # ------------------------------------------------------------------ what ConditionDataset also has
    @property
    def stats(self) -> SourceStats | None:
        """The source's :class:`SourceStats` (``None`` for plain records)."""
        return self._reader.stats

    def track_events(self) -> None:
        """Queue every new observation of the source so that :meth:`collate` can hand it over."""
        if self.stats is not None:
            self.stats.open_outbox()

    def collate(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """:func:`~condistill.data.dataset.collate` plus the data events of this process (see ``ConditionDataset.collate``)."""
        batch = collate(items)
        batch[DATA_EVENTS_KEY] = self.stats.drain() if self.stats is not None else []
        return batch

    # ------------------------------------------------------------------ the plan
    @property
    def num_shards(self) -> int:
        """Shards of the source (1 for plain records)."""
        return len(self._reader.names)

    def split_mode(self, num_workers: int = 0) -> str:
        """``"shards"`` when each of the ``world_size * max(1, num_workers)`` streams reads its own shards,
        ``"samples"`` when there are fewer shards than streams (each stream keeps every S-th sample)."""
        return "shards" if self.num_shards >= self.world_size * max(1, num_workers) else "samples"

    def shard_order(self, epoch: int) -> list[int]:
        """The shard indices of epoch ``epoch`` in their seeded order (the same in every stream)."""
        return [int(j) for j in numpy_rng(self.seed, _SHARD_ORDER_SALT, epoch).permutation(self.num_shards)]

    def _epoch_samples(self, epoch: int, stream: int, streams: int) -> Iterator[tuple[int, str, Any]]:
        order = self.shard_order(epoch)
        if self.num_shards >= streams:
            for j in order[stream::streams]:
                for key, raw in self._reader.samples(j):
                    yield j, key, raw
            return
        position = 0
        for j in order:
            for key, raw in self._reader.samples(j):
                if position % streams == stream:
                    yield j, key, raw
                position += 1

    def _count(self, j: int) -> int:
        if j not in self._counts:
            self._counts[j] = self._reader.count(j)
        return self._counts[j]

    def _epoch_length(self, epoch: int, stream: int, streams: int) -> int:
        order = self.shard_order(epoch)
        if self.num_shards >= streams:
            return sum(self._count(j) for j in order[stream::streams])
        return len(range(stream, sum(self._count(j) for j in order), streams))

    def _shuffled(self, samples: Iterator[Any], rng) -> Iterator[Any]:
        buffer: list[Any] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = int(rng.integers(self.shuffle_buffer))
            out, buffer[slot] = buffer[slot], sample
            yield out
        for slot in rng.permutation(len(buffer)):
            yield buffer[int(slot)]

    # ------------------------------------------------------------------ the stream
    def _raw_stream(self, stream: int, streams: int, skip: int) -> Iterator[tuple[int, tuple[int, str, Any]]]:
        """``(epoch, (shard, key, encoded sample))`` from stream position ``skip`` on, forever."""
        epoch = 0
        while True:
            if skip:
                length = self._epoch_length(epoch, stream, streams)
                if skip >= length:
                    self._check_not_empty(length, stream, streams)
                    skip, epoch = skip - length, epoch + 1
                    continue
            rng = numpy_rng(self.seed, _SHUFFLE_SALT, epoch, streams, stream)
            read = 0
            for sample in self._shuffled(self._epoch_samples(epoch, stream, streams), rng):
                read += 1
                if skip:
                    skip -= 1
                    continue
                yield epoch, sample
            self._check_not_empty(read, stream, streams)
            epoch += 1

    def _check_not_empty(self, read: int, stream: int, streams: int) -> None:
        if read:
            return
        total = sum(self._count(j) for j in range(self.num_shards))
        if total == 0:
            stats = self.stats
            raise stats.empty_error() if stats is not None else EmptySourceError("the data source yielded no records")
        if self.num_shards < streams:
            raise ValueError(f"the data has {total} samples, fewer than the {streams} streams (processes x DataLoader "
                             "workers) that share it; use fewer workers or more data")

    def _items(self, stream: int, streams: int, skip: int) -> Iterator[dict[str, Any]]:
        pending, first_epoch, last_usable = 0, None, None
        for epoch, (j, key, raw) in self._raw_stream(stream, streams, skip):
            first_epoch = epoch if first_epoch is None else first_epoch
            record = self._reader.decode(j, key, raw)
            if record is None:  # replaced by the next usable sample of this stream
                pending += 1
                if epoch - (last_usable if last_usable is not None else first_epoch) >= _MAX_UNUSABLE_EPOCHS:
                    stats = self.stats
                    hint = f"stream {stream} of {streams} read {_MAX_UNUSABLE_EPOCHS} epochs without a usable sample."
                    raise stats.empty_error(hint) if stats is not None else EmptySourceError(hint)
                continue
            last_usable = epoch
            item = self._build(j, key, record)
            for _ in range(pending + 1):
                yield item
            pending = 0

    def _build(self, j: int, key: str, record: Record) -> dict[str, Any]:
        item_id = f"{os.path.basename(self._reader.names[j])}::{key}"
        return build_item(record, self.condition, self.resolution, item_seed(self.seed, item_id), key, self.channels)

    def source_items(self) -> Iterator[dict[str, Any]]:
        """Every usable sample once, the shards in their listed order, not shuffled and not split (what
        ``condistill cache`` stores); the items and their conditions are those the stream yields."""
        for j in range(self.num_shards):
            for key, raw in self._reader.samples(j):
                record = self._reader.decode(j, key, raw)
                if record is not None:
                    yield self._build(j, key, record)

    def stream_items(self, worker: int = 0, num_workers: int = 0) -> Iterator[dict[str, Any]]:
        """The items loader worker ``worker`` of ``num_workers`` yields (what ``__iter__`` runs in it)."""
        workers = max(1, num_workers)
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} is not one of the {workers} workers")
        role = (self.start_micro_step + worker) % workers
        skip = batches_before(self.start_micro_step, role, workers) * self.batch_size
        streams = self.world_size * workers
        if worker == 0 and self.split_mode(num_workers) == "samples":
            logger.info("%d shard(s) for %d streams (%d process(es) x %d worker(s)): every stream reads every shard "
                        "and keeps every %d-th sample", self.num_shards, streams, self.world_size, workers, streams)
        return self._items(self.rank * workers + role, streams, skip)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        return self.stream_items(info.id, info.num_workers) if info is not None else self.stream_items()
