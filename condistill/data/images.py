"""Image sanitising shared by every data source.

Every source turns whatever it reads (a path, raw bytes, a ``datasets`` image cell, a
``PIL.Image``) into an 8-bit RGB ``resolution x resolution`` image the same way:

1. open and fully decode it; unreadable or truncated files are *skipped*, not fatal;
2. apply the EXIF orientation, then convert any mode (grayscale, palette, alpha, CMYK,
   16-bit, float) to 8-bit RGB, compositing transparency on white;
3. skip images whose shorter side is below ``min_size`` (default ``resolution // 2``);
4. resize the shorter side to ``resolution`` and crop a square (center, or a random
   position that is deterministic per ``(seed, key)``).

Each conversion is reported to the caller and each skip raised as a
:class:`~condistill.data.skips.SkipItem`; sources count both by reason in their
:class:`~condistill.data.skips.SourceStats` (the skip bookkeeping lives in
:mod:`condistill.data.skips`), so a run can report what happened to its data instead of
silently dropping or distorting it.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from condistill.data.skips import SkipItem
from condistill.seeding import numpy_rng, text_key

__all__ = [
    "IMAGE_EXTENSIONS",
    "CROP_MODES",
    "PreparedImage",
    "ImageSanitizer",
    "open_image",
    "to_rgb",
    "crop_box",
    "fit_record",
    "key_rng",
]

#: File suffixes (lower case) treated as images by folder-based sources.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

#: Accepted values of the ``crop`` option.
CROP_MODES: tuple[str, ...] = ("center", "random")


# --------------------------------------------------------------------------- opening


def open_image(obj: Any, *, draft_to: int | None = None) -> Image.Image:
    """Open and fully decode an image from a path, bytes, file object, PIL image or cell.

    ``obj`` may be a ``str``/``os.PathLike`` path, ``bytes``/``bytearray``/``memoryview``,
    a binary file object, a ``PIL.Image.Image``, a ``datasets`` image dict
    (``{"bytes": ..., "path": ...}``) or a ``numpy`` array (``[H, W]`` or ``[H, W, C]``).

    Args:
        obj: the image data.
        draft_to: if given, a JPEG is decoded at the smallest DCT scale whose shorter side
            is still at least this many pixels (much faster for large photos).

    Returns:
        The decoded image in its original mode (call :func:`to_rgb` next).

    Raises:
        SkipItem: ``"missing_file"`` if a path does not exist, ``"truncated"`` if the
            data ends early, ``"corrupt"`` if it cannot be decoded.
        TypeError: if ``obj`` is of an unsupported type (a programming error).
    """
    if isinstance(obj, Image.Image):
        image = obj
    else:
        if isinstance(obj, dict):
            data, path = obj.get("bytes"), obj.get("path")
            if data is None and not path:
                raise SkipItem("corrupt", "image cell has neither bytes nor path")
            obj = data if data is not None else path
        if isinstance(obj, np.ndarray):
            try:
                return Image.fromarray(obj)
            except (TypeError, ValueError) as exc:
                raise SkipItem("corrupt", f"array of shape {obj.shape} and dtype {obj.dtype}: {exc}") from exc
        if isinstance(obj, (bytes, bytearray, memoryview)):
            fp: Any = io.BytesIO(bytes(obj))
        elif isinstance(obj, (str, os.PathLike)):
            if not os.path.isfile(obj):
                raise SkipItem("missing_file", f"no such file {os.fspath(obj)!r}")
            fp = obj
        elif hasattr(obj, "read"):
            fp = obj
        else:
            raise TypeError(
                f"cannot read an image from a {type(obj).__name__}; expected a path, bytes, "
                "a file object, a PIL image, a numpy array or a {'bytes', 'path'} dict"
            )
        try:
            image = Image.open(fp)
        except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as exc:
            raise SkipItem("corrupt", _short(exc)) from exc
    try:
        if draft_to and image.format == "JPEG" and min(image.size) > draft_to:
            width, height = image.size
            short = min(width, height)
            image.draft(image.mode, (-(-width * draft_to // short), -(-height * draft_to // short)))
        image.load()
    except Image.DecompressionBombError as exc:
        raise SkipItem("corrupt", _short(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise SkipItem(reason, _short(exc)) from exc
    return image


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 160 else text[:157] + "..."


# ------------------------------------------------------------------------ conversion


def to_rgb(image: Image.Image, conversions: list[str] | None = None) -> Image.Image:
    """Convert an image of any PIL mode to 8-bit RGB.

    Transparency (``RGBA``, ``LA``, ``PA``, palettes with a transparent index) is
    composited on white. 16-bit grayscale (``I;16*``) is scaled to 8 bits; 32-bit integer
    (``I``) is scaled from the 16-bit range when its maximum exceeds 255; float (``F``)
    is read as ``[0, 1]`` when its maximum is at most 1, else as ``[0, 255]``.

    Args:
        image: the decoded image.
        conversions: if given, one reason string per conversion is appended
            (``"grayscale"``, ``"rgba"``, ``"palette"``, ``"cmyk"``, ``"16bit"``, ...).

    Returns:
        An image of mode ``"RGB"`` (the input itself if it already was).
    """
    notes = conversions if conversions is not None else []
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("1", "L"):
        notes.append("grayscale")
        return image.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image).astype(np.float64)
        notes.append("32bit_int" if mode == "I" else "16bit")
        if mode != "I" or (arr.size and arr.max() > 255):
            arr = arr / 257.0
            if arr.size and arr.max() > 255:
                arr = arr * (255.0 / arr.max())
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        notes.append("float")
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" or mode == "PA":
        notes.append("palette")
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            return rgba.convert("RGB")
        return _on_white(rgba)
    if mode == "CMYK":
        notes.append("cmyk")
        return image.convert("RGB")
    if "A" in image.getbands() or mode in ("RGBa", "La"):
        notes.append({"RGBA": "rgba", "LA": "grayscale_alpha"}.get(mode, mode.lower()))
        return _on_white(image.convert("RGBA"))
    notes.append(mode.lower().replace(";", "_"))
    return image.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


# -------------------------------------------------------------------------- geometry


def key_rng(seed: int, key: str) -> np.random.Generator:
    """A generator seeded by ``(seed, key)``: deterministic per item, independent of order."""
    return numpy_rng(int(seed) & 0xFFFFFFFF, text_key(key))


def crop_box(
    size: tuple[int, int],
    resolution: int,
    crop: str = "center",
    rng: np.random.Generator | None = None,
) -> tuple[float, float, float, float]:
    """The square region of an image that maps to the ``resolution x resolution`` output.

    Equivalent to resizing the shorter side to ``resolution`` and cropping a square:
    the box is expressed in the *original* image's pixel coordinates, so the same box can
    be applied to aligned maps (conditioning images, depth) of the same size.

    Args:
        size: ``(width, height)`` of the original image.
        resolution: output side length.
        crop: ``"center"`` or ``"random"`` (offset along the longer side drawn from ``rng``).
        rng: required for ``"random"``.

    Returns:
        ``(left, upper, right, lower)`` as floats for ``Image.resize(box=...)``.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    width, height = size
    short = min(width, height)
    scale = resolution / short  # original pixel -> resized pixel
    resized_w = max(resolution, round(width * scale))
    resized_h = max(resolution, round(height * scale))
    if crop == "center":
        off_x = (resized_w - resolution) // 2
        off_y = (resized_h - resolution) // 2
    else:
        if rng is None:
            raise ValueError("crop='random' needs a random generator (rng=...)")
        off_x = int(rng.integers(0, resized_w - resolution + 1))
        off_y = int(rng.integers(0, resized_h - resolution + 1))
    left, upper = off_x / scale, off_y / scale
    side = resolution / scale
    return (left, upper, min(float(width), left + side), min(float(height), upper + side))


