"""Data sources: where training and evaluation images come from.

Every source is an iterable of :class:`~condistill.data.record.Record` with clean
``resolution x resolution`` RGB images, a :class:`~condistill.data.skips.SourceStats`
(``.stats``) counting what was converted or skipped, and a ``.resolution``. Sized
sources with random access (everything except tar shards) also have ``__len__`` and
``load(index)``.

=====================================  =============================================
``open_source`` spec                   source
=====================================  =============================================
``"synthetic"``                        ``condistill.world.source.SyntheticSource``
``"synthetic:heldout"``                ... on the held-out split
``"synthetic:train:5000"``             ... split and number of scenes
``path/to/images/``                    :class:`~condistill.data.folder.ImageFolderSource`
``path/to/save_to_disk_folder/``       :class:`~condistill.data.hf_datasets.HFDatasetSource`
``shards/shard-{000..003}.tar``        :class:`~condistill.data.webdataset.WebDatasetSource`
``user/dataset`` or a data folder      :class:`~condistill.data.hf_datasets.HFDatasetSource`
=====================================  =============================================

This module holds :class:`RecordSequenceSource`, :func:`open_source` and the registry of
spec prefixes; the base classes are in :mod:`condistill.data.source_base`. One module per
source kind holds the rest: :mod:`condistill.data.folder`, :mod:`condistill.data.hf_datasets`,
:mod:`condistill.data.hf_streaming` and :mod:`condistill.data.webdataset` (recognised from
the path), and :mod:`condistill.world.source` (the ``synthetic`` prefix).

How the pieces find each other without an import cycle:

* the base classes (:class:`DataSource`, :class:`IndexedSource`, ``ShardedSource``), the spec
  forms and ``caption_from_cell`` live in :mod:`condistill.data.source_base`, which imports no
  source kind; the kinds import it, and this module imports the kinds (and re-exports the base
  classes and :data:`SPEC_FORMS`, so ``from condistill.data.sources import DataSource`` works);
* a prefix kind (a spec ``prefix`` or ``prefix:...``) registers an opener with
  :func:`register_source_kind`. When a spec's prefix is not registered, ``open_source``
  imports the module :data:`PACKAGED_KINDS` names for it (``synthetic`` ->
  :mod:`condistill.world.source`, whose import performs the registration), else loads the
  entry points of group ``condistill.data_sources`` once per process (how another package adds
  a kind), and looks again; a spec that is still unknown is read as a path or dataset id, as
  before. So ``open_source("synthetic")`` works without the caller importing
  :mod:`condistill.world` or any install metadata, and no module of :mod:`condistill.data`
  imports :mod:`condistill.world` at load time.
"""
from __future__ import annotations

import functools
import glob
import importlib
import importlib.metadata
import inspect
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from condistill.data.cache_index import CacheDamagedError, cache_folder_problem, read_index
from condistill.data.folder import ImageFolderSource
from condistill.data.hf_datasets import HFDatasetSource, is_saved_dataset
from condistill.data.hf_streaming import HFStreamingSource
from condistill.data.images import IMAGE_EXTENSIONS, fit_record
from condistill.data.record import Record
from condistill.data.skips import EmptySourceError
from condistill.data.source_base import SPEC_FORMS, DataSource, IndexedSource
from condistill.data.webdataset import TAR_SUFFIXES, WebDatasetSource, expand_braces, is_tar_name, tars_under

__all__ = [
    "DataSource",
    "IndexedSource",
    "RecordSequenceSource",
    "open_source",
    "register_source_kind",
    "registered_source_kinds",
    "construct_source",
    "classify_folder",
    "split_subfolder",
    "is_prefix_spec",
    "is_hub_id",
    "ENTRY_POINT_GROUP",
    "SPEC_FORMS",
]

logger = logging.getLogger(__name__)

