"""The condition interface and the condition registry.

A *condition* turns a :class:`~condistill.data.record.Record` into the control tensor
``c`` the adapter sees: ``float32 [C, H, W]`` in ``[0, 1]`` at the size of the record's
image (the ControlNet convention). It is a pure function of ``(record, seed)``, so a
training step, an evaluation run and a baseline all see the same ``c`` for the same
sample and seed.

Every condition keeps its options as attributes named like its constructor's keyword
arguments, so :meth:`Condition.config` can write them to JSON next to a trained adapter
and :func:`condition_from_config` can rebuild the exact same condition later.

Concrete conditions register themselves with one explicit
``register_condition(SomeCondition)`` call at the bottom of their module;
``condistill.conditions`` imports those modules, which fills the registry.
"""
from __future__ import annotations

import abc
import copy
import dataclasses
import inspect
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from condistill.data.record import Record
from condistill.utils import jsonable

__all__ = [
    "Condition",
    "FidelityUnavailable",
    "available_conditions",
    "condition_from_config",
    "get_condition",
    "register_condition",
]


class FidelityUnavailable(RuntimeError):
    """:meth:`Condition.fidelity_scores` cannot measure these images (its message says why and what to do)."""


class Condition(abc.ABC):
    """Base class of every condition.

    Subclasses set the class attributes ``name`` (registry key) and ``channels`` (``C``
    of the tensor they return), take their options as keyword arguments in
    ``__init__``, store each one as an attribute of the same name (validated, with
    sequences as tuples), and implement :meth:`compute`.
    """

    name: ClassVar[str] = ""
    channels: ClassVar[int] = 0
    #: ``condistill train NAME``'s recipe: what the condition is, and its named presets (partial
    #: :class:`~condistill.config.DistillConfig` options, :mod:`condistill.presets`); no presets: no recipe
    description: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the evaluation's fidelity metric, its key in :meth:`fidelity_scores` and whether higher or lower is better;
    #: ``None``: the condition has none, and evaluation reports the metrics every condition shares
    fidelity: ClassVar[tuple[str, str] | None] = None
    #: whether the training data must bring each item's own control image ("required"), may ("optional"), or not
    record_conditioning: str | None = None

    def fidelity_scores(self, images: torch.Tensor, data: dict, judge) -> dict[str, float]:
        """How faithful generated ``images`` ``[N, 3, H, W]`` in ``[0, 1]`` are to the held-out ``data`` they were
        made from (``conditioning``: the control images; ``pixel_values``: the real images in ``[-1, 1]``), as
        ``{metric: value}`` holding :attr:`fidelity`'s key; ``judge`` is the evaluation's judge
        (:mod:`condistill.world.judge`), or ``None`` on a user's data, where the condition measures with its own
        means or raises :class:`FidelityUnavailable`. A condition without a fidelity metric returns ``{}``."""
        return {}

    @classmethod
    def distillation_target(cls, rows: dict[str, dict]) -> tuple[str, bool] | None:
        """The bar of the 4-step student ("student-4") against the teacher ("teacher-ddim-50") in an evaluation's
        ``{row: metrics}``: its text and whether it is met (:meth:`teacher_bar`); ``None``: no bar, rows missing."""
        s, t = rows.get("student-4"), rows.get("teacher-ddim-50")
        return None if s is None or t is None else cls.teacher_bar(s, t)

    @classmethod
    def teacher_bar(cls, student: dict, teacher: dict) -> tuple[str, bool] | None:
        return None

    def card_text(self) -> tuple[str, str]:
        """For a model card: the task in words (the part of :attr:`description` before its colon), and what
        ``control_image`` takes."""
        return self.description.partition(":")[0] or self.name, "your image"

    def check(self) -> None:
        """Make sure what this condition will need later is at hand, without loading any model.

        A training run calls it before it loads the base, so that a missing file stops the run in
        seconds. The default has nothing to check; the depth condition makes sure its estimator's
        weight file is in its folder or the Hugging Face cache (downloading it there if needed).

        Raises:
            OSError: something the condition needs is missing; the message says how to provide it.
        """

    # ------------------------------------------------------------------ making c
    @abc.abstractmethod
    def compute(self, record: Record, seed: int) -> torch.Tensor:
        """Build the condition tensor for a validated record (the subclass hook).

        ``record.image`` is guaranteed to be an RGB ``PIL.Image`` and ``seed`` a
        non-negative ``int``. Must return ``float32 [channels, H, W]`` in ``[0, 1]``;
        :meth:`__call__` checks that.
        """

    def __call__(self, record: Record, seed: int = 0) -> torch.Tensor:
        """Return the condition of ``record`` as ``float32 [C, H, W]`` in ``[0, 1]``.

        Args:
            record: the sample; its ``image`` must be a ``PIL.Image`` (converted to RGB
                if it has another mode).
            seed: non-negative integer; randomised conditions (sr, inpaint) draw all
                their randomness from it, so the same ``(record, seed)`` always gives
                the same tensor. Pass a different seed per sample and step (e.g. derived
                from the step and the sample index) to get fresh draws.

        Raises ``TypeError`` for a ``record`` that is no ``Record`` or whose image is no PIL image, and
        ``ValueError`` for a negative or non-integer ``seed``.
        """
        if not isinstance(record, Record):
            raise TypeError(
                f"{type(self).__name__} expects a condistill Record, got {type(record).__name__}; "
                f"for a single image use `{type(self).__name__}.prepare(image)`."
            )
        if not isinstance(record.image, Image.Image):
            raise TypeError(f"record.image must be a PIL.Image, got {type(record.image).__name__}; "
                            "convert arrays with PIL.Image.fromarray(array).")
        seed = check_seed(seed)
        if record.image.mode != "RGB":
            record = dataclasses.replace(record, image=record.image.convert("RGB"))
        cond = self.compute(record, seed)
        self._check_output(cond, record.image.size)
        return cond

    def prepare(self, image: Image.Image, seed: int = 0, **record_fields: Any) -> torch.Tensor:
        """Condition of a single image, for use outside a data pipeline: ``self(Record(image=image,
        **record_fields), seed)``, ``record_fields`` being other :class:`Record` fields (``depth=array``,
        ``conditioning=edge_image``). ``.unsqueeze(0)`` feeds a pipeline; :meth:`to_pil` shows it."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"prepare() expects a PIL.Image, got {type(image).__name__}; load files with "
                            "PIL.Image.open(path) and arrays with PIL.Image.fromarray(array).")
        valid = [f.name for f in dataclasses.fields(Record) if f.name != "image"]
        unknown = sorted(set(record_fields) - set(valid))
        if unknown:
            raise TypeError(f"Unknown Record field(s) {unknown}; valid fields are {valid}.")
        return self(Record(image=image, **record_fields), seed)

    #: The side in pixels that :meth:`control_image` first fits an image to, as training fitted its
    #: images (shorter side resized to it, center crop); None: the image's own size. Not an option of the
    #: condition: ``load_adapter`` sets the adapter's training resolution on ``pipe.condistill_condition``
    #: (:meth:`at_resolution`).
    training_resolution: int | None = None

    def at_resolution(self, resolution: int | None) -> "Condition":
        """A copy of this condition whose :meth:`control_image` fits images to ``resolution`` first."""
        if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int)
                                       or resolution < 1):
            raise ValueError(f"resolution must be a positive int (pixels) or None, got {resolution!r}")
        out = copy.copy(self)
        out.training_resolution = resolution
        return out

    def control_image(self, image: Image.Image, seed: int = 0, multiple: int = 8, resolution: int | None = None,
                      **record_fields: Any) -> torch.Tensor:
        """The condition of one image in the form a stock pipeline takes: float32 ``[1, C, H, W]`` in ``[0, 1]``.

        ``pipe(prompt, image=pipe.condistill_condition.control_image(photo), **pipe.condistill_defaults)``.
        With a ``resolution`` (default :attr:`training_resolution`: the adapter's, on the condition
        ``load_adapter`` hands back) the image (and any aligned ``record_fields``) is first fitted
        to ``resolution x resolution`` exactly as training fitted its images (shorter side resized,
        center crop); ``resolution=0`` keeps the image's own size. The condition is then computed
        at that size (:meth:`prepare`) and its sides are center-cropped down to a multiple of
        ``multiple`` (8 suits every SD pipeline, whose images must be multiples of the VAE factor),
        so the pipeline never stretches it.

        Raises:
            ValueError: a side is shorter than ``2 * multiple`` pixels, too small to carry a condition.
        """
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be a positive int, got {multiple!r}")
        resolution = self.training_resolution if resolution is None else resolution
        if resolution:
            if not isinstance(image, Image.Image):
                raise TypeError(f"control_image() expects a PIL.Image, got {type(image).__name__}")
            from condistill.data.images import fit_record

            fitted, _ = fit_record(Record(image=image, **record_fields), int(resolution))
            image = fitted.image
            record_fields = {k: getattr(fitted, k) for k in record_fields}
        if isinstance(image, Image.Image) and min(image.size) < 2 * multiple:
            raise ValueError(
                f"the control image is {image.size[0]}x{image.size[1]} pixels; both sides must be at least "
                f"{2 * multiple} (and the model sees its training resolution best: resize the image to it first)")
        cond = self.prepare(image, seed, **record_fields)
        height, width = cond.shape[-2] // multiple * multiple, cond.shape[-1] // multiple * multiple
        top, left = (cond.shape[-2] - height) // 2, (cond.shape[-1] - width) // 2
        return cond[None, :, top:top + height, left:left + width].contiguous()

    def _check_output(self, cond: torch.Tensor, size: tuple[int, int]) -> None:
        expected = (self.channels, size[1], size[0])
        if not isinstance(cond, torch.Tensor) or cond.dtype != torch.float32 or tuple(cond.shape) != expected:
            got = (cond.dtype, tuple(cond.shape)) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise RuntimeError(
                f"{type(self).__name__}.compute must return a float32 tensor of shape {expected}, got {got}."
            )
        if cond.numel() and not (float(cond.min()) >= 0.0 and float(cond.max()) <= 1.0):
            raise RuntimeError(f"{type(self).__name__}.compute returned values outside [0, 1].")

    # ------------------------------------------------------------------ looking at c
    def _check_tensor(self, cond: torch.Tensor) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor condition, got {type(cond).__name__}")
        if cond.ndim == 4 and cond.shape[0] == 1:
            cond = cond[0]
        if cond.ndim != 3 or cond.shape[0] != self.channels:
            raise ValueError(
                f"the {self.name} condition has shape [{self.channels}, H, W], got {list(cond.shape)}; "
                "pass one sample (index a batch first)."
            )
        return cond.detach().to("cpu", torch.float32).clamp(0.0, 1.0)

    @classmethod
    def has_start_image(cls) -> bool:
        """Whether the condition defines :meth:`start_image` (sr, inpaint: conditions that are images)."""
        return cls.start_image is not Condition.start_image

    @classmethod
    def start_description(cls) -> str:
        """What sampling from the input starts from, in words: "the input" or "the zero latent"."""
        return "the input" if cls.has_start_image() else "the zero latent"

    def start_image(self, cond: torch.Tensor) -> torch.Tensor:
        """An image ``[B, 3, H, W]`` in ``[-1, 1]`` to start sampling from, noised, for a batch of
        conditions ``[B, C, H, W]`` (:func:`condistill.method.sampler.sample_images` with
        ``init_images``).

        Only conditions that are themselves images have one (sr, inpaint); the default raises.
        """
        raise ValueError(
            f"the {self.name} condition holds no image to start sampling from; sample from noise "
            "(leave the start timestep unset). Only sr and inpaint conditions are images."
        )

    def init_image(self, cond: torch.Tensor) -> torch.Tensor:
        """:meth:`start_image` in ``[0, 1]``, the form an img2img pipeline's ``image=`` takes: what a
        student trained for one step from the input starts from (``load_adapter`` returns that pipeline)::

            control = pipe.condistill_condition.control_image(photo)
            image = pipe(prompt, image=pipe.condistill_condition.init_image(control), control_image=control,
                         **pipe.condistill_defaults).images[0]
        """
        return (self.start_image(cond) + 1.0) / 2.0

    def _check_batch(self, cond: torch.Tensor) -> torch.Tensor:
        if not isinstance(cond, torch.Tensor) or cond.ndim != 4 or cond.shape[1] != self.channels:
            shape = list(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"expected a batch of {self.name} conditions [B, {self.channels}, H, W], got {shape}.")
        return cond.float().clamp(0.0, 1.0)

    def to_pil(self, cond: torch.Tensor) -> Image.Image:
        """Render a condition tensor ``[C, H, W]`` (or ``[1, C, H, W]``) as a PIL image.

        The default shows 3-channel conditions as RGB and 1-channel ones as grayscale;
        conditions with other layouts override it.
        """
        cond = self._check_tensor(cond)
        if self.channels == 3:
            return Image.fromarray(tensor_to_uint8(cond), "RGB")
        if self.channels == 1:
            return Image.fromarray(tensor_to_uint8(cond)[..., 0], "L")
        raise NotImplementedError(f"{type(self).__name__} must define to_pil for {self.channels} channels")

    def save_png(self, cond: torch.Tensor, path: str | os.PathLike) -> str:
        """Write :meth:`to_pil` of ``cond`` to ``path`` as a PNG; returns the path written.

        Missing parent folders are created.
        """
        path = os.fspath(path)
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.to_pil(cond).save(path, format="PNG")
        return path

    # ------------------------------------------------------------------ options
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of the options this condition takes (its ``__init__`` keyword arguments)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(
            p.name for p in params
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )

    @classmethod
    def _check_option_names(cls, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            valid = ", ".join(cls.option_names()) or "(none)"
            raise TypeError(
                f"Unknown option(s) {', '.join(map(repr, unknown))} for condition {cls.name!r}. "
                f"Valid options: {valid}."
            )

    def config(self) -> dict[str, Any]:
        """The condition's name and options as a JSON-serialisable dict.

        ``condition_from_config(cond.config())`` (or ``type(cond).from_config(...)``)
        rebuilds an identical condition. Tuples are written as lists.
        """
        out: dict[str, Any] = {"name": self.name}
        for key in self.option_names():
            out[key] = jsonable(getattr(self, key), f"condition option {key}")
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Condition:
        """Build this condition from a dict written by :meth:`config`.

        The ``name`` entry is optional here but, when present, must be this condition's
        name. Unknown keys raise ``TypeError`` listing the valid options.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"a condition config must be a dict, got {type(config).__name__}")
        options = dict(config)
        name = options.pop("name", cls.name)
        if name != cls.name:
            raise ValueError(
                f"config is for condition {name!r}, not {cls.name!r}; use condition_from_config(config) "
                "to pick the class from the name."
            )
        cls._check_option_names(options)
        return cls(**options)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.option_names())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.config() == other.config()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(repr(self))


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Condition]] = {}


