"""Measure how well the tiny teacher draws what its prompts say.

Loads the teacher with plain ``diffusers.StableDiffusionPipeline`` (DDIM, classifier-free
guidance), samples one image per held-out scene caption (fixed seed per prompt, batched),
then reports, as JSON:

* ``judge``: accuracies of the trained judge (``condistill/assets/judge``) on background colour, main
  object colour, both, and shape, against each prompt (``Judge.score``);
* ``frechet_distance``: Frechet distance between judge features of the samples and of the
  real held-out scenes with the same captions;
* ``heuristic``: a judge-free pixel check (``worldbuild.heuristic.pixel_attributes``), with its
  accuracy on the real scenes for calibration.

It also saves a grid of the first samples with their prompts. The documented figures::

    python tools/evaluate_teacher.py --model condistill/assets/tiny-teacher
"""
from __future__ import annotations

import json
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from condistill.world.scenes import SyntheticScenes
from worldbuild.cli import config_from_args, parser_from_dataclass
from worldbuild.heuristic import heuristic_score


@dataclass
class EvalConfig:
    model: str = "condistill/assets/tiny-teacher"
    judge: str = "condistill/assets/judge"
    num_prompts: int = 256
    steps: int = 50
    guidance_scale: float = 4.0
    batch_size: int = 32
    seed: int = 0
    threads: int = 1
    output_json: str = "docs/teacher_eval.json"
    grid: str = "docs/images/teacher_samples.png"
    grid_count: int = 48
    require_judge: bool = False

    def __post_init__(self):
        if not Path(self.model).is_dir():
            raise ValueError(f"model folder {self.model!r} does not exist")
        for name in ("num_prompts", "steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_prompts < 2:
            raise ValueError("num_prompts must be at least 2 (a Frechet distance needs a covariance)")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.grid_count < 0:
            raise ValueError(f"grid_count must be >= 0, got {self.grid_count}")


HELPS = {
    "model": "diffusers Stable Diffusion folder of the teacher",
    "judge": "judge folder (condistill/assets/judge); skipped if missing",
    "num_prompts": "held-out captions to sample (SyntheticScenes('heldout') indices 0..N-1)",
    "steps": "DDIM sampling steps",
    "guidance_scale": "classifier-free guidance scale",
    "batch_size": "prompts per pipeline call",
    "seed": "prompt i uses generator seed seed + i",
    "threads": "torch CPU threads",
    "output_json": "where to write the figures",
    "grid": "PNG grid of the first samples with their prompts",
    "grid_count": "samples shown in the grid",
    "require_judge": "fail instead of skipping when the judge is missing",
}


def parse_args(argv=None) -> EvalConfig:
    p = parser_from_dataclass(EvalConfig, __doc__.split("\n\n")[0], helps=HELPS)
    return config_from_args(EvalConfig, p.parse_args(argv), p)


def captioned_grid(images, prompts, cols: int = 8, scale: int = 2) -> Image.Image:
    """Each image upscaled ``scale`` x with its wrapped prompt underneath."""
    if not images:
        raise ValueError("captioned_grid needs at least one image")
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    font = ImageFont.load_default(size=10)
    lines_per = max(len(textwrap.wrap(p, 24)) for p in prompts)
    cell_h = h + 4 + 12 * lines_per
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (w + 6), rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (im, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * (w + 6), (i // cols) * cell_h
        canvas.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(prompt, 24)):
            draw.text((x + 1, y + h + 2 + 12 * j), line, fill=(0, 0, 0), font=font)
    return canvas


def sample(cfg: EvalConfig, prompts: list[str], log=print) -> tuple[list[Image.Image], float]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(cfg.model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    t0 = time.time()
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        gens = [torch.Generator().manual_seed(cfg.seed + start + i) for i in range(len(batch))]
        out = pipe(batch, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, generator=gens)
        images.extend(out.images)
        log(f"sampled {len(images)}/{len(prompts)} ({time.time() - t0:.0f}s)")
    return images, time.time() - t0


def run(cfg: EvalConfig, log=print) -> dict:
    torch.set_num_threads(cfg.threads)
    records = SyntheticScenes("heldout", cfg.num_prompts)[:]
    prompts = [r.caption for r in records]
    real = [r.image for r in records]
    images, seconds = sample(cfg, prompts, log)

    result: dict = {"config": asdict(cfg), "sampling_seconds": seconds,
                    "heuristic": heuristic_score(images, prompts),
                    "heuristic_on_real_scenes": heuristic_score(real, prompts)}
    judge_path = Path(cfg.judge)
    if (judge_path / "config.json").exists():
        from condistill.world.judge import load_judge
        from condistill.evaluation.metrics import frechet_distance

        judge = load_judge(cfg.judge)
        result["judge"] = judge.score(images, prompts)
        result["judge_on_real_scenes"] = judge.score(real, prompts)
        result["frechet_distance"] = frechet_distance(judge.features(images), judge.features(real))
    elif cfg.require_judge:
        raise FileNotFoundError(f"no judge at {cfg.judge!r} (train it with tools/train_judge.py)")
    else:
        log(f"judge folder {cfg.judge!r} not found: reporting only the pixel heuristic")
        result["judge"] = None

    if cfg.grid_count:
        n = min(cfg.grid_count, len(images))
        Path(cfg.grid).parent.mkdir(parents=True, exist_ok=True)
        captioned_grid(images[:n], prompts[:n]).save(cfg.grid)
        result["grid"] = cfg.grid
    Path(cfg.output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output_json).write_text(json.dumps(result, indent=2) + "\n")
    log(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    return result


def main(argv=None) -> int:
    run(parse_args(argv), log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