#: Entry-point group searched for spec prefixes that are not registered yet.
ENTRY_POINT_GROUP = "condistill.data_sources"
_DATA_FILE_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
_SPLIT_DIR_NAMES = ("train", "test", "validation", "val", "valid", "heldout", "eval")
#: A Hugging Face dataset id: ``name`` or ``owner/name``.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_KIND_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


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


# ------------------------------------------------------------------------ registry

#: ``opener(spec_text, *, resolution, split, options) -> DataSource``
SourceOpener = Callable[..., DataSource]

_KINDS: dict[str, SourceOpener] = {}


def register_source_kind(prefix: str, opener: SourceOpener) -> None:
    """Make :func:`open_source` hand the specs ``prefix`` and ``prefix:...`` to ``opener``.

    ``opener(spec_text, *, resolution, split, options)`` gets the whole stripped spec
    (e.g. ``"synthetic:train:5000"``), ``open_source``'s ``resolution`` and ``split``, and
    a fresh dict of its other keyword options; it returns the :class:`DataSource`. A
    registered prefix wins over a file or folder of the same name. Registering a prefix
    again replaces its opener.

    Raises:
        ValueError: ``prefix`` is not a name (a letter, then letters, digits, ``_``, ``-``).
        TypeError: ``opener`` is not callable.
    """
    if not isinstance(prefix, str) or not _KIND_PREFIX.match(prefix):
        raise ValueError(
            f"a source kind prefix is a name such as 'synthetic' (a letter, then letters, digits, '_' or '-'), got {prefix!r}"
        )
    if not callable(opener):
        raise TypeError(f"opener for source kind {prefix!r} must be callable, got {type(opener).__name__}")
    _KINDS[prefix] = opener


def registered_source_kinds() -> list[str]:
    """The spec prefixes registered so far, sorted (entry points not loaded yet are not included)."""
    return sorted(_KINDS)


@functools.lru_cache(maxsize=None)
def _load_entry_points() -> dict[str, Exception]:
    """Load every ``condistill.data_sources`` entry point once; return the failures by entry-point name."""
    failures: dict[str, Exception] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as exc:  # a broken plugin must not break the other kinds
            logger.warning("could not load data source entry point %s = %s: %s", entry_point.name, entry_point.value, exc)
            failures.setdefault(entry_point.name, exc)
    return failures


#: Spec prefixes of condistill's own optional parts, imported by name on first use (so this module
#: does not import them, and they work without install metadata, e.g. from a plain checkout).
PACKAGED_KINDS = {"synthetic": "condistill.world.source"}


def _find_opener(text: str) -> SourceOpener | None:
    """The opener registered for the spec's prefix, importing a packaged kind or loading the
    ``condistill.data_sources`` entry points if needed."""
    prefix = text.split(":", 1)[0]
    opener = _KINDS.get(prefix)
    if opener is None and prefix in PACKAGED_KINDS:
        importlib.import_module(PACKAGED_KINDS[prefix])
        opener = _KINDS.get(prefix)
    if opener is None and _KIND_PREFIX.match(prefix):
        failures = _load_entry_points()
        opener = _KINDS.get(prefix)
        if opener is None and prefix in failures:
            raise ImportError(
                f"the data source kind {prefix!r} comes from entry point {prefix!r} of group "
                f"{ENTRY_POINT_GROUP!r}, which failed to load: {failures[prefix]}"
            ) from failures[prefix]
    return opener


def is_prefix_spec(spec: str) -> bool:
    """True when ``open_source(spec)`` hands ``spec`` to a registered prefix kind's opener (``synthetic:...``)."""
    return _find_opener(os.fspath(spec).strip()) is not None


def is_hub_id(text: str) -> bool:
    """True when ``open_source`` reads ``text`` (no existing path) as a Hugging Face dataset id."""
    return (bool(HUB_ID.match(text)) and ".." not in text
            and not text.lower().endswith(IMAGE_EXTENSIONS + _DATA_FILE_EXTENSIONS + TAR_SUFFIXES))


# ----------------------------------------------------------------------- open_source


