"""Hugging Face ``datasets`` sources: a hub id, a ``save_to_disk`` folder, a data folder or file.

``open_source`` picks :class:`HFDatasetSource` for ``user/name`` specs, ``save_to_disk``
folders and local data folders or files (parquet, arrow, csv, json, jsonl);
:func:`is_saved_dataset` is how a ``save_to_disk`` folder is recognised.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from condistill.data.images import ImageSanitizer, open_image
from condistill.data.record import Record
from condistill.data.skips import SkipItem
from condistill.data.source_base import SPEC_FORMS, IndexedSource, caption_from_cell

__all__ = ["DatasetsColumns", "HFDatasetSource", "decode_row", "is_saved_dataset"]


def is_saved_dataset(path: Path) -> bool:
    """True if ``path`` is a folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _depth_to_unit(value: Any, conversions: list[str]) -> np.ndarray:
    """A depth cell (image or array) as float32 ``[H, W]`` in ``[0, 1]`` (1 = near)."""
    if isinstance(value, (dict, bytes, bytearray, str, os.PathLike)) or hasattr(value, "mode"):
        try:
            image = open_image(value)
        except SkipItem as exc:
            raise SkipItem("corrupt_depth", exc.detail) from exc
        mode = image.mode
        if mode in ("RGB", "RGBA", "LA", "P"):
            image = image.convert("L")
            mode = "L"
        arr = np.asarray(image).astype(np.float32)
        if mode in ("1", "L"):
            return arr / 255.0
        if mode.startswith("I;16") or mode == "I":
            return np.clip(arr / 65535.0, 0.0, 1.0)
    else:
        arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise SkipItem("corrupt_depth", f"depth must be a 2-D map, got shape {arr.shape}")
    arr = np.nan_to_num(arr)
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        conversions.append("depth_normalised")
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr.astype(np.float32)


