"""A ComfyUI workflow (API format) that samples an exported student the way condistill does.

Our students are consistency models on the N-point skip grid: at each step the UNet sees a grid
timestep, its eps prediction becomes ``F = c_skip z + c_out x0`` (LCM's boundary scalings), and
the next step re-noises ``F`` with fresh noise. ComfyUI has each piece as a core node (derived from
its source at :data:`COMFYUI_COMMIT`, checked by ``tests/publish/test_comfyui.py`` against fixtures
that ``tools/comfyui_fixtures.py`` recorded from it):

* ``ModelSamplingDiscrete`` with ``sampling="lcm"`` keeps 50 points of the 1000-step schedule,
  timesteps 19, 39, ..., 999 (our grid for ``num_grid=50``), and applies the same c_skip / c_out
  (sigma_data 0.5, timestep scaling 10). Its c_skip multiplies the unscaled latent ``z / a_t``
  where ours multiplies ``z``; c_skip is below 1e-5 on every grid point, so the two differ by less
  than 1e-5 of the latent.
* ``KSampler`` with sampler ``lcm`` re-noises with fresh noise between steps, as our stochastic
  scheduler does, and scheduler ``simple`` on those 50 points visits the timesteps we sample at;
  a one-step start inside the grid is KSampler's ``denoise`` (its share of the grid) on the empty
  latent (``from: zero``) or on the encoded input image (``from: input``).
* ``ControlNetLoader`` reads our single-file ControlNet and T2I-Adapter files and
  ``ControlNetApplyAdvanced`` applies them to both prompts; ``LoraLoaderModelOnly`` loads a kohya LoRA.

ComfyUI cannot sample every student that way; :func:`workflow` says why not instead of writing a
workflow that would give poor images. The base is a placeholder file name (:data:`BASE_PLACEHOLDER`):
exports carry no single-file base, and the user points the loader at their own copy of it.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["COMFYUI_COMMIT", "COMFY_GRID", "BASE_PLACEHOLDER", "CONTROL_IMAGE", "INPUT_IMAGE", "MARK",
           "ksampler_timesteps", "workflow", "is_ours"]

#: the ComfyUI source the node names, inputs and formulas were read from
COMFYUI_COMMIT = "618b803d314a525faca8f8163d85eaa9ebc1d774"
#: grid points ComfyUI's "lcm" model sampling keeps of a 1000-step schedule
COMFY_GRID = 50
COMFY_TRAIN_TIMESTEPS = 1000
#: the checkpoint loader's file: the user's single-file copy of the base, renamed or replaced in the node
BASE_PLACEHOLDER = "BASE_MODEL.safetensors"
#: LoadImage's files: the control image (in ComfyUI's input folder) and, for a start from the input, that image
CONTROL_IMAGE = "control.png"
INPUT_IMAGE = "input.png"
#: every node's ``_meta.title`` starts with it: how an export recognises a workflow it wrote
MARK = "condistill"
#: the noise schedule ComfyUI's SD 1.x/2.x and SDXL checkpoints get ("linear" there, scaled_linear here)
_SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
_LCM_CONSTANTS = {"sigma_data": 0.5, "timestep_scaling": 10.0}


def ksampler_timesteps(steps: int, denoise: float = 1.0) -> list[int]:
    """The UNet timesteps ComfyUI's KSampler visits with sampler ``lcm`` and scheduler ``simple`` on the
    ``lcm`` model sampling: with ``denoise < 1`` it plans ``int(steps / denoise)`` steps and runs the last
    ``steps``; the ``simple`` scheduler takes the grid point at ``int(i * 50 / planned)`` from the top."""
    planned = steps if denoise > 0.9999 else int(steps / denoise)
    stride = COMFY_TRAIN_TIMESTEPS // COMFY_GRID
    descending = [COMFY_TRAIN_TIMESTEPS - 1 - stride * k for k in range(COMFY_GRID)]
    share = COMFY_GRID / planned
    return [descending[int(i * share)] for i in range(planned)][-steps:]


def _node(kind: str, title: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs, "_meta": {"title": f"{MARK}: {title}"}}


def is_ours(data: Any) -> bool:
    """Whether a loaded JSON is a workflow :func:`workflow` wrote (every node titled with :data:`MARK`)."""
    return isinstance(data, dict) and bool(data) and all(
        isinstance(n, dict) and str(n.get("_meta", {}).get("title", "")).startswith(MARK) for n in data.values())


def _problems(config: Mapping[str, Any], scheduler: Mapping[str, Any], condition_channels: int) -> list[str]:
    from condistill.publish.card import is_embedded_base

    out = []
    if is_embedded_base(str(config["base_name_or_path"])):
        out.append("its base is the embedded teacher, which ComfyUI cannot load (its VAE downsamples 4x, not 8x)")
    if config.get("prediction_type", "epsilon") != "epsilon":
        out.append(f"its base predicts {config.get('prediction_type')}; ComfyUI's LCM sampling assumes epsilon")
    if int(config.get("num_grid", COMFY_GRID)) != COMFY_GRID or \
            int(scheduler.get("num_train_timesteps", COMFY_TRAIN_TIMESTEPS)) != COMFY_TRAIN_TIMESTEPS:
        out.append(f"it was distilled on a {config.get('num_grid')}-point grid of {scheduler.get('num_train_timesteps')} "
                   f"steps; ComfyUI's LCM sampling keeps {COMFY_GRID} points of {COMFY_TRAIN_TIMESTEPS}")
    schedule = {k: scheduler.get(k) for k in _SD_SCHEDULE}
    if schedule != _SD_SCHEDULE or scheduler.get("rescale_betas_zero_snr") or scheduler.get("trained_betas"):
        out.append(f"its noise schedule {schedule} is not SD's, which ComfyUI gives SD checkpoints")
    constants = {k: scheduler.get(k, v) for k, v in _LCM_CONSTANTS.items()}
    if constants != _LCM_CONSTANTS:
        out.append(f"its boundary scalings use {constants}; ComfyUI's LCM sampling uses {_LCM_CONSTANTS}")
    if not scheduler.get("stochastic", True):
        out.append("it is sampled with deterministic re-noising; ComfyUI's LCM sampler draws fresh noise")
    takes = (3,) if config.get("kind") == "controlnet" else (1, 3)  # its T2I-Adapter node averages RGB to gray
    if condition_channels not in takes:
        out.append(f"its condition has {condition_channels} channels; ComfyUI's control nodes feed it an RGB image")
    return out


def workflow(config: Mapping[str, Any], scheduler: Mapping[str, Any], files: Mapping[str, str], *,
             prompt: str = "a photo", seed: int = 0) -> tuple[dict | None, str | None]:
    """The API-format workflow that samples the exported student at its recommended steps and guidance,
    or ``(None, why)`` when ComfyUI cannot sample it as it was trained.

    Args:
        config: the export's ``condistill_config.json``; scheduler: its ``scheduler_config.json``.
        files: the file names the workflow loads: ``"controlnet"`` (a ControlNet or T2I-Adapter file, in
            ComfyUI's ``models/controlnet``) and, for a LoRA student, ``"lora"`` (in ``models/loras``).
    """
    from condistill.publish.card import trained_one_step, training_size

    channels = int(config.get("adapter_options", {}).get("condition_channels", 3))
    problems = _problems(config, scheduler, channels)
    if problems:
        return None, "; ".join(problems)
    steps, guidance = int(config["recommended_steps"]), float(config["recommended_guidance"])
    start = trained_one_step(config) if steps == 1 else None
    denoise, source = 1.0, "noise"
    if start is not None and start["from"] != "noise":
        denoise, source = round((int(start["timestep"]) + 1) / COMFY_TRAIN_TIMESTEPS, 6), start["from"]
    from condistill.method.schedule import sampling_timesteps, skip_grid

    ours = sampling_timesteps(skip_grid(COMFY_TRAIN_TIMESTEPS, COMFY_GRID), steps,
                              None if source == "noise" else int(start["timestep"])).tolist()
    visited = ksampler_timesteps(steps, denoise)
    if visited != ours:
        return None, (f"KSampler's simple schedule at {steps} steps, denoise {denoise} visits {visited}, not the "
                      f"student's timesteps {ours}")
    height, width = training_size(config)
    nodes = {
        "1": _node("CheckpointLoaderSimple", "the base (your copy of it)", ckpt_name=BASE_PLACEHOLDER),
        "2": _node("ModelSamplingDiscrete", "LCM sampling on the 50-point grid", model=["1", 0], sampling="lcm",
                   zsnr=False),
    }
    model = ["2", 0]
    if "lora" in files:
        nodes["3"] = _node("LoraLoaderModelOnly", "the student's LoRA", model=model, lora_name=files["lora"],
                           strength_model=1.0)
        model = ["3", 0]
    nodes.update({
        "4": _node("CLIPTextEncode", "prompt", text=prompt, clip=["1", 1]),
        "5": _node("CLIPTextEncode", "negative prompt (empty)", text="", clip=["1", 1]),
        "6": _node("LoadImage", f"control image ({config['condition_name']})", image=CONTROL_IMAGE),
        "7": _node("ControlNetLoader", "the student's condition network", control_net_name=files["controlnet"]),
        "8": _node("ControlNetApplyAdvanced", "apply the condition", positive=["4", 0], negative=["5", 0],
                   control_net=["7", 0], image=["6", 0], strength=1.0, start_percent=0.0, end_percent=1.0),
    })
    if source == "input":
        nodes["9"] = _node("LoadImage", "input image (the one-step start)", image=INPUT_IMAGE)
        nodes["10"] = _node("VAEEncode", "encode the input", pixels=["9", 0], vae=["1", 2])
    else:
        nodes["10"] = _node("EmptyLatentImage", "empty latent", width=width, height=height, batch_size=1)
    nodes.update({
        "11": _node("KSampler", f"{steps} step(s) on the training grid", model=model, seed=int(seed), steps=steps,
                    cfg=guidance, sampler_name="lcm", scheduler="simple", positive=["8", 0], negative=["8", 1],
                    latent_image=["10", 0], denoise=denoise),
        "12": _node("VAEDecode", "decode", samples=["11", 0], vae=["1", 2]),
        "13": _node("SaveImage", "save", images=["12", 0], filename_prefix=MARK),
    })
    return nodes, None


def workflow_path(out) -> "Path":
    """Where an export to ``out`` writes its workflow: ``OUT_comfyui.json`` beside it."""
    from pathlib import Path

    out = Path(out)
    return out.with_name(out.stem + "_comfyui.json")


def write_workflow(folder, config: Mapping[str, Any], out, files: Mapping[str, str], *,
                   overwrite: bool = False) -> tuple[Any, str | None]:
    """Write the workflow of the export in ``folder`` beside ``out`` (:func:`workflow_path`).

    Returns ``(path, None)``, or ``(None, note)`` when there is no workflow (the reason) or a file at its place
    that this module did not write is kept (pass ``overwrite``). A workflow written earlier is replaced, as it
    only restates the export.
    """
    import json
    from pathlib import Path

    from condistill.files import replace_file

    scheduler_file = Path(folder) / str(config.get("scheduler") or "scheduler/scheduler_config.json")
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    nodes, why = workflow(config, scheduler, files)
    if nodes is None:
        return None, f"no ComfyUI workflow: {why}."
    path = workflow_path(out)
    if path.is_dir():
        return None, f"no ComfyUI workflow: {path} is a folder; move it to get one."
    if path.exists() and not overwrite:
        try:
            ours = is_ours(json.loads(path.read_text()))
        except (OSError, ValueError):
            ours = False
        if not ours:
            return None, f"kept {path}, which is not a workflow condistill wrote; pass --overwrite to replace it."
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(nodes, indent=1) + "\n"))
    return path, None
