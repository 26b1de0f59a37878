"""The two-stage route practitioners take today, for the evaluation to compare against: an LCM-LoRA of the base
loaded next to a conventional adapter, sampled in a few steps by diffusers' ``LCMScheduler``.

``condistill eval --lcm-lora SOURCE`` loads the LoRA into the base's UNet once (:func:`load_lcm_lora`) and
adds rows that sample with it switched on (:func:`lcm_lora_rows`): the LoRA alone (the base at 2 and 4 steps)
and, with ``--baseline``, the conventional adapter with it (``lcm-lora+baseline-<steps>-g<guidance>``), at
guidance 1.0 and 1.5, what LCM-LoRA users sample at. A LoRA baseline's own LoRA is stacked on it as
diffusers stacks two named adapters (weights 1.0 and ``--lcm-lora-scale``, unfused).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["LCM_LORA_NAME", "LCM_GUIDANCES", "LCM_STEPS", "lcm_lora_file", "lcm_lora_rows", "load_lcm_lora"]

#: the peft adapter name of the loaded LCM-LoRA
LCM_LORA_NAME = "lcm_lora"
LCM_STEPS = (2, 4)
LCM_GUIDANCES = (1.0, 1.5)


def lcm_lora_file(source: str) -> tuple[str, str | None]:
    """``(what to load, weight file name)`` for ``lora_state_dict``: a ``.safetensors`` file, a folder holding
    ``pytorch_lora_weights.safetensors`` (a condistill ``lcm_lora`` export or its run, or ``embedded:lcm-lora``,
    the LCM-LoRA of the embedded teacher that ships with condistill), or a hub id."""
    from condistill.adapters.lora import LORA_WEIGHT_NAME
    from condistill.hub import embedded_path

    path = embedded_path(source) or Path(source).expanduser()
    if path.is_file():
        return str(path), None
    if path.is_dir():
        for folder in (path, path / "adapter"):
            if (folder / LORA_WEIGHT_NAME).is_file():
                return str(folder), LORA_WEIGHT_NAME
        raise FileNotFoundError(f"--lcm-lora {source}: no {LORA_WEIGHT_NAME} in it or in its adapter/ folder; pass "
                                "the LoRA file itself")
    if path.suffix == ".safetensors" or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--lcm-lora {source}: no such file or folder")
    return source, LORA_WEIGHT_NAME  # a hub id: its pytorch_lora_weights.safetensors (the cache when offline)


def load_lcm_lora(base, source: str) -> None:
    """Load the LCM-LoRA ``source`` into ``base.unet`` as the peft adapter :data:`LCM_LORA_NAME`, switched off
    (rows switch it on with :func:`condistill.adapters.lora.stacked_lora`)."""
    from condistill.adapters.lora import switch_lora
    from condistill.hub import hub_cache_dir, hub_offline

    what, weight_name = lcm_lora_file(source)
    pipeline = base.family.pipeline_class("text")
    try:
        state, alphas = pipeline.lora_state_dict(what, weight_name=weight_name, cache_dir=hub_cache_dir(),
                                                 local_files_only=hub_offline())
    except (OSError, ValueError, EnvironmentError) as error:
        raise FileNotFoundError(f"--lcm-lora {source}: could not read a LoRA ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else ''})") from error
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise ValueError(f"--lcm-lora {source}: the file holds no UNet LoRA (keys unet.*)")
    try:
        base.unet.load_lora_adapter(unet_state, prefix="unet", network_alphas=alphas, adapter_name=LCM_LORA_NAME)
    except (RuntimeError, ValueError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(f"--lcm-lora {source} does not fit the base {base.name_or_path}: "
                         f"{(lines[1] if len(lines) > 1 else lines[0] if lines else '')[:300]}") from error
    for name, param in base.unet.named_parameters():
        if f".{LCM_LORA_NAME}." in name:
            param.requires_grad_(False)
    switch_lora(base.unet, None)


def lcm_lora_rows(baseline: str | None) -> list:
    """The rows of the LCM-LoRA alone (the base with it, ``lcm-lora-<steps>-g<guidance>``) and, given a
    ``baseline`` adapter folder, of that adapter with it (``lcm-lora+baseline-<steps>-g<guidance>``)."""
    from condistill.evaluation.evaluate import RowSpec

    rows = []
    for model, prefix in (("teacher", "lcm-lora"), *(((baseline, "lcm-lora+baseline"),) if baseline else ())):
        for steps in LCM_STEPS:
            for guidance in LCM_GUIDANCES:
                rows.append(RowSpec(f"{prefix}-{steps}-g{guidance:g}", model, "lcm", steps, guidance,
                                    lcm_lora=True))
    return rows