def register_condition(cls: type[Condition]) -> type[Condition]:
    """Add a :class:`Condition` subclass to the registry under ``cls.name``; returns ``cls``.

    Raises ``TypeError`` for a class that is not a concrete ``Condition`` and
    ``ValueError`` for an empty name, a non-positive channel count, or a name already
    taken by a different class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Condition)):
        raise TypeError(f"register_condition expects a Condition subclass, got {cls!r}")
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} is abstract: implement compute(record, seed) before registering it")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if not isinstance(cls.channels, int) or cls.channels < 1:
        raise ValueError(f"{cls.__name__} needs a positive integer class attribute `channels`")
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name != "self" and p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            raise TypeError(f"{cls.__name__}.__init__ must take named options only, not *{p.name}/**{p.name}")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"condition name {cls.name!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}; choose another name"
        )
    _REGISTRY[cls.name] = cls
    return cls


def available_conditions() -> list[str]:
    """Sorted names of the registered conditions and of those installed packages declare (:mod:`.discovery`)."""
    from condistill.conditions.discovery import entry_point_names

    return sorted(set(_REGISTRY) | set(entry_point_names()))


def _lookup(name: str) -> type[Condition]:
    if isinstance(name, str) and name not in _REGISTRY:
        from condistill.conditions.discovery import ENTRY_POINT_GROUP, load_entry_point

        if not load_entry_point(name):
            raise ValueError(
                f"Unknown condition {name!r}. Available conditions: {', '.join(available_conditions()) or '(none)'}. "
                f"A condition of another package is found once that package is installed with its "
                f"{ENTRY_POINT_GROUP!r} entry point."
            )
    if not isinstance(name, str):
        raise ValueError(f"Unknown condition {name!r}. Available conditions: {', '.join(available_conditions())}.")
    return _REGISTRY[name]


def condition_class(name: str) -> type[Condition]:
    """The registered :class:`Condition` subclass ``name`` (``ValueError`` naming the available ones)."""
    return _lookup(name)


def get_condition(name: str, **options: Any) -> Condition:
    """Build the registered condition ``name`` with the given options.

    Example: ``get_condition("sr", scales=(4,))``.

    Raises:
        ValueError: unknown ``name`` (the message lists the available ones) or an
            invalid option value.
        TypeError: an option the condition does not take (the message lists the valid ones).
    """
    cls = _lookup(name)
    cls._check_option_names(options)
    return cls(**options)


def condition_from_config(config: Mapping[str, Any]) -> Condition:
    """Rebuild a condition from :meth:`Condition.config` output (``{"name": ..., **options}``)."""
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(
            "a condition config must be a dict with a 'name' entry, as written by Condition.config(); "
            f"got {config!r}"
        )
    return _lookup(config["name"]).from_config(config)


# ---------------------------------------------------------------------- helpers for subclasses
def check_seed(seed: Any) -> int:
    """Return ``seed`` as an ``int`` after checking it is a non-negative integer."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(seed)


def uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, C]`` (or ``[H, W]``) array -> ``float32 [C, H, W]`` tensor in ``[0, 1]``."""
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)


def tensor_to_uint8(cond: torch.Tensor) -> np.ndarray:
    """``float [C, H, W]`` tensor in ``[0, 1]`` -> ``uint8 [H, W, C]`` array (rounded)."""
    arr = cond.detach().to("cpu", torch.float32).clamp(0, 1).mul(255.0).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def check_probability(name: str, value: Any) -> float:
    """Validate a probability option and return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float, integer: bool = False) -> tuple:
    """Validate a ``(min, max)`` option with ``low <= min <= max <= high``; returns a tuple."""
    kind = "integers" if integer else "numbers"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (min, max) of {kind}, got {value!r}")
    ok_types = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if any(isinstance(v, bool) or not isinstance(v, ok_types) for v in value):
        raise ValueError(f"{name} must be a pair (min, max) of {kind}, got {value!r}")
    lo, hi = (int(v) for v in value) if integer else (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi <= high):
        raise ValueError(f"{name} must satisfy {low} <= min <= max <= {high}, got {value!r}")
    return (lo, hi)


def import_controlnet_aux(attribute: str) -> Any:
    """Import ``controlnet_aux`` lazily and quietly and return one of its attributes.

    ``import controlnet_aux`` loads every annotator it ships and prints a dozen
    deprecation warnings, so it is only done when a detector is actually needed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import controlnet_aux
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"this condition needs controlnet-aux ({attribute}); install it with `pip install controlnet-aux`"
            ) from err
    return getattr(controlnet_aux, attribute)
