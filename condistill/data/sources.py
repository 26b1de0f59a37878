"""Data sources: where training and evaluation images come from.

Every source is an iterable of :class:`~condistill.data.record.Record` with clean
``resolution x resolution`` RGB images, a :class:`~condistill.data.images.SourceStats`
(``.stats``) counting what was converted or skipped, and a ``.resolution``. Sized
sources with random access (everything except tar shards) also have ``__len__`` and
``load(index)``.

=====================================  =============================================
``open_source`` spec                   source
=====================================  =============================================
``"synthetic"``                        :class:`SyntheticSource` (built-in scenes)
``"synthetic:heldout"``                ... on the held-out split
``"synthetic:train:5000"``             ... split and number of scenes
``path/to/images/``                    :class:`ImageFolderSource`
``path/to/save_to_disk_folder/``       :class:`HFDatasetSource` (``load_from_disk``)
``shards/shard-{000..003}.tar``        :class:`WebDatasetSource` (path, glob, braces)
``user/dataset`` or a data folder      :class:`HFDatasetSource` (``load_dataset``)
=====================================  =============================================
"""
from __future__ import annotations

import abc
import csv
import glob
import inspect
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from condistill.data.images import (
    IMAGE_EXTENSIONS,
    EmptySourceError,
    ImageSanitizer,
    SkipItem,
    SourceStats,
    fit_record,
    key_rng,
    open_image,
)
from condistill.data.record import Record

__all__ = [
    "DataSource",
    "IndexedSource",
    "RecordSequenceSource",
    "SyntheticSource",
    "ImageFolderSource",
    "HFDatasetSource",
    "WebDatasetSource",
    "open_source",
    "expand_braces",
    "expand_shards",
]

logger = logging.getLogger(__name__)

SPEC_FORMS = (
    "'synthetic', 'synthetic:heldout', 'synthetic:train:5000' (split and size), "
    "a folder of images (png/jpg/jpeg/webp/bmp/tif, captions in name.txt or metadata.jsonl), "
    "a folder written by datasets' save_to_disk, "
    "webdataset .tar shards (a path, a glob, or a brace pattern like 'shard-{000..003}.tar'), "
    "or a Hugging Face dataset id such as 'user/name' (read from the local cache when HF_HUB_OFFLINE=1)"
)
_DATA_FILE_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SPLIT_DIR_NAMES = ("train", "test", "validation", "val", "valid", "heldout", "eval")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


# ----------------------------------------------------------------------------- base


