"""Data sources and the training dataset.

Every source yields :class:`Record` objects with clean ``resolution x resolution`` RGB
images; :func:`open_source` picks one from a short spec, and :class:`ConditionDataset`
turns a source plus a condition into the tensors the training loop reads.
"""
from condistill.data.dataset import ConditionDataset, collate, image_to_tensor
from condistill.data.images import (
    IMAGE_EXTENSIONS,
    EmptySourceError,
    ImageSanitizer,
    SourceStats,
    open_image,
    to_rgb,
)
from condistill.data.record import Record
from condistill.data.sources import (
    DataSource,
    HFDatasetSource,
    ImageFolderSource,
    IndexedSource,
    RecordSequenceSource,
    SyntheticSource,
    WebDatasetSource,
    expand_braces,
    open_source,
)

__all__ = [
    "Record",
    "DataSource",
    "IndexedSource",
    "RecordSequenceSource",
    "SyntheticSource",
    "ImageFolderSource",
    "HFDatasetSource",
    "WebDatasetSource",
    "open_source",
    "expand_braces",
    "ConditionDataset",
    "collate",
    "image_to_tensor",
    "ImageSanitizer",
    "SourceStats",
    "EmptySourceError",
    "IMAGE_EXTENSIONS",
    "open_image",
    "to_rgb",
]
