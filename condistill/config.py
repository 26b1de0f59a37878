"""Typed, validated configuration of a distillation run.

Every option has help text (``field(metadata={"help": ...})``) that the recipes turn into
``--help``. Validation collects *all* problems and reports them together.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BASE = "embedded:tiny-teacher"

#: The fixed choices of the enumerated options (``condition`` and ``adapter`` come from their
#: registries: :func:`option_choices`). ``--help`` lists them and :meth:`DistillConfig.problems` checks them.
CHOICES: dict[str, tuple[str, ...]] = {
    "distance": ("l2", "huber"),
    "ode_source": ("ema", "teacher", "online"),
    "guidance_branches": ("all", "ode"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "loss": ("codi", "diffusion", "codi+dmd", "dmd"),
    "report_to": ("tensorboard", "wandb", "none"),
    "optimizer": ("adamw", "adamw8bit"),
    "dmd_fake_targets": ("attention", "attention_ff", "all"),
}

#: The Python packages a tracker of ``report_to`` can use (imported only when it is chosen).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def option_choices() -> dict[str, tuple[str, ...]]:
    """Every enumerated option of :class:`DistillConfig` and its allowed values."""
    from condistill.adapters import available_adapters
    from condistill.conditions import available_conditions

    return {"condition": tuple(available_conditions()), "adapter": tuple(available_adapters()), **CHOICES}


def validation_pairs(images: list[str], prompts: list[str]) -> list[tuple[str, str]]:
    """The ``(image path, prompt)`` pairs of ``--validation-images`` and ``--validation-prompts``.

    The rule (checked by :meth:`DistillConfig.problems`): as many prompts as images pair up in
    order; one prompt goes with every image; one image goes with every prompt; no prompt gives
    every image the empty prompt. Prompts without images are an error (a conditional model
    needs a condition).
    """
    if not images:
        return []
    if not prompts:
        prompts = [""]
    if len(images) == 1:
        images = images * len(prompts)
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} validation images and {len(prompts)} prompts: give as many prompts as "
                         "images, one prompt (used for every image), one image (used for every prompt) or none")
    return list(zip(images, prompts))


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


class ConfigError(ValueError):
    """Raised with every problem of a configuration at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


class SettingError(ValueError):
    """A setting that this base or machine cannot run (an unusable ``--resolution``, fp16 without CUDA),
    found at the start of a run before anything loads; its message is one line naming what to use instead."""


def check_resolution(base: str | os.PathLike, resolution: int) -> int:
    """The training resolution of a run on ``base``: ``resolution``, or the native one for 0 (read from
    the base's configs, no weights load).

    Usable sides are multiples of the VAE factor times ``2 ** (UNet down-samplings)`` (64 for SD 1.x/2.x,
    32 for SDXL, 16 for the embedded teacher), so every UNet, ControlNet and T2I-Adapter level has a whole
    number of latent pixels.

    Raises:
        SettingError: one line naming the nearest usable resolutions.
    """
    from condistill.frozen import base_architecture

    sample, factor, downsamplings = base_architecture(base)
    if not resolution:
        return sample * factor
    multiple = factor * 2 ** downsamplings
    if resolution >= multiple and resolution % multiple == 0:
        return int(resolution)
    lower = resolution // multiple * multiple
    nearest = [size for size in (lower, lower + multiple) if size >= multiple]
    raise SettingError(f"--resolution {resolution}: this base ({os.fspath(base)}, native {sample * factor} px) trains "
                       f"at multiples of {multiple} px; the nearest usable are {' and '.join(map(str, nearest))}")


