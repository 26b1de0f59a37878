"""The registry of adapter kinds and :func:`build_student`, which builds one by name.

A leaf module (it imports no other adapter module), so that both the students
(:mod:`condistill.adapters.student`, whose :func:`~condistill.adapters.student.register_adapter`
checks the class and adds it here) and the checks of exported files
(:mod:`condistill.adapters.integrity`) can look kinds up without importing each other.
"""
from __future__ import annotations

__all__ = ["add_adapter_class", "available_adapters", "get_adapter_class", "build_student"]

_REGISTRY: dict[str, type] = {}


def add_adapter_class(name: str, cls: type) -> None:
    """Record ``cls`` (a checked :class:`~condistill.adapters.Student` subclass) under ``name``; use
    :func:`~condistill.adapters.register_adapter`, which checks the class first."""
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"An adapter named {name!r} is already registered ({_REGISTRY[name].__name__}).")
    _REGISTRY[name] = cls


def available_adapters() -> list[str]:
    """Names of the registered adapter kinds, sorted."""
    return sorted(_REGISTRY)


def get_adapter_class(name: str) -> type:
    """The :class:`~condistill.adapters.Student` subclass registered as ``name``; a clear error lists the options."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown adapter kind {name!r}; choose one of {available_adapters()}.") from None


def build_student(kind: str, unet, condition_channels: int, **options):
    """Build a student of adapter ``kind`` around a frozen UNet.

    Args:
        kind: a registered adapter name (:func:`available_adapters`): ``"controlnet"``,
            ``"t2i_adapter"`` or ``"lora"``.
        unet: the teacher's ``UNet2DConditionModel``, or a :class:`condistill.frozen.Base`
            (then its UNet and ``vae_scale_factor`` are used).
        condition_channels: channels ``C`` of the condition tensor ``[B, C, H, W]``.
        **options: kind-specific options (see each class), plus ``vae_scale_factor``
            (pixels per latent pixel, 8 for SD): taken from the base when a
            :class:`~condistill.frozen.Base` is passed, required with a bare UNet.

    Trainable parameter names (:meth:`Student.trainable_named_parameters`) are the student's
    own ``named_parameters()`` names (``controlnet.*``, ``adapter.*``, ``unet.*lora*``), so an
    EMA keyed by them can be swapped into the student directly.

    Note:
        ``lora`` injects LoRA layers into the UNet *in place*; they are switched on only inside
        the student's own forward, so the UNet called directly stays the teacher.
    """
    cls = get_adapter_class(kind)
    from condistill.frozen import Base

    if isinstance(unet, Base):
        base_factor = unet.vae_scale_factor
        if options.get("vae_scale_factor", base_factor) != base_factor:
            raise ValueError(
                f"vae_scale_factor={options['vae_scale_factor']} contradicts the base's VAE factor "
                f"{base_factor}; leave it out when passing a Base."
            )
        options["vae_scale_factor"] = base_factor
        unet = unet.unet
    return cls(unet, condition_channels, **options)