def classify_folder(path: Path) -> str:
    """``"saved"``, ``"data"``, ``"images"``, ``"shards"`` or ``"empty"``."""
    if is_saved_dataset(path):
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
            elif is_tar_name(lower):
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


def split_subfolder(path: Path, split: str) -> Path:
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


def _refuse_cache(path: Path) -> None:
    """A latent cache folder is no image source: say what it is (and, when damaged, what is wrong with it)."""
    problem = cache_folder_problem(path)
    if problem:
        raise CacheDamagedError(f"{os.fspath(path)!r} looks like a latent cache, but {problem}: it cannot be "
                                "trained on; rebuild it with `condistill cache ... --out "
                                f"{os.fspath(path)} --overwrite`")
    index = read_index(path)
    if index is not None:
        raise ValueError(f"{os.fspath(path)!r} is a latent cache (of {index.get('data')!r}): it holds latents, not "
                         "images; a training run takes it as --data, other commands take the images it was built from")


def construct_source(cls, options: dict[str, Any], **fixed: Any) -> DataSource:
    """``cls(**fixed, **options)``, first rejecting options ``cls`` does not accept.

    Raises:
        ValueError: naming the unknown options and the accepted ones (those not in ``fixed``).
    """
    params = inspect.signature(cls).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_var_kw:
        unknown = sorted(set(options) - set(params))
        if unknown:
            accepted = sorted(n for n in params if n not in fixed)
            raise ValueError(f"{cls.__name__} does not accept option(s) {unknown}; accepted options: {accepted}")
    return cls(**fixed, **options)


def open_source(spec: str | os.PathLike | Sequence[str], *, resolution: int = 64, split: str = "train",
                conditioning: str | None = None, **options: Any) -> DataSource:
    """Open a data source from a short spec string.

    Args:
        spec: ``"synthetic"``, ``"synthetic:heldout"``, ``"synthetic:train:5000"`` (or
            another prefix registered with :func:`register_source_kind`); a folder of
            images; a ``save_to_disk`` folder; a local data folder or file (parquet,
            arrow, csv, json); ``.tar`` shards as a path, glob, brace pattern or list;
            else a Hugging Face dataset id.
        resolution: output side length of every image.
        split: split to read where the source has splits (ignored by tar shards; a split
            written in a synthetic spec wins). An image folder holding split subfolders
            (``train/``, ``test/``, ...) reads the one named ``split``.
        **options: passed to the source's constructor (e.g. ``size``, ``seed``,
            ``caption_column``, ``crop``, ``min_size``), or to a registered prefix's opener.
            ``streaming=True`` reads a ``datasets`` spec (hub id, data folder or file) as a
            stream (:class:`~condistill.data.hf_streaming.HFStreamingSource`); other kinds
            ignore it (tar shards always stream, the others have random access).
        conditioning: ``"required"`` or ``"optional"`` for a condition that takes the data's own control images
            (``Record.conditioning``; :attr:`~condistill.conditions.Condition.record_conditioning`): the source
            reads them from where diffusers' ControlNet training sets keep them unless ``options`` say otherwise
            (:data:`CONDITIONING_DEFAULTS`), and with ``"required"`` it skips every item without one
            (``missing_conditioning``).

    Returns:
        The :class:`DataSource`.

    Raises:
        FileNotFoundError: the spec is no existing path and not a plausible dataset id.
        ValueError: an option the chosen source does not take, or a malformed spec.
    """
    if conditioning not in (None, "required", "optional"):
        raise ValueError(f"conditioning must be None, 'required' or 'optional', got {conditioning!r}")
    source = _open_source(spec, resolution, split, dict(options), conditioning)
    source.require_conditioning = conditioning == "required"
    return source