@dataclass
class PreparedImage:
    """An image after sanitising, with what is needed to align other maps to it.

    Attributes:
        image: the ``"RGB"`` output at ``resolution x resolution``.
        original_size: ``(width, height)`` after EXIF orientation, before resizing.
        box: the crop box in original coordinates (see :func:`crop_box`).
        conversions: reasons of the conversions applied.
    """

    image: Image.Image
    original_size: tuple[int, int]
    box: tuple[float, float, float, float]
    conversions: list[str]


class ImageSanitizer:
    """Turns raw image data into clean ``resolution x resolution`` RGB images.

    Args:
        resolution: output side length in pixels (positive).
        min_size: images whose shorter side is below this are skipped
            (default ``resolution // 2``; ``0`` keeps everything).
        crop: ``"center"`` or ``"random"``.
        seed: seed of the random crop; the offset depends only on ``(seed, key)``.
    """

    def __init__(self, resolution: int, min_size: int | None = None, crop: str = "center", seed: int = 0):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        if min_size is None:
            min_size = resolution // 2
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
            raise ValueError(f"min_size must be a non-negative int (or None for resolution//2), got {min_size!r}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.resolution = resolution
        self.min_size = min_size
        self.crop = crop
        self.seed = seed

    def __repr__(self) -> str:
        return (
            f"ImageSanitizer(resolution={self.resolution}, min_size={self.min_size}, "
            f"crop={self.crop!r}, seed={self.seed})"
        )

    def prepare(self, raw: Any, key: str) -> PreparedImage:
        """Open, convert, size-check, resize and crop one image.

        Args:
            raw: anything :func:`open_image` accepts.
            key: the item's identifier (seeds the random crop).

        Raises:
            SkipItem: the item is unusable (``"corrupt"``, ``"truncated"``,
                ``"missing_file"``, ``"too_small"``).
        """
        # Decoding a JPEG at a reduced DCT scale keeps the shorter side >= this, so the
        # size check below gives the same answer as on the full-size image.
        image = open_image(raw, draft_to=max(self.resolution, self.min_size))
        conversions: list[str] = []
        image = _apply_exif_orientation(image, conversions)
        width, height = image.size
        if width == 0 or height == 0:
            raise SkipItem("corrupt", "image has zero width or height")
        if min(width, height) < self.min_size:
            raise SkipItem("too_small", f"{width}x{height} is below min_size={self.min_size}")
        rgb = to_rgb(image, conversions)
        if min(width, height) < self.resolution:
            conversions.append("upscaled")
        rng = key_rng(self.seed, key) if self.crop == "random" else None
        box = crop_box((width, height), self.resolution, self.crop, rng)
        out = rgb.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC, box=box)
        return PreparedImage(out, (width, height), box, conversions)

    def align_image(self, raw: Any, prepared: PreparedImage) -> Image.Image:
        """Open an aligned image (e.g. a conditioning image) and apply ``prepared``'s crop.

        An aligned image of the same shape but a different size is first resized to the main
        image's size, so both cover the same scene region. Returned as 8-bit RGB.

        Raises:
            SkipItem: ``"corrupt_conditioning"`` if it cannot be read, ``"mismatched_conditioning"``
                if its aspect ratio is not the image's (beyond a pixel of rounding).
        """
        try:
            image = _apply_exif_orientation(open_image(raw), [])
        except SkipItem as exc:
            raise SkipItem("corrupt_conditioning", exc.detail) from exc
        rgb = to_rgb(image)
        if rgb.size != prepared.original_size:
            (w, h), (W, H) = rgb.size, prepared.original_size
            if abs(w * H - h * W) > max(w, h, W, H):  # more than a pixel's rounding apart: not the same scene
                raise SkipItem("mismatched_conditioning", f"a {w}x{h} control image for a {W}x{H} image")
            rgb = rgb.resize(prepared.original_size, Image.Resampling.BICUBIC)
        return rgb.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC, box=prepared.box)

    def align_array(self, array: np.ndarray, prepared: PreparedImage, *, nearest: bool = False) -> np.ndarray:
        """Apply ``prepared``'s crop and resize to a ``[H, W]`` float map (e.g. depth).

        Args:
            array: 2-D array over the main image's original pixels (any size; a different
                size is stretched to the main image first).
            prepared: the main image's :class:`PreparedImage`.
            nearest: use nearest-neighbour resampling (for masks) instead of bilinear.

        Returns:
            ``float32`` array ``[resolution, resolution]``.
        """
        return _resample_map(array, prepared.original_size, prepared.box, self.resolution, nearest)