def check_grid(base: str | os.PathLike, num_grid: int, dmd_start_timestep: int = 0) -> None:
    """Refuse a ``--num-grid`` that does not divide the base's training timesteps and a ``--dmd-start-timestep``
    that is not a point of the grid, reading the base's scheduler config only (no weights load).

    Raises:
        SettingError: one line naming the usable values.
    """
    from condistill.hub import resolve_pretrained_dir
    from condistill.method.schedule import skip_grid

    file = resolve_pretrained_dir(base, what="base model") / "scheduler" / "scheduler_config.json"
    steps = int(json.loads(file.read_text()).get("num_train_timesteps", 1000)) if file.is_file() else 1000
    try:
        grid = skip_grid(steps, num_grid).tolist()
    except ValueError as error:
        raise SettingError(str(error)) from None
    if dmd_start_timestep and dmd_start_timestep not in grid:
        nearest = sorted(sorted(grid, key=lambda t: abs(t - dmd_start_timestep))[:2])
        raise SettingError(f"--dmd-start-timestep {dmd_start_timestep}: not a timestep of the training grid of this "
                           f"base ({steps} training timesteps, --num-grid {num_grid}: {grid[0]}, {grid[1]}, ..., "
                           f"{grid[-1]}); the nearest are {' and '.join(map(str, nearest))} (0 starts from pure noise)")


