"""``load_adapter``: a distilled adapter inside a stock diffusers pipeline.

::

    import condistill
    pipe = condistill.load_adapter("runs/edge")            # or a hub id, or (pipe, "runs/edge")
    image = pipe("a red cube", image=pipe.condistill_condition.control_image(photo), **pipe.condistill_defaults).images[0]

The pipeline is a plain diffusers one of the right flavour (SD 1.x/2.x base | SDXL base):

* ``controlnet``  -> ``StableDiffusionControlNetPipeline`` | ``StableDiffusionXLControlNetPipeline``
  (``image=`` is the condition);
* ``t2i_adapter`` -> ``StableDiffusionAdapterPipeline`` | ``StableDiffusionXLAdapterPipeline``
  (``image=`` is the condition);
* ``lora``        -> the same adapter pipeline, whose UNet carries the LoRA (adapter name
  ``"condistill"``, **not fused**, so it can be disabled with ``pipe.unet.disable_adapters()``
  or merged for speed with ``pipe.unet.fuse_lora()``). ``StableDiffusionAdapterPipeline`` has no
  ``load_lora_weights`` of its own, so the LoRA file is loaded by the stock
  ``StableDiffusionPipeline.load_lora_weights`` (``StableDiffusionXLPipeline``'s on SDXL) on a
  pipeline sharing the same components.

The base family (:func:`condistill.frozen.family_of` of the UNet) names these classes.

Its scheduler is a :class:`condistill.method.codi_scheduler.CoDiScheduler` configured from the adapter's
``scheduler/scheduler_config.json`` (same skip grid as training). The recommended sampling
settings are in ``pipe.condistill_defaults`` (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``);
stock pipelines do not read them by themselves, so pass them: ``pipe(..., **pipe.condistill_defaults)``.
They also hold ``height`` and ``width``: the adapter's training resolution (the size it samples
best at). ``pipe.condistill_condition`` is the condition the adapter was trained with (its
recorded options, e.g. edge thresholds): ``pipe.condistill_condition.control_image(photo)`` makes
the control image as training made its conditions. The full adapter config is ``pipe.condistill_config``.

A student trained for one step from a particular start (``one_step_start`` in its config,
:mod:`condistill.method.one_step`) is sampled from there whenever it takes one step: its scheduler
starts a one-step schedule at the recorded timestep (from the zero latent noised there for edge
and depth). A ControlNet trained for one step from the input (sr, inpaint) comes in the family's
ControlNet img2img pipeline instead (``image=`` the start image,
``pipe.condistill_condition.init_image(control)``; ``control_image=`` the condition), and its
``condistill_defaults`` add ``strength=1.0`` and ``controlnet_conditioning_scale=1.0``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from condistill.frozen import NOISE_SCHEDULE_KEYS, compute_fingerprint, family_of, fingerprint_mismatch
from condistill.hub import resolve_pretrained_dir
from condistill.adapters.config_checks import check_base_resolution, verify_checksums
from condistill.adapters.integrity import adapter_class_for, check_adapter_fits, resolve_weight_files
from condistill.adapters.save_load import SCHEDULER_SUBFOLDER, find_adapter_dir, read_adapter_config
from condistill.files import previous_folder

__all__ = ["load_adapter", "resolve_adapter_dir", "trained_condition"]


def resolve_adapter_dir(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """Local folder holding ``condistill_config.json`` for an adapter path or hub repo id.

    Tries, in order: a local folder (its ``adapter/`` subfolder, the run-folder layout, else the
    folder itself: :func:`~condistill.adapters.save_load.find_adapter_dir`, which also finds the
    previous export while a new one is being swapped in); a hub repo id resolved through
    ``huggingface_hub.snapshot_download`` (from the local cache when ``HF_HUB_OFFLINE=1``), again
    with or without ``adapter/``.

    Raises:
        FileNotFoundError: when neither is found, saying what to pass.
    """
    local = Path(os.fspath(path_or_repo_id)).expanduser()
    if local.exists() or previous_folder(local) is not None:
        return find_adapter_dir(local)
    root = resolve_pretrained_dir(path_or_repo_id, revision=revision, what="adapter")
    return find_adapter_dir(root)


def _scheduler_config(adapter_dir: Path, config: dict, base_scheduler_config) -> dict[str, Any]:
    path = adapter_dir / SCHEDULER_SUBFOLDER / "scheduler_config.json"
    if path.is_file():
        sched = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    else:
        sched = {"prediction_type": config["prediction_type"], "num_grid": config["num_grid"]}
    base_cfg = dict(base_scheduler_config or {})
    differing = []
    for key in NOISE_SCHEDULE_KEYS:
        if key not in base_cfg:
            continue
        if key not in sched:
            sched[key] = base_cfg[key]
        elif json.dumps(sched[key]) != json.dumps(base_cfg[key]):
            differing.append(f"{key}: adapter {sched[key]!r} vs base {base_cfg[key]!r}")
    if differing:
        warnings.warn(
            "The base's noise schedule differs from the one the adapter was distilled with ("
            + "; ".join(differing)
            + "); sampling uses the adapter's.",
            stacklevel=3,
        )
    return sched


def _load_base_pipeline(name_or_path: str, torch_dtype, recorded: bool, resolved_path: str | None = None):
    try:
        if recorded and not Path(name_or_path).is_dir() and resolved_path and Path(resolved_path).is_dir():
            # a relative local base recorded from another working directory
            name_or_path = resolved_path
        root = resolve_pretrained_dir(name_or_path, what="base model")
    except FileNotFoundError as error:
        if recorded:
            raise FileNotFoundError(
                f"The adapter was distilled from base {name_or_path!r}, which cannot be found here. "
                f"Pass base='path/to/local/diffusers/folder' (or a cached hub id) to load_adapter. ({error})"
            ) from None
        raise
    unet_config = root / "unet" / "config.json"
    family = family_of(json.loads(unet_config.read_text()) if unet_config.is_file() else {})
    kwargs = dict(family.load_kwargs)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return family.pipeline_class("text").from_pretrained(root, **kwargs)


def load_adapter(
    path_or_repo_id_or_pipe,
    path_or_repo_id: str | os.PathLike | None = None,
    *,
    base: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    decoder=None,
):
    """A ready stock diffusers pipeline running a distilled condistill adapter.

    Two forms:

    * ``load_adapter("path/or/org/repo")``: loads the base recorded in the adapter config
      (or ``base=``, a local folder or hub id) and returns the flavoured pipeline;
    * ``load_adapter(existing_pipe, "path/or/org/repo")``: builds the flavoured pipeline from
      the components of an existing Stable Diffusion pipeline (they are shared, not copied;
      for ``lora`` the LoRA layers are added to that UNet).

    Args:
        path_or_repo_id_or_pipe: adapter folder / run folder / hub repo id, or a diffusers
            pipeline (form 2).
        path_or_repo_id: the adapter, in form 2 only.
        base: base model to use instead of the recorded one (form 1 only).
        device: move the pipeline there.
        torch_dtype: dtype of the loaded modules (form 2: defaults to the pipeline UNet's dtype).
        revision: hub revision of the adapter repo.
        decoder: a fast decoder to use as the pipeline's ``vae`` (:mod:`condistill.decoders`): a
            TAESD-style ``AutoencoderTiny`` folder, hub id (e.g. ``madebyollin/taesd`` for SD 1.x/2.x),
            ``embedded:tiny-decoder`` (for the embedded teacher) or a loaded module. The full VAE
            stays at ``pipe.condistill_full_vae``. A decoder whose latents do not fit the base is
            refused (``ValueError``) before anything changes.

    Returns:
        ``StableDiffusionControlNetPipeline`` (controlnet; ``StableDiffusionControlNetImg2ImgPipeline``
        for one trained to take its one step from the input) or ``StableDiffusionAdapterPipeline``
        (t2i_adapter, lora), their SDXL versions on an SDXL base, with a ``CoDiScheduler``, plus ``pipe.condistill_defaults``
        (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``: pass them to the call),
        ``pipe.condistill_condition`` (the trained :class:`~condistill.conditions.Condition`) and
        ``pipe.condistill_config``.

    Before anything is built from the adapter's files they are checked: its config and scheduler
    config hold trustworthy values that agree with each other (:mod:`condistill.adapters.config_checks`);
    its ``kind`` matches its ``weight_files``; every file exists and is safetensors (pickles are never
    loaded) and has the SHA-256 recorded at export (an export written before checksums loads with a
    one-line warning); then, against the base, its resolution is one the base can use, and each file
    holds exactly the tensors, with their shapes, of the adapter its config describes, every weight
    finite (:mod:`condistill.adapters.integrity`).

    Raises:
        FileNotFoundError: adapter or base not found (the message says what to pass).
        condistill.adapters.AdapterWeightsError: the adapter's files are damaged, changed since export,
            incomplete, pickled, non-finite or do not match its config (a ``ValueError``; the message names
            the file and tensors and says to re-export or re-download the adapter); its subclass
            ``AdapterConfigError`` for config values out of range, contradicting each other or the base.
        ValueError: the base's architecture fingerprint differs from the adapter's.
    """
    from diffusers import DiffusionPipeline

    if isinstance(path_or_repo_id_or_pipe, DiffusionPipeline):
        source_pipe = path_or_repo_id_or_pipe
        if path_or_repo_id is None:
            raise TypeError("load_adapter(pipe, path_or_repo_id): give the adapter folder or hub id after the pipeline.")
        if base is not None:
            raise TypeError("base= cannot be combined with an existing pipeline: the pipeline is the base.")
        adapter_ref = path_or_repo_id
    else:
        source_pipe = None
        if isinstance(base, DiffusionPipeline):
            raise TypeError("base= takes a folder or hub id; to reuse a loaded pipeline call load_adapter(pipe, path).")
        if path_or_repo_id is not None:
            raise TypeError(
                "load_adapter(path, path2): a second adapter path is only accepted after a pipeline, "
                "load_adapter(pipe, path). Use base= to choose the base model."
            )
        adapter_ref = path_or_repo_id_or_pipe

    adapter_dir = resolve_adapter_dir(adapter_ref, revision=revision)
    config = read_adapter_config(adapter_dir)
    adapter_class = adapter_class_for(config, adapter_dir)
    # the files exist, are safetensors and are the exported ones before the base is loaded; their tensors are
    # checked below
    files = resolve_weight_files(adapter_dir, adapter_class, config["weight_files"])
    verify_checksums(config, adapter_dir)

    if source_pipe is None:
        base_ref = os.fspath(base) if base is not None else config["base_name_or_path"]
        source_pipe = _load_base_pipeline(
            base_ref, torch_dtype, recorded=base is None, resolved_path=config.get("base_resolved_path")
        )
    else:
        base_ref = getattr(source_pipe, "name_or_path", None) or getattr(source_pipe.config, "_name_or_path", "the given pipeline")
    components = dict(source_pipe.components)
    if components.get("unet") is None:
        raise TypeError(f"The base pipeline ({type(source_pipe).__name__}) has no unet; load_adapter needs a "
                        "Stable Diffusion (1.x/2.x or XL) pipeline.")
    family = family_of(components["unet"].config)
    missing = [k for k in family.components if components.get(k) is None]
    if missing:
        raise TypeError(
            f"The base pipeline ({type(source_pipe).__name__}) lacks component(s) {missing}; load_adapter "
            f"needs a {family.label} pipeline ({', '.join(family.components)})."
        )
    unet = components["unet"]
    dtype = torch_dtype or unet.dtype

    actual = compute_fingerprint(unet.config, components["scheduler"].config.get("prediction_type", "epsilon"))
    problems = fingerprint_mismatch(config["base_fingerprint"], actual)
    if problems:
        raise ValueError(
            f"Base mismatch: the adapter in {adapter_dir} was distilled from {config['base_name_or_path']!r} "
            f"but the base given is {base_ref!r}, whose architecture differs ({'; '.join(problems)}). "
            "Use the base the adapter was trained on."
        )
    if getattr(source_pipe, "name_or_path", None):  # the folder the base loaded from (or its hub id)
        check_base_resolution(config, source_pipe.name_or_path)
    check_adapter_fits(adapter_dir, config, files, unet)

    from condistill.method.codi_scheduler import CoDiScheduler

    start = config["one_step_start"]
    from_input = bool(start) and start["from"] == "input"
    if from_input and not adapter_class.has_img2img:
        warnings.warn(f"{adapter_dir} was trained for one step from the input noised to t = {start['timestep']}, but "
                      f"diffusers has no img2img pipeline for a {config['kind']} adapter: this pipeline samples one step "
                      "from pure noise at the top of the grid. condistill eval samples that start (rows with START).",
                      stacklevel=2)
        start = None
    sched = _scheduler_config(adapter_dir, config, components["scheduler"].config)
    scheduler = CoDiScheduler.from_config({**sched, "one_step_start": start})
    common = {
        **{k: components[k] for k in family.components},
        "scheduler": scheduler,
        "safety_checker": components.get("safety_checker"),
        "feature_extractor": components.get("feature_extractor"),
        "requires_safety_checker": False,
        "image_encoder": components.get("image_encoder"),
    }
    if "force_zeros_for_empty_prompt" in source_pipe.config:  # SDXL: what its unconditional embedding is
        common["force_zeros_for_empty_prompt"] = source_pipe.config.force_zeros_for_empty_prompt
    # each adapter kind builds its own stock pipeline (condistill.adapters registry), of the family's classes
    pipe = adapter_class.stock_pipeline(adapter_dir, config["weight_files"], common, dtype, family)
    img2img = from_input and start is not None
    if img2img:  # the same components in the kind's img2img pipeline: image= is where the one step starts
        pipe = family.pipeline("controlnet_img2img", {**common, **pipe.components})
    if decoder is not None:
        from condistill.decoders import use_fast_decoder

        use_fast_decoder(pipe, decoder)
    if device is not None:
        pipe.to(device)
    pipe.condistill_defaults = {
        "num_inference_steps": int(config["recommended_steps"]),
        "guidance_scale": float(config["recommended_guidance"]),
        "height": int(config["height"]),
        "width": int(config["width"]),
        # an img2img call noises image= to the scheduler's first timestep, the recorded start for one step
        **({"strength": 1.0, "controlnet_conditioning_scale": 1.0} if img2img else {}),
    }
    pipe.condistill_config = {k: v for k, v in config.items() if not k.startswith("_")}
    pipe.condistill_condition = trained_condition(config)
    return pipe


def trained_condition(config: dict):
    """The :class:`~condistill.conditions.Condition` an adapter was trained with (its options as recorded),
    whose ``control_image`` fits images to the adapter's training resolution first, as training did."""
    from condistill.conditions import condition_from_config

    recorded = dict(config["condition_config"])
    recorded.setdefault("name", config["condition_name"])
    return condition_from_config(recorded).at_resolution(int(config["resolution"]))
