"""``datasets`` read as a stream (``load_dataset(..., streaming=True)``), shard by shard.

``open_source(spec, streaming=True)`` opens :class:`HFStreamingSource` for the specs that
would otherwise open :class:`~condistill.data.hf_datasets.HFDatasetSource`: local parquet,
arrow, csv or json files and data folders, and hub ids. Nothing is downloaded or converted
to Arrow first: rows are read from the data files as they are iterated. A ``save_to_disk``
folder is already memory-mapped with random access, so it is refused here (open it without
``streaming``).

The shards are the ``datasets`` ``IterableDataset``'s own (``n_shards``: one per data file for
parquet); :class:`~condistill.data.streaming.StreamingConditionDataset` hands them to the
(rank, DataLoader worker) streams itself, which is what ``split_dataset_by_node`` plus the
worker split of ``datasets`` would do, but seeded and resumable.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from condistill.data.hf_datasets import DatasetsColumns, decode_row, is_saved_dataset
from condistill.data.record import Record
from condistill.data.source_base import SPEC_FORMS, ShardedSource

__all__ = ["HFStreamingSource"]

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class HFStreamingSource(DatasetsColumns, ShardedSource):
    """A ``datasets`` dataset read as a stream, with the options of ``HFDatasetSource``.

    Row ``p`` of shard ``j`` has the key ``"<j>/<p>"``. The length is not known in advance.

    Args:
        name_or_path: hub id, data folder or data file (not a ``save_to_disk`` folder).
        split, image_column, caption_column, conditioning_column, depth_column, resolution,
        min_size, crop, seed: as for :class:`~condistill.data.hf_datasets.HFDatasetSource`.
        **load_kwargs: passed to ``datasets.load_dataset`` (with ``streaming=True``).
    """

    def _opened(self, split: str) -> None:
        self.shards = [str(j) for j in range(self.dataset.n_shards)]

    def _open(self, name: str, split: str, load_kwargs: dict[str, Any]):
        import datasets

        path = Path(name).expanduser()
        if path.is_dir() and is_saved_dataset(path):
            raise ValueError(f"{name!r} is a save_to_disk folder: it is memory-mapped with random access already; "
                             "open it without streaming=True")
        load_kwargs = {**load_kwargs, "streaming": True}
        try:
            if path.is_file():
                if path.suffix.lower() not in _BUILDERS:
                    raise ValueError(f"{name!r} is not a data file ({', '.join(_BUILDERS)}); HFStreamingSource reads "
                                     "a hub id, a data folder or a data file")
                return datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=os.fspath(path), split=split,
                                             **load_kwargs)
            return datasets.load_dataset(os.fspath(path) if path.exists() else name, split=split, **load_kwargs)
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
            raise FileNotFoundError(f"could not stream dataset {name!r} (split {split!r}): {exc}. Streaming a hub id "
                                    f"reads its files from the hub; a data source may also be: {SPEC_FORMS}.") from exc

    # ------------------------------------------------------------------ one shard at a time
    def shard_samples(self, shard: str, report: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(key, row)`` for each row of shard ``shard`` (a name from :attr:`shards`), in order."""
        index = int(shard)
        part = self.dataset.shard(num_shards=len(self.shards), index=index) if len(self.shards) > 1 else self.dataset
        for position, row in enumerate(part):
            yield f"{index}/{position}", row

    def decode_sample(self, shard: str, key: str, row: dict[str, Any]) -> Record | None:
        """The record of one row, or ``None`` when it is unusable (counted in :attr:`stats` either way)."""
        return self.observe_decode(key, lambda: decode_row(self, row, key, {"shard": shard}))
