"""The students (and conventional adapters) a demo page shows, each a ``load_adapter`` pipeline.

A :class:`DemoModel` samples exactly as the Python API does::

    pipe = condistill.load_adapter(run)
    pipe(prompt, image=control, generator=torch.Generator().manual_seed(seed), **pipe.condistill_defaults)

with the page's steps and guidance in place of the defaults (a student trained for one step from the
input gets ``image=`` its start and ``control_image=`` the condition, as ``load_adapter`` documents).
A conventionally trained adapter (a run with ``--loss diffusion``) is sampled as ``condistill eval``
samples its baseline rows: 50 DDIM steps with classifier-free guidance 4 by default.

The prompt's text embeddings are kept between calls while the prompt and guidance stay the same (a
page redraws on every stroke with the same prompt); they are what the pipeline would compute itself.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from PIL import Image

#: Steps a student offers, the recommended one first.
STUDENT_STEPS = (1, 2, 4)
#: Steps and guidance of a conventional adapter, as ``condistill eval``'s baseline rows sample it.
CONVENTIONAL_STEPS = (50, 25, 4)
CONVENTIONAL_GUIDANCE = 4.0


@dataclass
class Sample:
    """One image and what it cost: ``seconds`` is the pipeline call alone (the sampling part of an update)."""

    image: Image.Image
    seconds: float


def _fixed_execution_device(pipe) -> None:
    """Give ``pipe`` its device once: diffusers looks for offloading hooks through every submodule on each
    call (about 12 ms at batch 1 on the embedded teacher on a CPU, a fifth of a one-step image). A page's
    pipelines are never offloaded, so the device the pipeline is on is where it executes. The instance gets
    a subclass of its own class; nothing else changes."""
    if getattr(pipe, "_condistill_fixed_device", False):
        return
    device = pipe.device
    cls = type(pipe)
    pipe.__class__ = type(cls.__name__, (cls,), {"_execution_device": property(lambda self: device),
                                                 "_condistill_fixed_device": True})


def _is_pipe(obj) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


class DemoModel:
    """A loaded student (or conventional adapter) with the settings its page column offers.

    Args:
        ref: a run folder, adapter folder or hub id (as ``load_adapter`` takes it), or a pipeline
            ``load_adapter`` returned.
        device, decoder: passed to ``load_adapter`` (``decoder``: a fast decoder, e.g.
            ``embedded:tiny-decoder``).
        label: the column's title [the folder name or hub id].
    """

    def __init__(self, ref, *, device: str = "cpu", decoder=None, label: str | None = None):
        from condistill.pipeline import load_adapter

        self.pipe = ref if _is_pipe(ref) else load_adapter(ref, device=device, decoder=decoder)
        #: what was loaded (None for a given pipeline)
        self.source = None if _is_pipe(ref) else ref
        if not hasattr(self.pipe, "condistill_config"):
            raise TypeError("DemoModel takes a run, adapter folder, hub id or a pipeline from condistill.load_adapter")
        self.pipe.set_progress_bar_config(disable=True)
        _fixed_execution_device(self.pipe)
        self.config = self.pipe.condistill_config
        self.condition = self.pipe.condistill_condition
        self.defaults = dict(self.pipe.condistill_defaults)
        self.label = label or (str(ref).rstrip("/").split("/")[-1] if not _is_pipe(ref) else self.config["kind"])
        self.conventional = (self.config.get("extra") or {}).get("loss") == "diffusion"
        if self.conventional:
            import inspect

            from diffusers import DDIMScheduler

            # the baseline rows of condistill eval: DDIM on the base's noise schedule
            accepted = inspect.signature(DDIMScheduler.__init__).parameters
            schedule = {k: v for k, v in self.pipe.scheduler.config.items() if k in accepted}
            self.pipe.scheduler = DDIMScheduler.from_config(schedule, set_alpha_to_one=False, steps_offset=1,
                                                            clip_sample=False)
            self.steps = CONVENTIONAL_STEPS
            self.guidance = CONVENTIONAL_GUIDANCE
        else:
            recommended = int(self.defaults["num_inference_steps"])
            self.steps = (recommended, *[s for s in STUDENT_STEPS if s != recommended])
            self.guidance = float(self.defaults["guidance_scale"])
        self.img2img = "strength" in self.defaults
        self._embeds_key = None
        self._embeds: dict = {}
        self._lock = threading.Lock()  # a pipeline (its scheduler's timesteps) serves one call at a time

    @property
    def resolution(self) -> int:
        return int(self.config["resolution"])

    def describe(self) -> str:
        """One line for the page: what this model is and how it samples."""
        from condistill.method.one_step import describe

        trained = (self.config.get("extra") or {}).get("steps_trained")
        what = "conventional adapter, 50 DDIM steps + CFG" if self.conventional else "condistill student"
        parts = [f"{self.config['kind']} · {self.condition.name} · {self.resolution}px · {what}"]
        if trained:
            parts.append(f"{trained:,} steps trained")
        start = self.config.get("one_step_start")
        if start and not self.conventional:
            parts.append(f"one step: {describe(start)}")
        return " · ".join(parts)

    def _prompt_embeds(self, prompt: str, guidance: float) -> dict:
        """The pipeline's own text embeddings of ``prompt`` (and of the empty prompt under guidance), kept
        while the prompt and guidance stay the same."""
        key = (prompt, guidance > 1.0)
        if key != self._embeds_key:
            pipe = self.pipe
            with torch.no_grad():
                if hasattr(pipe, "text_encoder_2"):  # SDXL
                    out = pipe.encode_prompt(prompt, device=pipe.device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=guidance > 1.0)
                    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                             "negative_pooled_prompt_embeds")
                else:
                    out = pipe.encode_prompt(prompt, pipe.device, 1, guidance > 1.0)
                    names = ("prompt_embeds", "negative_prompt_embeds")
            self._embeds = {k: v for k, v in zip(names, out) if v is not None}
            self._embeds_key = key
        return self._embeds

    def call_arguments(self, control: torch.Tensor, prompt: str, steps: int, seed: int, guidance: float) -> dict:
        """The keyword arguments of the pipeline call for one image (without the prompt)."""
        condition = control.to(self.pipe.device)
        args = {**self.defaults, "num_inference_steps": int(steps), "guidance_scale": float(guidance),
                "generator": torch.Generator("cpu").manual_seed(int(seed))}
        if self.img2img:
            args.update(image=self.condition.init_image(condition), control_image=condition)
        else:
            args["image"] = condition
        return args

    def generate(self, control: torch.Tensor, prompt: str = "", steps: int | None = None, seed: int = 0,
                 guidance: float | None = None) -> Sample:
        """One image for the condition ``control`` (``[1, C, R, R]``) and the time its pipeline call took."""
        steps = self.steps[0] if steps is None else int(steps)
        guidance = self.guidance if guidance is None else float(guidance)
        args = self.call_arguments(control, prompt, steps, seed, guidance)
        with self._lock:
            start = time.perf_counter()
            embeds = self._prompt_embeds(prompt, guidance)
            image = self.pipe(**embeds, **args).images[0]
            return Sample(image=image, seconds=time.perf_counter() - start)
