"""Adapter kinds: the trainable parameters added to the frozen teacher.

Each kind lives in its own module and registers itself with one explicit
``register_adapter(name, cls)`` call; importing this package imports all of them.

* ``controlnet`` - :class:`~condistill.adapters.controlnet.ControlNetStudent`
* ``t2i_adapter`` - :class:`~condistill.adapters.t2i_adapter.T2IAdapterStudent`
* ``lora`` - :class:`~condistill.adapters.lora.LoRAStudent`
* ``controlnet_lora`` - :class:`~condistill.adapters.controlnet_lora.ControlNetLoRAStudent` (a ControlNet and
  a UNet LoRA trained together; not yet measured against the others)
* ``lcm_lora`` - :class:`~condistill.adapters.lcm_lora.LCMLoRAStudent` (a UNet LoRA without a condition: an
  LCM-LoRA of the base, trained on the ``none`` condition)
"""
from condistill.adapters.errors import AdapterConfigError
from condistill.adapters.student import (
    AdapterWeightsError,
    Student,
    available_adapters,
    build_student,
    get_adapter_class,
    register_adapter,
)
from condistill.adapters import controlnet, t2i_adapter, lora, controlnet_lora, lcm_lora  # noqa: E402,F401
from condistill.adapters.controlnet import ControlNetStudent
from condistill.adapters.controlnet_lora import ControlNetLoRAStudent
from condistill.adapters.lcm_lora import LCMLoRAStudent
from condistill.adapters.lora import LoRAStudent
from condistill.adapters.t2i_adapter import T2IAdapterStudent

__all__ = [
    "AdapterConfigError",
    "AdapterWeightsError",
    "Student",
    "ControlNetStudent",
    "ControlNetLoRAStudent",
    "LCMLoRAStudent",
    "T2IAdapterStudent",
    "LoRAStudent",
    "available_adapters",
    "build_student",
    "get_adapter_class",
    "register_adapter",
]
