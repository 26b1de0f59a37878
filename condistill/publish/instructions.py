"""The instructions ``condistill export`` prints: where each file goes, and diffusers code that runs as printed."""
from __future__ import annotations

from pathlib import Path

from condistill.publish.comfyui import BASE_PLACEHOLDER, CONTROL_IMAGE, INPUT_IMAGE

__all__ = ["CONTROL_TEXT", "workflow_lines", "one_step_lines", "embedded_base", "call_line", "with_base_indented"]


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def _start(config: dict) -> dict | None:
    """The trained one-step start when the student is sampled in one step from inside the grid (zero or input)."""
    from condistill.publish.card import trained_one_step

    start = trained_one_step(config) if int(config["recommended_steps"]) == 1 else None
    return start if start and start["from"] != "noise" else None


def workflow_lines(flow: Path | None, config: dict) -> list[str]:
    """Where the ComfyUI workflow is and what it loads, and A1111's nearest settings (or why it has none)."""
    steps, guidance = int(config["recommended_steps"]), config["recommended_guidance"]
    start = _start(config)
    a1111 = (f"A1111: sampler LCM, {_steps(steps)}, CFG {guidance:g}." if start is None else
             "A1111 cannot start the step where it was trained; use the workflow or condistill.load_adapter.")
    if flow is None:
        return [a1111]
    images = f"{CONTROL_IMAGE}" + (f" and the input image as {INPUT_IMAGE}" if start and start["from"] == "input" else "")
    return [f"ComfyUI workflow (API format; set {BASE_PLACEHOLDER} to your copy of the base, put the control image in",
            f"its input folder as {images}): {flow}.", a1111]


def one_step_lines(config: dict, folder: Path) -> list[str]:
    """For a student sampled in one step from inside the grid: the printed stock pipeline starts from noise."""
    from condistill.method.one_step import describe

    start = _start(config)
    if start is None:
        return []
    return [f"Note: this student's one step was trained from {describe(start)}; the stock text-to-image pipeline above "
            "takes it from pure noise. Sample it as trained with",
            f"    condistill.load_adapter({str(folder)!r})"
            + (" (an img2img pipeline whose image= is the start image)." if start["from"] == "input" else ".")]


#: what the printed code's ``control`` is
CONTROL_TEXT = ("[1, C, H, W] in [0, 1]; condistill.load_adapter(RUN).condistill_condition.control_image(photo) "
                "makes it as training did")


def embedded_base(config: dict) -> bool:
    from condistill.publish.card import is_embedded_base

    return is_embedded_base(str(config["base_name_or_path"]))


def call_line(config: dict) -> str:
    steps, guidance = config["recommended_steps"], config["recommended_guidance"]
    from condistill.publish.card import training_size

    height, width = training_size(config)
    return (f'image = pipe("a prompt", image=control, num_inference_steps={steps}, guidance_scale={guidance:g}, '
            f"height={height}, width={width}).images[0]")


def with_base_indented(lines: list[str], config: dict) -> list[str]:
    """Code lines with the base (written ``"BASE_MARK"``) set so that diffusers finds it (``card.base_code``),
    indented by 4."""
    from condistill.publish.card import with_base

    return [("    " + line) if line else "" for line in with_base(lines, str(config["base_name_or_path"]))]