@dataclass
class DistillConfig:
    """Options of one conditional distillation run."""

    condition: str = _h("condition type: edge, depth, sr or inpaint", default="edge")
    base: str = _h("frozen teacher: a diffusers Stable Diffusion folder, a hub id, or embedded:tiny-teacher (the "
                   "packaged tiny teacher)", default=DEFAULT_BASE)
    data: str = _h(
        "training images: 'synthetic[:split[:size]]', an image folder, a datasets "
        "save_to_disk folder, .tar webdataset shards, or a datasets hub id",
        default="synthetic:train:20000",
    )
    adapter: str = _h("trainable parameters: controlnet, t2i_adapter, lora, or controlnet_lora (a ControlNet and a "
                      "UNet LoRA together)", default="controlnet")
    output_dir: str = _h("run folder: the adapter export in adapter/, checkpoints/ and logs/ inside", default="runs/edge")
    max_steps: int = _h("optimizer steps to train for", default=400)
    batch_size: int = _h("images per optimizer step and process, per accumulation micro-step: an optimizer step "
                         "trains on batch_size x processes x gradient_accumulation_steps images", default=32)
    gradient_accumulation_steps: int = _h("micro-batches accumulated per optimizer step", default=1)
    optimizer: str = _h("optimizer of the adapter: adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW, a quarter "
                        "of the optimizer memory; needs a CUDA GPU and `pip install bitsandbytes`)", default="adamw")
    learning_rate: float = _h("AdamW learning rate of the adapter", default=2e-4)
    lr_warmup_steps: int = _h("linear learning-rate warm-up steps, rising from 0 (a warm-up not shorter than "
                              "max_steps never reaches learning_rate: the run says so at its start)", default=20)
    weight_decay: float = _h("AdamW weight decay", default=0.0)
    max_grad_norm: float = _h("gradient clipping norm: gradients are scaled down to this total norm (0 disables "
                              "clipping; negative values are refused)", default=1.0)
    ema_decay: float = _h("EMA decay of the adapter weights used by the target and ODE branches", default=0.95)
    ema_decay_late: float = _h("EMA decay from step ema_late_from on (0 = keep ema_decay): a slower EMA late in "
                               "training averages the exported weights over more steps", default=0.0)
    ema_late_from: int = _h("optimizer step at which ema_decay_late takes over", default=0)
    num_grid: int = _h("N, the points of the skip grid shared by training and sampling", default=50)
    regression_weight: float = _h("lambda of the conditional regression term ||F - z0||^2", default=1.0)
    grid_top_fraction: float = _h("share of the CoDi loss's samples drawn at the top of the grid (where one-step "
                                  "sampling starts) before the uniform draw over the rest; 0 = uniform", default=0.0)
    distance: str = _h("consistency distance: l2 or huber (pseudo-Huber)", default="l2")
    huber_c: float = _h("pseudo-Huber constant c", default=0.001)
    ode_source: str = _h("one-step ODE predictor: ema (EMA conditional student), teacher (frozen, no adapter) or "
                         "online (the online prediction at z_t, detached: one forward fewer per step; its quality "
                         "against ema is in docs/results.md)", default="ema")
    guidance_min: float = _h("CFG-aware distillation: lowest guidance scale w drawn per sample (1 = off)", default=1.0)
    guidance_max: float = _h("CFG-aware distillation: highest guidance scale w drawn per sample", default=1.0)
    guidance_branches: str = _h("where the drawn w is applied: all (online, target and ODE; the student then samples "
                                "with CFG at w, the paper's CFG-aware distillation) or ode (only the one-step ODE "
                                "solver; the student learns the guided trajectory and samples without CFG, at the "
                                "cost of one unguided model call per step)", default="all")
    caption_dropout: float = _h("probability of training on an empty caption", default=0.1)
    resolution: int = _h("training resolution in pixels (0 = the base's native resolution): a multiple of 64 for SD "
                         "1.x/2.x, of 32 for SDXL, of 16 for the embedded teacher; the export samples at it by default",
                         default=0)
    mixed_precision: str = _h("no, fp16 (CUDA GPUs only) or bf16 (GPUs and CPUs): the frozen base runs in that dtype, "
                              "the adapter, EMA and fake score stay float32, every forward runs in autocast "
                              "(docs/mixed-precision.md)", default="no")
    gradient_checkpointing: bool = _h("trade compute for memory in the UNet and adapter", default=False)
    allow_tf32: bool = _h("let CUDA matmuls and cuDNN convolutions use TF32 (Ampere and newer GPUs: faster float32, "
                          "about 3 fewer significant digits); false leaves torch's defaults; no effect on CPU",
                          default=False)
    checkpoint_every: int = _h("save resumable training state every K steps (0 = only at the end)", default=100)
    keep_checkpoints: int = _h("how many training-state checkpoints to keep", default=2)
    validate_every: int = _h("write a validation grid every K steps (0 = only at the end)", default=200)
    log_every: int = _h("log loss and speed every K steps", default=10)
    resume: str | None = _h("'latest' or a checkpoint folder to continue from", default=None)
    overwrite: bool = _h("replace a finished run's export in output_dir (without it such a folder is refused)",
                         default=False)
    max_skip_fraction: float = _h("stop when more than this fraction of the data items seen are unusable "
                                  "(corrupt, missing, too small); every skip is listed in data_report.json",
                                  default=0.1)
    seed: int = _h("seed of every random choice in the run", default=0)
    num_workers: int = _h("data-loader worker processes", default=0)
    threads: int = _h("CPU threads for torch (0 = torch's default)", default=0)
    recommended_steps: int = _h("sampling steps recorded in the adapter config", default=4)
    stochastic_sampling: bool = _h("the adapter's few-step sampler re-noises with fresh noise between steps "
                                   "(consistency-model multistep sampling); false reuses the model's own noise "
                                   "estimate (deterministic, DDIM-like)", default=True)
    condition_options: dict[str, Any] = _h("options passed to the condition", default_factory=dict)
    adapter_options: dict[str, Any] = _h("options passed to the adapter", default_factory=dict)
    data_options: dict[str, Any] = _h("options passed to the data source (e.g. image_column)", default_factory=dict)
    loss: str = _h("codi (distillation), diffusion (conventional adapter training, the baseline), codi+dmd (codi plus "
                   "distribution matching on the student's one-step outputs) or dmd (distribution matching plus the "
                   "conditional regression term, without the consistency term)", default="codi")
    dmd_weight: float = _h("weight of the distribution-matching term (codi+dmd, dmd); 0.25 measured better than 1 "
                           "in edge F1 and Frechet distance at 1, 2 and 4 steps (edge ControlNet, 300 and 700 "
                           "steps, docs/results.md)", default=0.25)
    dmd_guidance: float = _h("CFG scale of the real score (the frozen teacher) in distribution matching", default=4.0)
    dmd_fake_updates: int = _h("fake-score optimizer steps per student micro-step (DMD2's two time-scale rule)",
                               default=1)
    dmd_fake_lr: float = _h("learning rate of the fake-score LoRA (0 = learning_rate)", default=0.0)
    dmd_fake_rank: int = _h("LoRA rank of the fake-score network on the frozen teacher UNet; 0 trains a full "
                            "float32 copy of the teacher UNet instead (most capacity, a UNet's memory)", default=16)
    dmd_fake_targets: str = _h("layers of the fake-score LoRA: attention, attention_ff (also the feed-forward and "
                               "transformer projections) or all (also the ResNet convolutions)", default="attention_ff")
    dmd_start_timestep: int = _h("distribution matching's one-step outputs start from the condition's own image "
                                 "(sr, inpaint; the zero latent for edge and depth) noised to this grid timestep, "
                                 "as one-step sampling from the input does (eval row NAME=RUN:codi-stochastic:1:1:T); "
                                 "0 = from pure noise at the top of the grid", default=0)
    dmd_backward_steps: int = _h("DMD2's backward simulation: distribution matching acts on the student's own "
                                 "K-step outputs (K >= 2; the first k of its K sampling steps run without a graph, k "
                                 "drawn per step) instead of its one-step outputs from pure noise (0)", default=0)
    gan_weight: float = _h("weight of the adversarial term: a discriminator head on the fake score's mid-block "
                           "features tells the student's one-step outputs from noised training images (0 = off)",
                           default=0.0)
    validation_images: list[str] = _h(
        "your own validation images instead of held-out training scenes: plain images (any size, center-cropped "
        "to the resolution); the condition is derived from each one by the run's condition, as in training (an "
        "edge map of it, a degraded copy, a masked copy; depth needs an estimator). Sampled at 1, 2, 4 and "
        "recommended_steps steps into validation/step-*.png and the tracker", default_factory=list)
    validation_prompts: list[str] = _h(
        "prompts of the validation images: as many as images (paired in order), one (used for every image), or "
        "none (empty prompts); with a single image, each prompt is sampled with it", default_factory=list)
    report_to: str = _h("where losses and validation grids are logged (accelerate's log_with): tensorboard "
                        "(in logs/), wandb (needs `pip install wandb`) or none (files only)", default="tensorboard")

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        p: list[str] = []
        choices = option_choices()
        for name in ("condition", "adapter"):
            if getattr(self, name) not in choices[name]:
                p.append(f"{name}={getattr(self, name)!r}: choose one of {list(choices[name])}")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "num_grid", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"{name}={getattr(self, name)}: must be at least 1")
        for name in ("lr_warmup_steps", "checkpoint_every", "validate_every", "num_workers", "threads", "resolution"):
            if getattr(self, name) < 0:
                p.append(f"{name}={getattr(self, name)}: must be 0 or more")
        if self.keep_checkpoints < 1:
            p.append(f"keep_checkpoints={self.keep_checkpoints}: keep at least 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            p.append(f"learning_rate={self.learning_rate}: must be positive and finite")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            p.append(f"weight_decay={self.weight_decay}: must be 0 or more (0 = no weight decay)")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            p.append(f"max_grad_norm={self.max_grad_norm}: must be 0 or more (0 disables gradient clipping)")
        if not (self.huber_c > 0 and math.isfinite(self.huber_c)):
            p.append(f"huber_c={self.huber_c}: must be positive (the pseudo-Huber constant)")
        if not 0 <= self.seed < 2 ** 32:
            p.append(f"seed={self.seed}: must be between 0 and 2**32 - 1")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            p.append(f"max_skip_fraction={self.max_skip_fraction}: must be in [0, 1] (1 never stops)")
        if not 0.0 <= self.ema_decay < 1.0:
            p.append(f"ema_decay={self.ema_decay}: must be in [0, 1)")
        if not 0.0 <= self.ema_decay_late < 1.0:
            p.append(f"ema_decay_late={self.ema_decay_late}: must be in [0, 1) (0 keeps ema_decay)")
        if self.ema_late_from < 0 or (self.ema_decay_late and self.ema_late_from < 1):
            p.append(f"ema_late_from={self.ema_late_from}: with ema_decay_late set it must be a step >= 1 "
                     "(a step at or past max_steps leaves ema_decay in force for the whole run)")
        if not 2 <= self.num_grid <= 1000:
            p.append(f"num_grid={self.num_grid}: must be between 2 and the teacher's 1000 training steps")
        if self.regression_weight < 0:
            p.append(f"regression_weight={self.regression_weight}: must be 0 or more")
        if not 0.0 <= self.grid_top_fraction <= 1.0:
            p.append(f"grid_top_fraction={self.grid_top_fraction}: must be in [0, 1] (0 = uniform over the grid)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                p.append(f"{name}={getattr(self, name)!r}: choose {' or '.join(allowed)}")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            p.append(f"guidance range [{self.guidance_min}, {self.guidance_max}]: need 1 <= guidance_min <= guidance_max")
        if not 0.0 <= self.caption_dropout < 1.0:
            p.append(f"caption_dropout={self.caption_dropout}: must be in [0, 1)")
        if not 1 <= self.recommended_steps <= self.num_grid:
            p.append(f"recommended_steps={self.recommended_steps}: must be between 1 and num_grid")
        if self.ode_source == "online" and self.guidance_enabled and self.guidance_branches == "ode":
            p.append("ode_source='online' with guidance_branches='ode': the online prediction is unguided there, "
                     "so it cannot stand in for the guided ODE solver; use guidance_branches='all' or ode_source='ema'")
        if (self.adapter == "lcm_lora") != (self.condition == "none"):
            p.append(f"adapter={self.adapter!r} with condition={self.condition!r}: the condition-free lcm_lora "
                     "adapter trains on the none condition (condistill train none), and only it does")
        p += self._dmd_problems()
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            p.append(f"resume={self.resume!r}: pass 'latest' or an existing checkpoint folder")
        return p + self._tracker_problems() + self._optimizer_problems() + self._validation_problems()

    @property
    def distribution_matching(self) -> bool:
        return self.loss in ("codi+dmd", "dmd")

    def _dmd_problems(self) -> list[str]:
        p = []
        if not (self.dmd_weight >= 0 and math.isfinite(self.dmd_weight)):
            p.append(f"dmd_weight={self.dmd_weight}: must be 0 or more")
        if not self.dmd_guidance >= 1:
            p.append(f"dmd_guidance={self.dmd_guidance}: the real score's CFG scale must be at least 1 (1 = no CFG)")
        if self.dmd_fake_updates < 1:
            p.append(f"dmd_fake_updates={self.dmd_fake_updates}: must be at least 1")
        if not (self.dmd_fake_lr >= 0 and math.isfinite(self.dmd_fake_lr)):
            p.append(f"dmd_fake_lr={self.dmd_fake_lr}: must be positive, or 0 for learning_rate")
        if self.dmd_fake_rank < 0:
            p.append(f"dmd_fake_rank={self.dmd_fake_rank}: must be at least 1 (a LoRA's rank), or 0 (a full copy)")
        p += self._dmd_start_problems() + self._backward_problems()
        if not self.gan_weight >= 0:
            p.append(f"gan_weight={self.gan_weight}: must be 0 or more")
        if self.gan_weight > 0 and not self.distribution_matching:
            p.append(f"gan_weight={self.gan_weight} with loss={self.loss!r}: the adversarial head lives on the "
                     "fake-score network; use --loss codi+dmd or dmd")
        if self.distribution_matching and self.adapter in ("lora", "controlnet_lora") and self.gradient_checkpointing:
            p.append(f"loss={self.loss!r} with a LoRA student and gradient checkpointing: checkpointing keeps the "
                     "student's LoRA switched on in the teacher UNet, which the real and fake scores share; turn "
                     "gradient checkpointing off or use a ControlNet or T2I-Adapter student")
        return p

    def _dmd_start_problems(self) -> list[str]:
        start = self.dmd_start_timestep
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            return [f"dmd_start_timestep={start!r}: must be a grid timestep (an integer), or 0 for pure noise"]
        if not start:
            return []
        if not self.distribution_matching:
            return [f"dmd_start_timestep={start} with loss={self.loss!r}: it sets where distribution matching's "
                    "one-step outputs start; use --loss codi+dmd or dmd, or leave it 0"]
        if self.dmd_backward_steps:
            return [f"dmd_start_timestep={start} with dmd_backward_steps={self.dmd_backward_steps}: distribution "
                    "matching acts either on one step from that start or on the K-step sampler's outputs from noise; "
                    "set one of them to 0"]
        return []

    def _backward_problems(self) -> list[str]:
        steps = self.dmd_backward_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0 or steps == 1 or steps > self.num_grid:
            return [f"dmd_backward_steps={steps!r}: must be 0 (off) or a step count K in 2..num_grid ({self.num_grid})"]
        if steps and not self.distribution_matching:
            return [f"dmd_backward_steps={steps} with loss={self.loss!r}: it sets what distribution matching acts on; "
                    "use --loss codi+dmd or dmd, or leave it 0"]
        return []

    def _tracker_problems(self) -> list[str]:
        packages = TRACKER_PACKAGES.get(self.report_to, ())
        if packages and not any(importlib.util.find_spec(name) for name in packages):
            others = " or ".join(c for c in CHOICES["report_to"] if c != self.report_to)
            return [f"report_to={self.report_to!r}: the {packages[0]} package is not installed; run "
                    f"`pip install {packages[0]}`, or pick another tracker (--report-to {others})"]
        return []

    def _optimizer_problems(self) -> list[str]:
        # the CUDA device is checked where the run starts (training.lr.build_optimizer)
        if self.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
            return ["optimizer='adamw8bit': the bitsandbytes package is not installed; run `pip install "
                    "bitsandbytes` (8-bit AdamW needs a CUDA GPU), or use --optimizer adamw"]
        return []

    def _validation_problems(self) -> list[str]:
        from condistill.data.images import open_image
        from condistill.data.skips import SkipItem

        p = [f"{name}={value!r}: must be a list of strings" for name in ("validation_images", "validation_prompts")
             if not isinstance(value := getattr(self, name), (list, tuple)) or not all(isinstance(v, str) for v in value)]
        if p:
            return p
        if self.validation_prompts and not self.validation_images:
            p.append("validation_prompts without validation_images: give the images the prompts describe "
                     "(--validation-images PATH ...)")
        try:
            validation_pairs(list(self.validation_images), list(self.validation_prompts))
        except ValueError as error:
            p.append(str(error))
        for path in self.validation_images:
            try:
                open_image(path)
            except SkipItem as error:
                p.append(f"validation image {path!r} cannot be read ({error})")
        if self.validation_images and self.condition == "depth" and self.condition_options.get("source") == "record":
            p.append("validation_images with the depth condition's source='record': plain images have no depth; "
                     "use source 'auto' or 'estimator'")
        return p

    def ema_decay_at(self, step: int) -> float:
        """The EMA decay applied after optimizer step ``step`` (0-based)."""
        if self.ema_decay_late and step >= self.ema_late_from:
            return self.ema_decay_late
        return self.ema_decay

    @property
    def guidance_enabled(self) -> bool:
        return self.guidance_max > 1.0

    @property
    def sampling_guidance(self) -> float:
        """The guidance scale the trained student should sample with (recorded in its config)."""
        if not self.guidance_enabled or self.guidance_branches == "ode":
            return 1.0
        return (self.guidance_min + self.guidance_max) / 2

    @property
    def student_sampler(self) -> str:
        """The sampler name (:func:`condistill.method.sampler.make_scheduler`) the student samples with."""
        return "codi-stochastic" if self.stochastic_sampling else "codi"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