class DatasetsColumns:
    """What both ``datasets`` sources do on opening: their options, and the columns they read.

    ``__init__`` takes :class:`HFDatasetSource`'s arguments, opens the dataset with the class's
    ``_open(name, split, load_kwargs)``, refuses a missing column naming the ones there are
    (when ``datasets`` knows them), keeps only the used columns with their images undecoded,
    sets ``dataset`` and calls ``_opened(split)``. It comes first in the bases, before the
    :class:`~condistill.data.source_base.DataSource` kind.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        split: str = "train",
        image_column: str = "image",
        caption_column: str | None = "text",
        conditioning_column: str | None = None,
        depth_column: str | None = None,
        resolution: int = 64,
        *,
        min_size: int | None = None,
        crop: str = "center",
        seed: int = 0,
        **load_kwargs: Any,
    ):
        name = os.fspath(name_or_path)
        super().__init__(resolution, f"{type(self).__name__}({name!r}, split={split!r})")
        self.sanitizer = ImageSanitizer(resolution, min_size=min_size, crop=crop, seed=seed)
        self.seed = seed
        self.image_column, self.caption_column = image_column, caption_column
        self.conditioning_column, self.depth_column = conditioning_column, depth_column
        dataset = self._open(name, split, load_kwargs)
        wanted = {"image_column": image_column, "caption_column": caption_column,
                  "conditioning_column": conditioning_column, "depth_column": depth_column}
        columns = dataset.column_names
        for option, column in wanted.items():
            if columns is not None and column is not None and column not in columns:
                extra = " or None" if option != "image_column" else ""
                raise KeyError(f"{self.name} has no column {column!r} ({option}); available columns: {list(columns)}. "
                               f"Set {option}= to one of them{extra}.")
        import datasets

        dataset = dataset.select_columns([c for c in dict.fromkeys(wanted.values()) if c is not None])
        features = dataset.features or {}
        for column in (image_column, conditioning_column, depth_column):
            if column is not None and isinstance(features.get(column), datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        self._opened(split)

    def _open(self, name: str, split: str, load_kwargs: dict[str, Any]):
        raise NotImplementedError

    def _opened(self, split: str) -> None:
        """Called once ``self.dataset`` is set."""


class HFDatasetSource(DatasetsColumns, IndexedSource):
    """A Hugging Face ``datasets`` dataset.

    A folder written by ``save_to_disk`` is read with ``load_from_disk``; anything else
    with ``load_dataset(name_or_path, split=split)``: a hub id (from the local cache when
    ``HF_HUB_OFFLINE=1``), a local data folder, or a single data file (parquet, arrow,
    csv, json, jsonl). Image columns are decoded by condistill (not by ``datasets``), so a
    corrupt cell is skipped and counted instead of stopping the run. Image cells may be
    PIL images, ``{"bytes", "path"}`` dicts or path strings.

    Args:
        name_or_path: hub id, ``save_to_disk`` folder, data folder or data file.
        split: the split to read.
        image_column: column holding the images.
        caption_column: column holding captions (``None``: empty captions); a list cell
            (several captions) gives one caption chosen deterministically per item.
        conditioning_column: optional column of conditioning images (``Record.conditioning``).
        depth_column: optional column of disparity-like depth maps (near = bright), as
            images (8/16-bit) or arrays; stored in ``Record.depth`` scaled to ``[0, 1]``.
        resolution: output side length.
        min_size: skip images whose shorter side is smaller (default ``resolution // 2``).
        crop: ``"center"`` or ``"random"``.
        seed: random-crop and caption-choice seed.
        **load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``cache_dir``, ``revision``).
    """

    def _opened(self, split: str) -> None:
        if len(self.dataset) == 0:
            raise self.stats.empty_error(f"Split {split!r} has no rows.")

    def _open(self, name: str, split: str, load_kwargs: dict[str, Any]):
        import datasets

        path = Path(name).expanduser()
        if path.is_dir() and is_saved_dataset(path):
            if load_kwargs:
                raise ValueError(
                    f"{name!r} is a save_to_disk folder, read with load_from_disk; "
                    f"options {sorted(load_kwargs)} only apply to load_dataset"
                )
            loaded = datasets.load_from_disk(os.fspath(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise KeyError(f"{name!r} has no split {split!r}; available splits: {sorted(loaded)}. Set split=.")
                return loaded[split]
            if split != "train" and str(loaded.split or "") != split:
                raise ValueError(
                    f"{name!r} holds a single Dataset (saved split: {loaded.split!s}), not a DatasetDict, so "
                    f"split={split!r} cannot be selected; leave split at 'train' or save a DatasetDict"
                )
            return loaded
        try:
            if path.is_file():
                suffix = path.suffix.lower()
                builders = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
                if suffix not in builders:
                    raise ValueError(
                        f"{name!r} is a {suffix or 'extension-less'} file; HFDatasetSource reads a hub id, a folder, "
                        f"or a data file ending in {', '.join(builders)}"
                    )
                return datasets.load_dataset(builders[suffix], data_files=os.fspath(path), split=split, **load_kwargs)
            return datasets.load_dataset(os.fspath(path) if path.exists() else name, split=split, **load_kwargs)
        except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            raise FileNotFoundError(
                f"could not load dataset {name!r} (split {split!r}): {exc}. It is not a local path, and as a "
                f"hub id it is {'not in the local cache (HF_HUB_OFFLINE=1)' if offline else 'not reachable'}. "
                f"A data source may be: {SPEC_FORMS}."
            ) from exc

    def __len__(self) -> int:
        return len(self.dataset)

    def _key(self, index: int) -> str:
        return str(index)

    def _load(self, index: int) -> tuple[Record, list[str]]:
        return decode_row(self, self.dataset[index], str(index), {"index": index})


def decode_row(source, row: dict[str, Any], key: str, attributes: dict[str, Any]) -> tuple[Record, list[str]]:
    """The record of one ``datasets`` row (image cells not decoded by ``datasets``).

    ``source`` gives the column names (``image_column``, ``caption_column``,
    ``conditioning_column``, ``depth_column``), its ``sanitizer`` and caption ``seed``, as
    :class:`HFDatasetSource` and the streaming ``datasets`` source hold them.

    Returns:
        ``(record, conversions)``.

    Raises:
        SkipItem: the row is unusable (the caller counts it).
    """
    prepared = source.sanitizer.prepare(row[source.image_column], key)
    conversions = prepared.conversions
    caption = ""
    if source.caption_column is not None:
        caption = caption_from_cell(row[source.caption_column], source.seed, key)
    conditioning = None
    if source.conditioning_column is not None and row[source.conditioning_column] is not None:
        conditioning = source.sanitizer.align_image(row[source.conditioning_column], prepared)
    depth = None
    if source.depth_column is not None and row[source.depth_column] is not None:
        depth = source.sanitizer.align_array(_depth_to_unit(row[source.depth_column], conversions), prepared)
        depth = np.clip(depth, 0.0, 1.0)
    record = Record(image=prepared.image, caption=caption, depth=depth, conditioning=conditioning,
                    attributes=attributes, key=key)
    return record, conversions
