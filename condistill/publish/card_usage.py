"""How an export is used, as its model card shows it: the task and control image of its condition, the loading
code (stock pipeline and plain diffusers), the one-step start and the size it was trained at
(:mod:`condistill.publish.card` builds the card around them; the export instructions share them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from condistill.method import one_step

__all__ = ["BASE_MARK", "base_code", "base_folder", "condition_text", "img2img_export", "is_embedded_base",
           "is_local_base", "one_step_text", "other_tools_text", "trained_one_step", "training_size", "usage_text",
           "usage_without_condition", "with_base"]


def condition_text(config: Mapping[str, Any]) -> tuple[str, str]:
    """The task an export's condition does, and what its ``control_image`` takes (:meth:`Condition.card_text`);
    generic words for a condition no installed package declares."""
    from condistill.conditions import available_conditions, condition_from_config

    name = config["condition_name"]
    if name in available_conditions():
        try:
            return condition_from_config({"name": name, **(config.get("condition_config") or {})}).card_text()
        except (TypeError, ValueError):  # options of another version of the condition
            pass
    return name, "your image"


def base_folder(base: str) -> Path | None:
    """The local folder of ``base`` when there is one without any download (folder, embedded, hub cache)."""
    from condistill.hub import embedded_path

    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    try:
        embedded = embedded_path(base)
    except FileNotFoundError:
        return None
    return embedded


def is_local_base(base: str) -> bool:
    from condistill.hub import EMBEDDED_PREFIX, looks_like_repo_id

    return base.startswith(EMBEDDED_PREFIX) or Path(base).expanduser().is_dir() or not looks_like_repo_id(base)


#: stands for the base, quoted, in plain-diffusers lines (the adapters' snippets); :func:`with_base` makes it ``BASE``
BASE_MARK = "\x00condistill-base\x00"


def is_embedded_base(base: str) -> bool:
    """Whether ``base`` names a model shipped inside condistill (``embedded:<name>``, or a legacy
    ``data/<name>`` that is not a local folder): one that only condistill knows how to find."""
    from condistill.hub import EMBEDDED_PREFIX, embedded_path

    try:
        return base.startswith(EMBEDDED_PREFIX) or embedded_path(base) is not None
    except FileNotFoundError:  # an embedded name this package does not ship
        return True


def base_code(base: str) -> tuple[list[str], str]:
    """``(imports, assignment)``: plain-diffusers code that sets ``BASE`` to what ``from_pretrained`` takes.

    An embedded base (``embedded:tiny-teacher``) is a folder inside the installed package, which
    ``from_pretrained`` cannot find by that name: ``BASE = resolve_pretrained_dir("embedded:...")``.
    A local folder is its path as recorded; a hub base is its repo id.
    """
    if is_embedded_base(base):
        return (["from condistill.hub import resolve_pretrained_dir"],
                f"BASE = resolve_pretrained_dir({json.dumps(base)})  # the base's folder inside the condistill package")
    if is_local_base(base):
        return [], f"BASE = {json.dumps(base)}  # a local folder: change this path where it does not exist"
    return [], f"BASE = {json.dumps(base)}"


def with_base(lines: list[str], base: str) -> list[str]:
    """Plain-diffusers ``lines`` written with :data:`BASE_MARK` for the base, turned into code that runs.

    The quoted mark becomes the name ``BASE``; :func:`base_code`'s imports join the first import
    block and its assignment follows that block's blank line (or comes first when there is none).
    """
    out = []
    for line in lines:
        for quote in ('"', "'"):
            line = line.replace(f"{quote}{BASE_MARK}{quote}", "BASE")
        out.append(line.replace(BASE_MARK, base))
    if not any(BASE_MARK in line for line in lines):
        return out
    imports, assignment = base_code(base)
    blank = out.index("") if "" in out else 0
    return out[:blank] + imports + ([""] if blank else []) + [assignment] + out[blank + (1 if blank else 0):]


def other_tools_text(config: Mapping[str, Any]) -> str:
    """Where the student goes for ComfyUI and A1111 (``condistill export``), or why it does not."""
    fmt = {"controlnet": "single-file", "t2i_adapter": "single-file", "lora": "kohya"}.get(config["kind"])
    if fmt is None:
        return f"ComfyUI and A1111: `condistill export` has no format for the {config['kind']} kind yet."
    if is_embedded_base(str(config["base_name_or_path"])):
        return ("ComfyUI and A1111 cannot load the embedded teacher (its VAE downsamples 4x, not 8x), so "
                f"`condistill export --format {fmt}` writes this student's file without a ComfyUI workflow.")
    return (f"ComfyUI and A1111: `condistill export <this folder> --format {fmt} --out student.safetensors` writes "
            "the files they load and, where ComfyUI can sample the student as it was trained, the workflow that "
            "does (`student_comfyui.json`).")


def trained_one_step(config: Mapping[str, Any]) -> dict | None:
    """The one-step start an export records, in its dict form (:mod:`condistill.method.one_step`), or None."""
    from condistill.conditions import available_conditions, condition_class

    name = config["condition_name"]
    image = name in available_conditions() and condition_class(name).has_start_image()
    return one_step.normalize(config.get("one_step_start"), image)


def img2img_export(config: Mapping[str, Any]) -> bool:
    """``load_adapter`` returns an img2img pipeline: a ControlNet trained for one step from the input."""
    start = trained_one_step(config)
    return config["kind"] == "controlnet" and bool(start) and start["from"] == "input"


def one_step_text(config: Mapping[str, Any]) -> str:
    start = trained_one_step(config)
    if start is None:
        return ("One step (`num_inference_steps=1`) starts from pure noise at the top of the grid; this student was "
                "not trained for one step in particular.")
    text = (f"One step: trained for one step from {one_step.describe(start)}, and sampled from there: the scheduler "
            f"starts every one-step schedule at t = {start['timestep']} (`one_step_start` in its config)")
    if img2img_export(config):
        return (text + ". `load_adapter` returns the ControlNet img2img pipeline, whose `image=` is the start image "
                "(`pipe.condistill_condition.init_image(control)`) noised there; a pipeline without an image to "
                "start from cannot sample this step.")
    if start["from"] == "input":
        return text + "; diffusers has no img2img pipeline for this kind, so its pipelines take that step from noise."
    return text + "."


def training_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """The ``(height, width)`` an export was trained at (its ``resolution`` when it records no height/width)."""
    return int(config.get("height") or config["resolution"]), int(config.get("width") or config["resolution"])


def usage_text(config: Mapping[str, Any], source: str) -> str:
    kind, base = config["kind"], str(config["base_name_or_path"])
    steps, guidance = config["recommended_steps"], config["recommended_guidance"]
    height, width = training_size(config)
    files = config.get("weight_files", {})
    from condistill.adapters import get_adapter_class

    if not get_adapter_class(kind).takes_condition:
        return usage_without_condition(config, source, base, files)
    head = [
        "```python",
        "from PIL import Image",
        "from condistill import load_adapter",
        "",
        f'ADAPTER = "{source}"',
        "pipe = load_adapter(ADAPTER)  # a stock diffusers pipeline with the few-step CoDiScheduler",
        f'photo = Image.open("photo.png").convert("RGB")  # {condition_text(config)[1]}',
        "control = pipe.condistill_condition.control_image(photo)  # [1, C, H, W] in [0, 1]",
        *(['start = pipe.condistill_condition.init_image(control)  # the image its one step starts from',
           'image = pipe("a prompt", image=start, control_image=control, **pipe.condistill_defaults).images[0]']
          if img2img_export(config) else ['image = pipe("a prompt", image=control, **pipe.condistill_defaults).images[0]']),
        f"# {steps} steps, guidance {guidance:g}, {height}x{width} px",
        "```",
        "",
        "`pipe.condistill_condition` is the condition the adapter was trained with (its recorded options), and "
        "its `control_image` first fits the photo to the training resolution as training did.",
        "",
        "The same in plain diffusers (the scheduler class comes from condistill; `ADAPTER` and `control` as above):",
        "",
        "```python",
    ]
    # each adapter kind writes its own plain-diffusers loading lines (the registry dispatches)
    family = config.get("base_fingerprint", {}).get("family", "sd")
    body = with_base(get_adapter_class(kind).diffusers_snippet(BASE_MARK, files, family), base)
    body += [
        'pipe.scheduler = CoDiScheduler.from_pretrained(ADAPTER, subfolder="scheduler")',
        f'image = pipe("a prompt", image=control, num_inference_steps={steps}, guidance_scale={guidance:g},',
        f"             height={height}, width={width}).images[0]",
        "```",
    ]
    return "\n".join(head + body)


def usage_without_condition(config: Mapping[str, Any], source: str, base: str, files) -> str:
    """The usage of a condition-free kind (an LCM-LoRA): a text-to-image pipeline, no control image."""
    from condistill.adapters import get_adapter_class

    steps, guidance = config["recommended_steps"], config["recommended_guidance"]
    height, width = training_size(config)
    family = config.get("base_fingerprint", {}).get("family", "sd")
    body = with_base(get_adapter_class(config["kind"]).diffusers_snippet(BASE_MARK, files, family), base)
    return "\n".join([
        "```python", "from condistill import load_adapter", "", f'ADAPTER = "{source}"',
        "pipe = load_adapter(ADAPTER)  # a stock text-to-image pipeline with the LoRA and the few-step CoDiScheduler",
        'image = pipe("a prompt", **pipe.condistill_defaults).images[0]',
        f"# {steps} steps, guidance {guidance:g}, {height}x{width} px", "```", "",
        "The same in plain diffusers (the scheduler class comes from condistill):", "", "```python", *body,
        'pipe.scheduler = CoDiScheduler.from_pretrained(ADAPTER, subfolder="scheduler")',
        f'image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={guidance:g}, height={height}, '
        f"width={width}).images[0]", "```"])