#: where each source kind finds the control images of a condition that reads them, unless told otherwise: the
#: column of diffusers' ControlNet training sets, and a ``KEY.conditioning.png`` member of webdataset shards (an
#: image folder reads its metadata's ``conditioning_file_name``, or the files of its ``conditioning_dir``)
CONDITIONING_DEFAULTS: dict[type, dict[str, str]] = {
    HFDatasetSource: {"conditioning_column": "conditioning_image"},
    HFStreamingSource: {"conditioning_column": "conditioning_image"},
    WebDatasetSource: {"conditioning_extension": "conditioning.png"},
}


def _construct(conditioning: str | None, cls, options: dict[str, Any], **fixed: Any) -> DataSource:
    defaults = {k: v for k, v in CONDITIONING_DEFAULTS.get(cls, {}).items() if k not in options}
    if conditioning is None or not defaults:
        return construct_source(cls, options, **fixed)
    try:
        return construct_source(cls, {**defaults, **options}, **fixed)
    except KeyError:  # the data has no such column: optional control images are then made by the condition
        if conditioning == "required":
            raise
        return construct_source(cls, options, **fixed)


def _open_source(spec, resolution: int, split: str, options: dict[str, Any], conditioning: str | None) -> DataSource:
    """The source of :func:`open_source`, built with ``conditioning``'s default options (:func:`_construct`)."""
    streaming = options.pop("streaming", False)
    if not isinstance(streaming, bool):
        raise ValueError(f"the data option streaming must be true or false, got {streaming!r}")
    hf_kind = HFStreamingSource if streaming else HFDatasetSource
    if isinstance(spec, (list, tuple)):
        return _construct(conditioning, WebDatasetSource, options, urls=list(spec), resolution=resolution)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a string or path, got {type(spec).__name__}")
    text = os.fspath(spec).strip()
    if not text:
        raise ValueError(f"empty data source spec; use one of: {SPEC_FORMS}")
    opener = _find_opener(text)
    if opener is not None:
        return opener(text, resolution=resolution, split=split, options=options)

    path = Path(os.path.expanduser(text))
    expanded = expand_braces(text)
    if is_tar_name(text) or (len(expanded) > 1 and all(is_tar_name(p) for p in expanded)):
        return _construct(conditioning, WebDatasetSource, options, urls=text, resolution=resolution)
    if path.is_dir():
        _refuse_cache(path)
        kind = classify_folder(path)
        if kind in ("saved", "data"):
            return _construct(conditioning, hf_kind, options, name_or_path=os.fspath(path), split=split,
                              resolution=resolution)
        if kind == "images":
            folder = split_subfolder(path, split)
            return _construct(conditioning, ImageFolderSource, options, path=folder, resolution=resolution)
        if kind == "shards":
            return _construct(conditioning, WebDatasetSource, options, urls=tars_under(path), resolution=resolution)
        raise EmptySourceError(
            f"folder {text!r} contains no images ({', '.join(IMAGE_EXTENSIONS)}), no .tar shards and no data files; "
            f"a data source may be: {SPEC_FORMS}"
        )
    if path.is_file():
        if path.suffix.lower() in _DATA_FILE_EXTENSIONS:
            return _construct(conditioning, hf_kind, options, name_or_path=os.fspath(path), split=split,
                              resolution=resolution)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{text!r} is a single image; pass the folder that contains the images")
        raise ValueError(f"{text!r} is a file of a kind condistill does not read; a data source may be: {SPEC_FORMS}")
    if glob.has_magic(text):
        matches = sorted(glob.glob(os.path.expanduser(text)))
        if matches and all(is_tar_name(m) for m in matches):
            return _construct(conditioning, WebDatasetSource, options, urls=text, resolution=resolution)
        raise FileNotFoundError(
            f"pattern {text!r} matches {'no files' if not matches else 'files that are not .tar shards'}; "
            f"a data source may be: {SPEC_FORMS}"
        )
    if is_hub_id(text):
        return _construct(conditioning, hf_kind, options, name_or_path=text, split=split, resolution=resolution)
    raise FileNotFoundError(f"data source {text!r} does not exist. A data source may be: {SPEC_FORMS}.")


