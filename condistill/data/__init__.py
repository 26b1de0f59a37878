"""Data sources and the training dataset.

Every source yields :class:`Record` objects with clean ``resolution x resolution`` RGB
images; :func:`open_source` picks one from a short spec, and :class:`ConditionDataset`
turns a source plus a condition into the tensors the training loop reads;
:class:`StreamingConditionDataset` does it for stream-only sources (:func:`is_streaming`) and
:class:`CachedDataset` reads what ``condistill cache`` stored (:func:`is_cache`).

One module per source kind: :mod:`~condistill.data.folder`,
:mod:`~condistill.data.hf_datasets`, :mod:`~condistill.data.webdataset`; the base classes,
``open_source`` and the registry of spec prefixes are in :mod:`~condistill.data.sources`,
image sanitising in :mod:`~condistill.data.images`, skip counting in
:mod:`~condistill.data.skips`, a training run's skip report in :mod:`~condistill.data.report`.
The ``synthetic`` source is part of the embedded world: ``condistill.world.source.SyntheticSource``.
"""
from condistill.data.cache import CacheMismatchError, CachedDataset, is_cache
from condistill.data.dataset import ConditionDataset, collate, image_to_tensor
from condistill.data.folder import ImageFolderSource
from condistill.data.hf_datasets import HFDatasetSource
from condistill.data.images import IMAGE_EXTENSIONS, ImageSanitizer, open_image, to_rgb
from condistill.data.record import Record
from condistill.data.skips import EmptySourceError, SourceStats, TooManySkipsError
from condistill.data.sources import (
    DataSource,
    IndexedSource,
    RecordSequenceSource,
    open_source,
    register_source_kind,
)
from condistill.data.hf_streaming import HFStreamingSource
from condistill.data.streaming import StreamingConditionDataset, is_streaming
from condistill.data.webdataset import WebDatasetSource, expand_braces

__all__ = [
    "Record",
    "DataSource",
    "IndexedSource",
    "RecordSequenceSource",
    "ImageFolderSource",
    "HFDatasetSource",
    "WebDatasetSource",
    "open_source",
    "register_source_kind",
    "expand_braces",
    "ConditionDataset",
    "StreamingConditionDataset",
    "is_streaming",
    "CachedDataset",
    "CacheMismatchError",
    "is_cache",
    "HFStreamingSource",
    "collate",
    "image_to_tensor",
    "ImageSanitizer",
    "SourceStats",
    "EmptySourceError",
    "TooManySkipsError",
    "IMAGE_EXTENSIONS",
    "open_image",
    "to_rgb",
]
