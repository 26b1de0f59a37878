"""LoRAs in the kohya/webui key layout that A1111's and ComfyUI's LoRA loaders take and diffusers' ``load_lora_weights``
converts on load: ``lora_unet_<diffusers module path, dots as underscores>.lora_down.weight`` (= peft ``lora_A``),
``.lora_up.weight`` (= ``lora_B``) and ``.alpha`` (a scalar: the update is scaled by ``alpha / rank`` as in peft).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

__all__ = ["kohya_lora_state_dict", "check_diffusers_maps_back", "lora_alpha"]

_PEFT_KEY = re.compile(r"^unet\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def kohya_lora_state_dict(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/PEFT LoRA keys ``unet.<module>.lora_A/B.weight`` -> kohya keys (+ one ``.alpha`` each)."""
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, set[str]] = {}
    for key, tensor in peft_state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(
                f"LoRA key {key!r} is not a UNet lora_A/lora_B weight; the kohya export supports plain UNet LoRAs only."
            )
        module, ab = match["module"], match["ab"]
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = tensor.contiguous()
        pairs.setdefault(name, set()).add(ab)
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=tensor.dtype)
    unpaired = sorted(n for n, abs_ in pairs.items() if abs_ != {"A", "B"})
    if unpaired:
        raise ValueError(f"LoRA modules without both lora_A and lora_B: {unpaired[:5]}")
    return out


def check_diffusers_maps_back(kohya: dict[str, torch.Tensor], peft_state: dict[str, torch.Tensor]) -> None:
    """The installed diffusers' kohya reader must map every key back to its own module (when importable)."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:  # another diffusers layout: the loader itself is the check
        return
    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    back = set(convert_unet_state_dict_to_peft(converted))
    wrong = sorted(set(peft_state) - back)
    if wrong:
        raise ValueError(
            f"diffusers would read {len(wrong)} kohya key(s) back as other modules (module names with underscores "
            f"it cannot tell from path separators), e.g. {wrong[:3]}; this LoRA's targets cannot be exported to kohya."
        )


def lora_alpha(file: Path, adapter_config: dict) -> float:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata") or "{}")
    for flag in ("use_rslora", "use_dora"):
        if meta.get(f"unet.{flag}"):
            raise ValueError(f"{file}: {flag} LoRAs have no kohya equivalent here.")
    if meta.get("unet.alpha_pattern") or meta.get("unet.rank_pattern"):
        raise ValueError(f"{file}: per-module alpha/rank patterns are not supported by the kohya export.")
    alpha = meta.get("unet.lora_alpha", adapter_config.get("adapter_options", {}).get("lora_alpha"))
    if alpha is None:
        raise ValueError(f"{file} records no lora_alpha (neither in its metadata nor in condistill_config.json).")
    return float(alpha)
