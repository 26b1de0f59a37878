"""Image folders: image files found recursively under a folder, with their captions.

``open_source("path/to/images/")`` opens an :class:`ImageFolderSource`; it can also be
built directly. :func:`caption_from_cell` (a caption cell: text, bytes, or a list of
alternatives) lives in :mod:`condistill.data.source_base`, shared with the ``datasets`` and
webdataset sources; it is importable from here too.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from condistill.data.images import IMAGE_EXTENSIONS, ImageSanitizer
from condistill.data.record import Record
from condistill.data.source_base import IndexedSource, caption_from_cell

__all__ = ["ImageFolderSource", "caption_from_cell"]


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
        conditioning_dir: a parallel folder of conditioning images: ``IMAGE_PATH`` gets the file of the same
            relative path and stem in it (any image extension), unless its metadata row names one. Files of a
            ``conditioning_dir`` inside the folder are not training images.
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
        conditioning_dir: str | os.PathLike | None = None,
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
        if conditioning_dir is not None:
            image_files = self._parallel_conditioning(Path(conditioning_dir).expanduser(), image_files)
        conditioning_files = set(self._conditioning.values())
        self._items = sorted((set(image_files) | set(self._rows)) - conditioning_files)
        if not self._items:
            raise self.stats.empty_error(
                f"No image files with extensions {', '.join(IMAGE_EXTENSIONS)} were found under {os.fspath(root)!r}."
            )

    def _parallel_conditioning(self, folder: Path, image_files: list[str]) -> list[str]:
        """Pair each image with the file of its relative path and stem in ``folder``; returns the image files
        that are not inside ``folder``."""
        if not folder.is_dir():
            raise FileNotFoundError(f"conditioning_dir {os.fspath(folder)!r} is not a folder; give the folder of "
                                    "control images whose files are named like the images")
        folder, root = Path(os.path.abspath(folder)), Path(os.path.abspath(self.root))
        by_stem: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                full = Path(dirpath) / filename
                if full.suffix.lower() in IMAGE_EXTENSIONS and not filename.startswith("."):
                    # relative to the image folder when inside it (as image_files are), else absolute
                    rel = full.relative_to(root).as_posix() if full.is_relative_to(root) else full.as_posix()
                    by_stem.setdefault(full.relative_to(folder).with_suffix("").as_posix(), rel)
        inside = set(by_stem.values())
        images = [f for f in image_files if f not in inside]
        for rel in images:
            match = by_stem.get(Path(rel).with_suffix("").as_posix())
            if match is not None:
                self._conditioning.setdefault(rel, match)
        return images

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
            caption = caption_from_cell(row[self.caption_column], self.seed, rel)
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