class DataSource(abc.ABC):
    """An iterable of :class:`Record` at a fixed square ``resolution``.

    Iterating yields every usable record once; unusable items are skipped and counted in
    :attr:`stats`. If a full pass yields nothing, iteration raises
    :class:`~condistill.data.images.EmptySourceError` explaining what was skipped and why.

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
        key = self._key(index)
        try:
            record, conversions = self._load(index)
        except SkipItem as exc:
            self.stats.observe(key, skipped=exc)
            return None
        self.stats.observe(key, conversions)
        return record

    def _iter_records(self) -> Iterator[Record]:
        for index in range(len(self)):
            record = self.load(index)
            if record is not None:
                yield record


# ------------------------------------------------------------------------ sequences


class RecordSequenceSource(IndexedSource):
    """Wraps any sequence of :class:`Record` (a list, ``SyntheticScenes``) as a source.

    Records whose image is not already ``resolution x resolution`` RGB are converted and
    center-cropped, with ``depth``, ``masks`` and ``conditioning`` aligned the same way.

    Args:
        records: a sized, indexable collection of records.
        resolution: output side length.
        name: description used in messages.
    """

    def __init__(self, records: Sequence[Record], resolution: int = 64, name: str | None = None):
        if not hasattr(records, "__len__") or not hasattr(records, "__getitem__"):
            raise TypeError(
                f"records must be a sized, indexable sequence of Record, got {type(records).__name__}"
            )
        super().__init__(resolution, name or f"RecordSequenceSource({type(records).__name__}, {len(records)} records)")
        self.records = records
        if len(records) == 0:
            raise self.stats.empty_error()

    def __len__(self) -> int:
        return len(self.records)

    def _key(self, index: int) -> str:
        return f"#{index}"

    def _load(self, index: int) -> tuple[Record, list[str]]:
        record = self.records[index]
        if not isinstance(record, Record):
            raise TypeError(f"item {index} of {self.name} is a {type(record).__name__}, not a Record")
        record, conversions = fit_record(record, self.resolution)
        if not record.key:
            from dataclasses import replace

            record = replace(record, key=str(index))
        return record, conversions


class SyntheticSource(RecordSequenceSource):
    """The built-in procedural scenes (caption, exact depth, object masks, attributes).

    Args:
        split: ``"train"`` or ``"heldout"`` (disjoint random streams).
        size: number of scenes (default: ``SyntheticScenes``' default).
        resolution: side length (at least 16).
        seed: scene ``i`` is a pure function of ``(seed, split, i)``.
    """

    def __init__(self, split: str = "train", size: int | None = None, resolution: int = 64, seed: int = 0):
        from condistill.world.scenes import SPLITS, SyntheticScenes

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


# ---------------------------------------------------------------------- image folder


def _caption_from_cell(value: Any, seed: int, key: str) -> str:
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


class ImageFolderSource(IndexedSource):
    """Image files found recursively under a folder.

    Captions come from, in order: the ``caption_column`` of a ``metadata.jsonl`` (or
    ``metadata.csv``) row whose ``file_name`` is the image path relative to the metadata
    file's folder; a sidecar text file next to the image (``cat.png`` -> ``cat.txt``);
    otherwise the empty string. A metadata row may name a conditioning image in
    ``conditioning_column`` (default ``conditioning_file_name``); those files are used as
    ``Record.conditioning`` (cropped like their image) and are not training images
    themselves. Hidden files and folders (starting with ``.``) are ignored.

    Args:
        path: the folder.
        resolution: output side length.
        caption_column: caption key in the metadata rows (``None``: ignore metadata captions).
        conditioning_column: metadata key holding the conditioning image's file name.
        min_size: skip images whose shorter side is smaller (default ``resolution // 2``).
        crop: ``"center"`` or ``"random"`` (deterministic per ``(seed, file)``).
        seed: random-crop seed.
    """

    METADATA_NAMES = ("metadata.jsonl", "metadata.csv")

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int = 64,
        *,
        caption_column: str | None = "text",
        conditioning_column: str = "conditioning_file_name",
        min_size: int | None = None,
        crop: str = "center",
        seed: int = 0,
    ):
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"image folder {os.fspath(path)!r} does not exist")
        if not root.is_dir():
            raise ValueError(f"{os.fspath(path)!r} is a file; ImageFolderSource needs the folder that contains the images")
        super().__init__(resolution, f"ImageFolderSource({os.fspath(path)!r})")
        self.root = root
        self.sanitizer = ImageSanitizer(resolution, min_size=min_size, crop=crop, seed=seed)
        self.caption_column = caption_column
        self.conditioning_column = conditioning_column
        self.seed = seed

        image_files: list[str] = []
        metadata_files: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in filenames:
                if filename.startswith("."):
                    continue
                full = Path(dirpath) / filename
                if filename in self.METADATA_NAMES:
                    metadata_files.append(full)
                elif full.suffix.lower() in IMAGE_EXTENSIONS:
                    image_files.append(full.relative_to(root).as_posix())

        self._rows: dict[str, dict[str, Any]] = {}
        self._conditioning: dict[str, str] = {}
        for meta in sorted(metadata_files):
            self._read_metadata(meta)
        self._check_caption_column()
        conditioning_files = set(self._conditioning.values())
        self._items = sorted((set(image_files) | set(self._rows)) - conditioning_files)
        if not self._items:
            raise self.stats.empty_error(
                f"No image files with extensions {', '.join(IMAGE_EXTENSIONS)} were found under {os.fspath(root)!r}."
            )

    def _read_metadata(self, meta: Path) -> None:
        base = meta.parent
        rows: list[tuple[int, dict[str, Any]]] = []
        if meta.suffix == ".jsonl":
            with open(meta, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{meta}, line {lineno}: not valid JSON ({exc.msg}); fix or remove the line") from exc
                    if not isinstance(row, dict):
                        raise ValueError(f"{meta}, line {lineno}: expected a JSON object like {{\"file_name\": ..., \"text\": ...}}")
                    rows.append((lineno, row))
        else:
            with open(meta, encoding="utf-8", newline="") as fh:
                rows = [(i, dict(row)) for i, row in enumerate(csv.DictReader(fh), 2)]
        for lineno, row in rows:
            if "file_name" not in row or not row["file_name"]:
                raise ValueError(
                    f"{meta}, line {lineno}: row has no 'file_name'; every metadata row needs the image path "
                    f"relative to {os.fspath(base)!r} (found keys {sorted(row)})"
                )
            rel = self._relative(base / str(row["file_name"]))
            self._rows[rel] = row
            cond = row.get(self.conditioning_column)
            if cond:
                self._conditioning[rel] = self._relative(base / str(cond))

    def _relative(self, path: Path) -> str:
        normal = Path(os.path.normpath(path))
        try:
            return normal.relative_to(self.root).as_posix()
        except ValueError:
            return normal.as_posix()  # outside the root: keep the absolute path

    def _check_caption_column(self) -> None:
        if not self._rows or self.caption_column is None:
            return
        keys: set[str] = set()
        for row in self._rows.values():
            keys.update(row)
        if self.caption_column in keys:
            return
        candidates = keys - {"file_name", self.conditioning_column}
        if candidates:
            raise KeyError(
                f"{self.name}: the metadata has no caption column {self.caption_column!r}; available columns: "
                f"{sorted(keys)}. Set caption_column to one of them, or caption_column=None to use "
                "sidecar .txt captions (or empty captions)."
            )

    def __len__(self) -> int:
        return len(self._items)

    def _key(self, index: int) -> str:
        return self._items[index]

    def _resolve(self, rel: str) -> Path:
        return Path(rel) if os.path.isabs(rel) else self.root / rel

    def _load(self, index: int) -> tuple[Record, list[str]]:
        rel = self._items[index]
        path = self._resolve(rel)
        prepared = self.sanitizer.prepare(path, rel)
        row = self._rows.get(rel, {})
        caption = ""
        if self.caption_column is not None and row.get(self.caption_column) is not None:
            caption = _caption_from_cell(row[self.caption_column], self.seed, rel)
        else:
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                try:
                    caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
                except OSError:
                    caption = ""
        conditioning = None
        if rel in self._conditioning:
            conditioning = self.sanitizer.align_image(self._resolve(self._conditioning[rel]), prepared)
        attributes: dict[str, Any] = {"path": os.fspath(path)}
        extra = {k: v for k, v in row.items() if k not in ("file_name", self.caption_column, self.conditioning_column)}
        if extra:
            attributes["metadata"] = extra
        record = Record(image=prepared.image, caption=caption, conditioning=conditioning, attributes=attributes, key=rel)
        return record, prepared.conversions


# --------------------------------------------------------------------- HF datasets


def _is_saved_dataset(path: Path) -> bool:
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


class HFDatasetSource(IndexedSource):
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
        super().__init__(resolution, f"HFDatasetSource({os.fspath(name_or_path)!r}, split={split!r})")
        self.sanitizer = ImageSanitizer(resolution, min_size=min_size, crop=crop, seed=seed)
        self.seed = seed
        dataset = self._open(os.fspath(name_or_path), split, load_kwargs)
        columns = list(dataset.column_names)
        wanted = {
            "image_column": image_column,
            "caption_column": caption_column,
            "conditioning_column": conditioning_column,
            "depth_column": depth_column,
        }
        for option, column in wanted.items():
            if column is not None and column not in columns:
                extra = " or None" if option != "image_column" else ""
                raise KeyError(
                    f"{self.name} has no column {column!r} ({option}); available columns: {columns}. "
                    f"Set {option}= to one of them{extra}."
                )
        self.image_column = image_column
        self.caption_column = caption_column
        self.conditioning_column = conditioning_column
        self.depth_column = depth_column
        used = [c for c in dict.fromkeys(wanted.values()) if c is not None]
        dataset = dataset.select_columns(used)
        import datasets

        for column in (image_column, conditioning_column, depth_column):
            if column is not None and isinstance(dataset.features[column], datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        if len(dataset) == 0:
            raise self.stats.empty_error(f"Split {split!r} has no rows.")

    def _open(self, name: str, split: str, load_kwargs: dict[str, Any]):
        import datasets

        path = Path(name).expanduser()
        if path.is_dir() and _is_saved_dataset(path):
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
        row = self.dataset[index]
        key = str(index)
        prepared = self.sanitizer.prepare(row[self.image_column], key)
        conversions = prepared.conversions
        caption = ""
        if self.caption_column is not None:
            caption = _caption_from_cell(row[self.caption_column], self.seed, key)
        conditioning = None
        if self.conditioning_column is not None and row[self.conditioning_column] is not None:
            conditioning = self.sanitizer.align_image(row[self.conditioning_column], prepared)
        depth = None
        if self.depth_column is not None and row[self.depth_column] is not None:
            depth = self.sanitizer.align_array(_depth_to_unit(row[self.depth_column], conversions), prepared)
            depth = np.clip(depth, 0.0, 1.0)
        record = Record(
            image=prepared.image,
            caption=caption,
            depth=depth,
            conditioning=conditioning,
            attributes={"index": index},
            key=key,
        )
        return record, conversions


# ---------------------------------------------------------------------- webdataset


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style brace patterns as webdataset does.

    ``{000..003}`` is a numeric range (zero-padded to the width of its first bound),
    ``{a,b}`` a list of alternatives; several groups multiply out. A ``{...}`` that is
    neither is kept literally.

    >>> expand_braces("s-{00..02}.tar")
    ['s-00.tar', 's-01.tar', 's-02.tar']
    """
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo_text, hi_text = rng.groups()
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} goes down; write it as {{{hi_text}..{lo_text}}}")
        width = len(lo_text)
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + option + t for option in options for t in expand_braces(tail)]


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith(_TAR_SUFFIXES)