def _apply_exif_orientation(image: Image.Image, conversions: list[str]) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag, if it asks for any change."""
    try:
        orientation = image.getexif().get(0x0112, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
            conversions.append("exif_rotated")
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as exc:
        raise SkipItem("corrupt", f"bad EXIF data: {_short(exc)}") from exc
    return image


def _resample_map(array: np.ndarray, original_size, box, resolution: int, nearest: bool) -> np.ndarray:
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D map [H, W], got shape {arr.shape}")
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    img = Image.fromarray(arr, mode="F")
    if img.size != tuple(original_size):
        img = img.resize(tuple(original_size), resample)
    out = img.resize((resolution, resolution), resample, box=box)
    return np.asarray(out, dtype=np.float32).copy()


def fit_record(record, resolution: int):
    """Make a record's image ``resolution x resolution`` RGB, aligning its other fields.

    Records that already satisfy this (the usual case for the synthetic scenes) are
    returned unchanged. Otherwise the image is converted to RGB and center-cropped/resized,
    and ``depth``, ``masks`` and ``conditioning`` get the same geometry.

    Args:
        record: a :class:`condistill.data.record.Record`.
        resolution: output side length.

    Returns:
        ``(record, conversions)``: the fitted record (a new object if anything changed)
        and the list of conversion reasons applied.
    """
    from dataclasses import replace

    image = record.image
    if not isinstance(image, Image.Image):
        raise TypeError(f"Record.image must be a PIL image, got {type(image).__name__} (key {record.key!r})")
    if image.mode == "RGB" and image.size == (resolution, resolution):
        return record, []
    conversions: list[str] = []
    rgb = to_rgb(image, conversions)
    size = rgb.size
    box = crop_box(size, resolution, "center")
    changes: dict[str, Any] = {
        "image": rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    }
    if size != (resolution, resolution):
        conversions.append("resized")
        if record.depth is not None:
            changes["depth"] = _resample_map(record.depth, size, box, resolution, nearest=False)
        if record.masks is not None:
            masks = np.zeros((len(record.masks), resolution, resolution), dtype=bool)
            for i, mask in enumerate(np.asarray(record.masks)):
                masks[i] = _resample_map(mask.astype(np.float32), size, box, resolution, nearest=True) > 0.5
            changes["masks"] = masks
        if record.conditioning is not None:
            cond = to_rgb(record.conditioning)
            if cond.size != size:
                cond = cond.resize(size, Image.Resampling.BICUBIC)
            changes["conditioning"] = cond.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)
    return replace(record, **changes), conversions

