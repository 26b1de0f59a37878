"""The instructions ``condistill export`` prints: where each file goes, and diffusers code that runs as printed."""
from __future__ import annotations

from pathlib import Path

from condistill.publish.comfyui import BASE_PLACEHOLDER, CONTROL_IMAGE

__all__ = ["CONTROL_TEXT", "workflow_lines", "embedded_base", "call_line", "with_base_indented"]


def workflow_lines(flow: Path | None, config: dict) -> list[str]:
    steps, guidance = config["recommended_steps"], config["recommended_guidance"]
    if flow is None:
        return [f"Sample with {steps} steps, CFG {guidance:g}, sampler LCM (the nearest to the training grid)."]
    return [f"ComfyUI workflow (API format; set {BASE_PLACEHOLDER} to your copy of the base, put the control image in",
            f"its input folder as {CONTROL_IMAGE}): {flow}. A1111: sampler LCM, {steps} steps, CFG {guidance:g}."]


#: what the printed code's ``control`` is
CONTROL_TEXT = ("[1, C, H, W] in [0, 1]; condistill.load_adapter(RUN).condistill_condition.control_image(photo) "
                "makes it as training did")


def embedded_base(config: dict) -> bool:
    from condistill.publish.card import is_embedded_base

    return is_embedded_base(str(config["base_name_or_path"]))


def call_line(config: dict) -> str:
    steps, guidance = config["recommended_steps"], config["recommended_guidance"]
    height = int(config.get("height") or config["resolution"])
    width = int(config.get("width") or config["resolution"])
    return (f'image = pipe("a prompt", image=control, num_inference_steps={steps}, guidance_scale={guidance:g}, '
            f"height={height}, width={width}).images[0]")


def with_base_indented(lines: list[str], config: dict) -> list[str]:
    """Code lines with the base (written ``"BASE_MARK"``) set so that diffusers finds it (``card.base_code``),
    indented by 4."""
    from condistill.publish.card import with_base

    return [("    " + line) if line else "" for line in with_base(lines, str(config["base_name_or_path"]))]