def expand_shards(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Resolve shard specs (paths, globs, brace patterns, folders, or a list of them) to files.

    Raises:
        FileNotFoundError: a spec matches no file.
        ValueError: a remote URL (only local shards are read) or an empty list.
    """
    specs = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not specs:
        raise ValueError("no shards given; pass a .tar path, a glob, a brace pattern or a list of them")
    shards: list[str] = []
    missing: list[str] = []
    for spec in specs:
        text = os.fspath(spec)
        if "://" in text or text.startswith("pipe:"):
            raise ValueError(
                f"{text!r}: only local shard files are read; download the shards and pass their local paths"
            )
        for pattern in expand_braces(text):
            pattern = os.path.expanduser(pattern)
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    missing.append(f"{pattern!r} (a pattern matching no file)")
            elif os.path.isdir(pattern):
                matches = sorted(os.path.join(pattern, f) for f in os.listdir(pattern) if _is_tar_name(f))
                if not matches:
                    missing.append(f"{pattern!r} (a folder without .tar shards)")
            elif os.path.isfile(pattern):
                matches = [pattern]
            else:
                matches = []
                missing.append(repr(pattern))
            shards.extend(matches)
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {shown}; check the paths or the brace pattern")
    return list(dict.fromkeys(shards))


class WebDatasetSource(DataSource):
    """Samples from webdataset-format tar shards, read with the standard ``tarfile``.

    Members are grouped into samples by key (the member path up to the first dot of its
    file name); a sample's members must be consecutive, as webdataset writes them. The
    image is the first present of ``image_extensions``; the caption is the ``txt`` member,
    else the ``caption``/``text`` entry of the ``json`` member, else empty. Corrupt
    images are skipped and counted; an unreadable or truncated shard is counted in
    ``stats.errors`` and reading goes on with the next shard (the samples read before the
    damage are kept). The length is not known in advance.

    Args:
        urls: a shard path, glob, brace pattern (``shard-{000..003}.tar``), folder of
            shards, or a list of these. ``.tar``, ``.tar.gz`` and ``.tgz`` are read.
        resolution: output side length.
        min_size: skip images whose shorter side is smaller (default ``resolution // 2``).
        crop: ``"center"`` or ``"random"``.
        seed: random-crop seed.
        image_extensions: member extensions tried for the image, in order.
        caption_keys: keys tried in the ``json`` member when there is no ``txt``.
        conditioning_extension: member extension of an optional conditioning image
            (e.g. ``"cond.png"``).
    """

    def __init__(
        self,
        urls: str | os.PathLike | Iterable[str | os.PathLike],
        resolution: int = 64,
        *,
        min_size: int | None = None,
        crop: str = "center",
        seed: int = 0,
        image_extensions: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        caption_keys: Sequence[str] = ("caption", "text"),
        conditioning_extension: str | None = None,
    ):
        self.shards = expand_shards(urls)
        label = self.shards[0] if len(self.shards) == 1 else f"{self.shards[0]} and {len(self.shards) - 1} more shards"
        super().__init__(resolution, f"WebDatasetSource({label!r})")
        self.sanitizer = ImageSanitizer(resolution, min_size=min_size, crop=crop, seed=seed)
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        self.caption_keys = tuple(caption_keys)
        self.conditioning_extension = conditioning_extension.lower().lstrip(".") if conditioning_extension else None

    def _empty_hint(self) -> str:
        return f"Shards read: {len(self.shards)}."

    def _iter_records(self) -> Iterator[Record]:
        for shard in self.shards:
            for key, members in self._samples(shard):
                stats_key = f"{shard}::{key}"
                try:
                    record, conversions = self._decode(shard, key, members)
                except SkipItem as exc:
                    self.stats.observe(stats_key, skipped=exc)
                    continue
                self.stats.observe(stats_key, conversions)
                yield record

    def _samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Yield ``(key, {extension: bytes})`` for each complete sample of one shard."""
        try:
            tar = tarfile.open(shard, mode="r|*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            self.stats.error("corrupt_shard", f"{shard}: {exc}")
            logger.warning("skipping unreadable shard %s: %s", shard, exc)
            return
        current: str | None = None
        members: dict[str, bytes] = {}
        with tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                    self._damaged(shard, str(exc), current)
                    return
                if member is None:
                    break
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                stem, dot, ext = base.partition(".")
                if not dot or not stem or base.startswith("."):
                    continue
                key = posixpath.join(dirname, stem) if dirname not in ("", ".") else stem
                if key != current:
                    # a new key starts, so the previous sample is complete
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                try:
                    fh = tar.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} ends early")
                except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                    self._damaged(shard, str(exc), current)
                    return
                members[ext.lower()] = data
            # tarfile ends quietly at a cut-off header; an uncompressed tar written in full
            # ends with two zero blocks (1024 bytes) after the last member
            if getattr(tar.fileobj, "comptype", None) == "tar":
                try:
                    missing_end = os.path.getsize(shard) - tar.offset < 2 * tarfile.BLOCKSIZE
                except OSError:
                    missing_end = False
                if missing_end:
                    self._damaged(shard, "the file ends without the end-of-archive blocks", current)
                    return
        if current is not None:
            yield current, members

    def _damaged(self, shard: str, detail: str, pending: str | None) -> None:
        self.stats.error("truncated_shard", f"{shard}: {detail}")
        logger.warning("shard %s is damaged (%s); kept the samples before the damage", shard, detail)
        if pending is not None:
            # the sample being read when the damage was hit may miss members: drop it
            self.stats.observe(f"{shard}::{pending}", skipped=SkipItem("truncated", "cut off by shard damage"))

    def _decode(self, shard: str, key: str, members: dict[str, bytes]) -> tuple[Record, list[str]]:
        image_ext = next((e for e in self.image_extensions if e in members), None)
        if image_ext is None:
            raise SkipItem("no_image", f"members {sorted(members)} have none of {list(self.image_extensions)}")
        caption = ""
        metadata: dict[str, Any] | None = None
        if "json" in members:
            try:
                parsed = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise SkipItem("corrupt_json", str(exc)) from exc
            metadata = parsed if isinstance(parsed, dict) else {"json": parsed}
        if "txt" in members:
            caption = members["txt"].decode("utf-8", errors="replace").strip()
        elif metadata is not None:
            for caption_key in self.caption_keys:
                if metadata.get(caption_key) is not None:
                    caption = _caption_from_cell(metadata[caption_key], self.sanitizer.seed, key)
                    break
        prepared = self.sanitizer.prepare(members[image_ext], key)
        conditioning = None
        if self.conditioning_extension and self.conditioning_extension in members:
            conditioning = self.sanitizer.align_image(members[self.conditioning_extension], prepared)
        attributes: dict[str, Any] = {"shard": shard}
        if metadata is not None:
            attributes["metadata"] = metadata
        record = Record(image=prepared.image, caption=caption, conditioning=conditioning, attributes=attributes, key=key)
        return record, prepared.conversions


# ----------------------------------------------------------------------- open_source


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


def _classify_folder(path: Path) -> str:
    """``"saved"``, ``"data"``, ``"images"``, ``"shards"`` or ``"empty"``."""
    if _is_saved_dataset(path):
        return "saved"
    has_images = has_tars = has_columnar = has_text_data = False
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            lower = filename.lower()
            if lower.startswith("."):
                continue
            if lower.endswith((".parquet", ".arrow")):
                has_columnar = True
            elif lower.endswith(IMAGE_EXTENSIONS):
                has_images = True
            elif _is_tar_name(lower):
                has_tars = True
            elif lower.endswith(_DATA_FILE_EXTENSIONS) and lower not in ImageFolderSource.METADATA_NAMES:
                has_text_data = True
    if has_columnar:
        return "data"
    if has_images:
        return "images"
    if has_tars:
        return "shards"
    if has_text_data:
        return "data"
    return "empty"


def _split_subfolder(path: Path, split: str) -> Path:
    """If ``path`` holds split folders (train/, test/, ...) and no top-level images, pick ``split``."""
    subdirs = [d.name for d in path.iterdir() if d.is_dir() and d.name.lower() in _SPLIT_DIR_NAMES]
    top_images = any(f.suffix.lower() in IMAGE_EXTENSIONS for f in path.iterdir() if f.is_file())
    if not subdirs or top_images:
        return path
    if split in subdirs:
        return path / split
    raise ValueError(
        f"{os.fspath(path)!r} is split into folders {sorted(subdirs)} but has none named {split!r}; "
        f"pass split= one of them (or point at the subfolder directly)"
    )


def _construct(cls, options: dict[str, Any], **fixed: Any) -> DataSource:
    params = inspect.signature(cls).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_var_kw:
        unknown = sorted(set(options) - set(params))
        if unknown:
            accepted = sorted(n for n in params if n not in fixed)
            raise ValueError(f"{cls.__name__} does not accept option(s) {unknown}; accepted options: {accepted}")
    return cls(**fixed, **options)


def open_source(spec: str | os.PathLike | Sequence[str], *, resolution: int = 64, split: str = "train", **options: Any) -> DataSource:
    """Open a data source from a short spec string.

    Args:
        spec: ``"synthetic"``, ``"synthetic:heldout"``, ``"synthetic:train:5000"``; a
            folder of images; a ``save_to_disk`` folder; a local data folder or file
            (parquet, arrow, csv, json); ``.tar`` shards as a path, glob, brace pattern or
            list; else a Hugging Face dataset id.
        resolution: output side length of every image.
        split: split to read where the source has splits (ignored by tar shards; a split
            written in a synthetic spec wins). An image folder holding split subfolders
            (``train/``, ``test/``, ...) reads the one named ``split``.
        **options: passed to the source's constructor (e.g. ``size``, ``seed``,
            ``caption_column``, ``crop``, ``min_size``).

    Returns:
        The :class:`DataSource`.

    Raises:
        FileNotFoundError: the spec is no existing path and not a plausible dataset id.
        ValueError: an option the chosen source does not take, or a malformed spec.
    """
    if isinstance(spec, (list, tuple)):
        return _construct(WebDatasetSource, options, urls=list(spec), resolution=resolution)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a string or path, got {type(spec).__name__}")
    text = os.fspath(spec).strip()
    if not text:
        raise ValueError(f"empty data source spec; use one of: {SPEC_FORMS}")
    if text == "synthetic" or text.startswith("synthetic:"):
        parsed = _parse_synthetic(text)
        for name, value in parsed.items():
            if name in options and options[name] != value:
                raise ValueError(f"{name} is given twice: {value!r} in the spec {text!r} and {options[name]!r} as an option")
            options.pop(name, None)
        fixed = {"split": split, **parsed, "resolution": resolution}
        return _construct(SyntheticSource, options, **fixed)

    path = Path(os.path.expanduser(text))
    expanded = expand_braces(text)
    if _is_tar_name(text) or (len(expanded) > 1 and all(_is_tar_name(p) for p in expanded)):
        return _construct(WebDatasetSource, options, urls=text, resolution=resolution)
    if path.is_dir():
        kind = _classify_folder(path)
        if kind in ("saved", "data"):
            return _construct(HFDatasetSource, options, name_or_path=os.fspath(path), split=split, resolution=resolution)
        if kind == "images":
            folder = _split_subfolder(path, split)
            return _construct(ImageFolderSource, options, path=folder, resolution=resolution)
        if kind == "shards":
            return _construct(WebDatasetSource, options, urls=_all_tars(path), resolution=resolution)
        raise EmptySourceError(
            f"folder {text!r} contains no images ({', '.join(IMAGE_EXTENSIONS)}), no .tar shards and no data files; "
            f"a data source may be: {SPEC_FORMS}"
        )
    if path.is_file():
        if path.suffix.lower() in _DATA_FILE_EXTENSIONS:
            return _construct(HFDatasetSource, options, name_or_path=os.fspath(path), split=split, resolution=resolution)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{text!r} is a single image; pass the folder that contains the images")
        raise ValueError(f"{text!r} is a file of a kind condistill does not read; a data source may be: {SPEC_FORMS}")
    if glob.has_magic(text):
        matches = sorted(glob.glob(os.path.expanduser(text)))
        if matches and all(_is_tar_name(m) for m in matches):
            return _construct(WebDatasetSource, options, urls=text, resolution=resolution)
        raise FileNotFoundError(
            f"pattern {text!r} matches {'no files' if not matches else 'files that are not .tar shards'}; "
            f"a data source may be: {SPEC_FORMS}"
        )
    if _HUB_ID.match(text) and not text.lower().endswith(IMAGE_EXTENSIONS + _DATA_FILE_EXTENSIONS + _TAR_SUFFIXES) and ".." not in text:
        return _construct(HFDatasetSource, options, name_or_path=text, split=split, resolution=resolution)
    raise FileNotFoundError(f"data source {text!r} does not exist. A data source may be: {SPEC_FORMS}.")


def _all_tars(path: Path) -> list[str]:
    tars = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        tars.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_tar_name(f) and not f.startswith("."))
    return tars
